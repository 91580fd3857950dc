"""experiments/crrl_headroom.py: every learner plays one game (its targets are the scoring targets: its own current
table's candidate rows and mean row), early stopping keeps the best validation check, the strict reference keeps the
held-out items out of the map's training signal, the one-hot reads attributes; and each `--module-train` sends the
gradient down exactly the paths it names (the benchmark's conclusions about CRRL with `train_lora` rest on
`lora_via_thought` being what CRRL can learn: the adapter moves only through the thought vector mu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import experiments.crrl_headroom as headroom
from conftest import tiny_embedder
from experiments.crrl_headroom import (SCORE, EarlyStopping, attribute_one_hot, catalogue_table,
                                       centred_cosine_logits, game_encoder, game_targets, map_training_signal,
                                       supervised_loss, train_learner, trainable_parameters)
from reaemb_trl.candidates import CooccurrenceCandidates
from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items
from reaemb_trl.rewards import rank_reward
from reaemb_trl.similarity import similarity_matrix

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture
def setting(items):
    embedder = tiny_embedder(lora=True, pooling="item_mean").eval()
    torch.manual_seed(3)
    for name, param in embedder.model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0, which would zero every gradient of A
            torch.nn.init.normal_(param, std=0.05)
    prefix_ids = embedder.prefix_ids(items[:4])
    d = embedder.thought_module.q_proj.in_features
    return embedder, prefix_ids, torch.randn(4, 5, d), torch.randn(d)


def _grads(output, params, grad_output=None):
    grads = torch.autograd.grad(output, params, grad_outputs=grad_output, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _via_mu_reference(embedder, prefix_ids, cands, center, lora):
    """d loss / d LoRA through mu alone: d loss / d mu with every other input constant, chained through mu(theta)."""
    prefix = embedder.encode_prefix(prefix_ids)
    mu = embedder.thought_module(prefix.hidden, prefix.mask)
    mu_leaf = mu.detach().requires_grad_(True)
    with torch.no_grad():
        frozen = embedder.encode_prefix(prefix_ids)
    emb = embedder.embed_from_thought(frozen, mu_leaf)
    loss = torch.nn.functional.cross_entropy(centred_cosine_logits(emb, cands, center),
                                             torch.zeros(len(prefix_ids), dtype=torch.long))
    (d_mu,) = torch.autograd.grad(loss, mu_leaf)
    return _grads(mu, lora, d_mu)


def test_lora_via_thought_reaches_the_adapter_only_through_mu(setting):
    embedder, prefix_ids, cands, center = setting
    _, lora = trainable_parameters(embedder, "lora_via_thought")
    via_mu = _grads(supervised_loss(embedder, prefix_ids, cands, center, "lora_via_thought", lora, NO_AUTOCAST), lora)
    reference = _via_mu_reference(embedder, prefix_ids, cands, center, lora)
    scale = max(float(g.abs().max()) for g in reference)
    assert scale > 0
    for got, want in zip(via_mu, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
    assert all(p.requires_grad for p in lora)  # the adapter is trainable again after the suffix pass

    # every path: the adapter also moves the pooled prefix, so its gradient differs from the via-mu one
    every_path = _grads(supervised_loss(embedder, prefix_ids, cands, center, "lora_all", lora, NO_AUTOCAST), lora)
    assert max(float((a - b).abs().max()) for a, b in zip(every_path, reference)) > 1e-2 * scale


def test_module_only_leaves_the_adapter_without_gradient(setting):
    embedder, prefix_ids, cands, center = setting
    module, lora = trainable_parameters(embedder, "module")
    assert lora == []
    adapter = [p for n, p in embedder.model.named_parameters() if "lora_" in n]
    for p in adapter:
        p.requires_grad_(False)
    loss = supervised_loss(embedder, prefix_ids, cands, center, "module", lora, NO_AUTOCAST)
    loss.backward()
    assert all(p.grad is None for p in adapter)
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in module)


def test_unknown_learner_is_named():
    with pytest.raises(ValueError, match="--module-train"):
        trainable_parameters(tiny_embedder(), "everything")


# ---- the one game --------------------------------------------------------------------------------------------
GENRES = ["Comedy", "Drama", "Action", "Horror"]


@pytest.fixture
def game():
    """24 items, 40 users with 8 items each: every item co-occurs, ~20% are held out."""
    catalogue = {str(k): [("title", f"item {k}"), ("year", str(1980 + k)), ("genres", GENRES[k % 4])]
                 for k in range(24)}
    ids = list(catalogue)
    rng = np.random.default_rng(0)
    sequences = {f"u{u}": [ids[i] for i in rng.permutation(24)[:8]] for u in range(40)}
    held = held_out_items(ids, 0.2)
    assert 0 < len(held) < 12
    return catalogue, ids, sequences, held


def test_game_targets_are_the_yardsticks_scoring_targets(game):
    _, ids, sequences, held = game
    yardstick = CRRLYardstick(sequences, ids, held)
    task = yardstick.anchor_tasks["normalized"]
    assert task.item_ids
    table = torch.randn(len(ids), 16) + 3.0  # a shared offset, so the centre matters
    cands, center = game_targets(table, ids, task.candidate_ids)
    rows = torch.tensor([ids.index(i) for i in task.item_ids])
    rewards = rank_reward(similarity_matrix(table[rows], cands, "centered_cosine", center),
                          torch.as_tensor(task.positive_weights) > 0)
    assert rewards == pytest.approx(list(yardstick.anchor_rewards(table, ids).values()), abs=1e-6)
    torch.testing.assert_close(center, table.mean(0))
    # the learners' loss reads the same similarities: its best candidate is the yardstick's best
    logits = centred_cosine_logits(table[rows], cands, center)
    torch.testing.assert_close(logits * headroom.TEMPERATURE,
                               similarity_matrix(table[rows], cands, "centered_cosine", table.mean(0)))


def test_the_learners_targets_equal_the_scoring_targets(game, monkeypatch):
    """With a refresh every step, the targets of every training step are game_targets of the learner's own table
    under its weights at that step, and the table it returns (the one scored) is its own table under the kept
    weights, whose validation score is the best check's."""
    catalogue, ids, sequences, held = game
    embedder = tiny_embedder(pooling="item_mean").eval()
    embedder.requires_grad_(False)
    encoder = game_encoder(embedder, catalogue, batch_size=8, prefix_cache_gb=0.1)
    index = CooccurrenceCandidates.from_sequences(sequences, ids, candidate_num=10, positive_score="cosine",
                                                  min_support=2)
    train_ids = sorted(set(index.items_with_positives()) - set(held))
    validation = CRRLYardstick(sequences, ids, train_ids[:4])
    seen, references = [], []

    def recording(table, table_ids, candidate_ids):
        seen.append(torch.equal(table, catalogue_table(encoder, None)))
        references.append(table)
        return game_targets(table, table_ids, candidate_ids)

    monkeypatch.setattr(headroom, "game_targets", recording)
    fit, fit_curve = CRRLYardstick(sequences, ids, train_ids[4:]), []
    table, stopper = train_learner(embedder, encoder, ids, train_ids[4:], index, validation, steps=4, batch_items=4,
                                   lr=3e-2, refresh_steps=1, patience=10, fit=fit, fit_curve=fit_curve)
    assert seen == [True] * 4
    assert not torch.allclose(references[0], references[-1])  # the learner moved, and its targets with it
    torch.testing.assert_close(table, catalogue_table(encoder, None))
    assert validation.score(table, ids)[SCORE] == pytest.approx(max(s for _, s in stopper.history))
    assert [s for s, _ in stopper.history] == [0, 1, 2, 3, 4]
    # the fit curve scores the learner's training items on the table of every check, the kept one included
    assert [s for s, _ in fit_curve] == [0, 1, 2, 3, 4]
    assert dict(fit_curve)[stopper.best_step] == pytest.approx(fit.score(table, ids)[SCORE])


def test_early_stopping_keeps_the_best_validation_check():
    stopper = EarlyStopping(patience=2)
    stops = [stopper.update(step, score, lambda step=step: f"weights@{step}")
             for step, score in zip((0, 10, 20, 30), (0.50, 0.60, 0.55, 0.58))]
    assert stops == [False, False, False, True]  # two checks without beating 0.60
    assert (stopper.best_step, stopper.best_score, stopper.best) == (10, 0.60, "weights@10")
    with pytest.raises(ValueError, match="--patience"):
        EarlyStopping(0)


def test_the_strict_reference_keeps_held_out_items_out_of_the_signal(game):
    from reaemb_trl.cooccurrence_projection import fit_linear_map

    _, ids, sequences, held = game
    held_rows = {ids.index(i) for i in held}
    strict, strict_rows = map_training_signal(sequences, ids, held, strict=True)
    loose, loose_rows = map_training_signal(sequences, ids, held, strict=False)
    assert strict and not held_rows & {r for a, p, _ in strict for r in (a, p)}
    assert not held_rows & set(strict_rows)  # the map's negatives and feature statistics come from these rows
    assert not held_rows & {a for a, _, _ in loose}  # anchors are never held out ...
    assert held_rows & {p for _, p, _ in loose} and set(loose_rows) == set(range(len(ids)))  # ... the rest may be
    # behaviour: the strict map does not change when the held-out items' features do; the non-strict one does
    features = torch.randn(len(ids), 12, generator=torch.Generator().manual_seed(0))
    moved = features.clone()
    moved[sorted(held_rows)] += 5.0 * torch.randn(len(held_rows), 12, generator=torch.Generator().manual_seed(1))
    def fit(f, signal, rows):
        return fit_linear_map(f, signal, rows, dim=4, steps=20, batch_size=16, negatives=7)

    torch.testing.assert_close(fit(features, strict, strict_rows), fit(moved, strict, strict_rows))
    assert not torch.allclose(fit(features, loose, loose_rows), fit(moved, loose, loose_rows))


def test_attribute_one_hot_reads_genres_and_year_buckets():
    items = [
        [{"key": "title", "value": "A"}, {"key": "year", "value": "1995"}, {"key": "genres", "value": "Comedy Drama"}],
        [("year", "1999"), ("genres", "Sci-Fi")],
        {"title": "no attributes we read"},
        [("year", "unknown"), ("genres", "Comedy")],
        [("year", "2001")],
    ]
    table, columns = attribute_one_hot(items)
    assert columns == ["genre:Comedy", "genre:Drama", "genre:Sci-Fi", "year:1995-1999", "year:2000-2004"]
    assert table.tolist() == [[1, 1, 0, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]]


def test_the_supervised_loss_reads_the_item_keys_thought_the_embedder_writes(items):
    """With `thought_keys: item` the learner's mu is the one the embedder's own encode path writes (the item mask
    reaches the module), so the learner plays the checkpoint's game, not one with every token as key."""
    from conftest import tiny_causal_lm, tiny_tokenizer
    from reaemb_trl.embedder import ThoughtEmbedder

    torch.manual_seed(5)
    embedder = ThoughtEmbedder(tiny_causal_lm(seed=5), tiny_tokenizer(), pooling="thought_eos",
                               thought_keys="item").eval()
    prefix_ids = embedder.prefix_ids(items[:4])
    d = embedder.thought_module.q_proj.in_features
    cands, center = torch.randn(4, 5, d), torch.randn(d)
    loss = supervised_loss(embedder, prefix_ids, cands, center, "module", [], NO_AUTOCAST)
    with torch.no_grad():
        prefix = embedder.encode_prefix(prefix_ids)
        emb = embedder.embed_from_thought(prefix, embedder.thought_module(prefix.hidden, prefix.mask,
                                                                          prefix.pool_mask))
    expected = torch.nn.functional.cross_entropy(centred_cosine_logits(emb.float(), cands, center),
                                                 torch.zeros(4, dtype=torch.long))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
