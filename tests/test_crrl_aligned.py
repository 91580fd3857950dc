"""CRRL sized and aligned with the yardstick: per-coordinate (spread) exploration and its diagonal Gaussian, the
low-rank thought delta, yardstick-like candidates, how many distinct items a run rolls out, and that the group size
does not redo prefix passes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from conftest import tiny_embedder
from reaemb_trl.candidates import CooccurrenceCandidates
from reaemb_trl.crrl_policy import gaussian_kl, gaussian_log_prob, thought_spread
from reaemb_trl.crrl_trainer import CRRLTrainer
from reaemb_trl.thought_delta import DELTA_FILE, lowrank_delta
from test_crrl_policy import config, genre_world


def _trainer(tmp_path, items, seqs, embedder=None, **kwargs):
    catalogue = Dataset.from_list(items)
    index = CooccurrenceCandidates.from_sequences(seqs, [it["item_id"] for it in items], candidate_num=6, seed=0)
    train = catalogue.filter(lambda r: r["item_id"] in set(index.items_with_positives()))
    return CRRLTrainer(embedder or tiny_embedder(), config(tmp_path, **kwargs), train_dataset=train,
                       candidates=index, catalogue=catalogue)


def _mu_of(embedder, items, ids):
    attrs = {it["item_id"]: it["attributes"] for it in items}
    prefix = embedder.encode_prefix(embedder.prefix_ids([attrs[i] for i in ids]))
    return embedder.thought_vector(prefix).float()


# ---- spread exploration --------------------------------------------------------------------------------------------
def test_diagonal_gaussian_log_prob_and_kl_by_hand():
    torch.manual_seed(0)
    z, mu, mu_ref = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    sigma = torch.rand(3, 5) + 0.1
    full = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)
    constant = -sigma.log().sum(-1) - 5 / 2 * math.log(2 * math.pi)  # fixed at the rollout: cancels in ratios
    torch.testing.assert_close(gaussian_log_prob(z, mu, sigma), full - constant)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma), torch.distributions.Normal(mu_ref, sigma))
    torch.testing.assert_close(gaussian_kl(mu, mu_ref, sigma), kl.sum(-1))
    # a per-row sigma still means one sigma for every coordinate
    row = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(gaussian_log_prob(z, mu, row), gaussian_log_prob(z, mu, row.unsqueeze(1).expand(3, 5)))


def test_spread_sigma_is_the_per_coordinate_std_of_mu_over_training_items(tmp_path):
    items, seqs = genre_world()
    trainer = _trainer(tmp_path, items, seqs, noise_scale=0.5, noise_scale_mode="spread")
    trainer.model.train()
    rows = [{"item_id": i, "attributes": items[int(i)]["attributes"]} for i in ("0", "5") for _ in range(8)]
    trainer._generate_and_score_completions(rows)
    gen = trainer._last_generation
    train_ids = list(trainer.train_dataset["item_id"])
    expected = 0.5 * _mu_of(trainer.embedder, items, train_ids).std(dim=0)
    assert gen["sigma"].shape == gen["mu"].shape
    torch.testing.assert_close(gen["sigma"][3], expected, atol=1e-5, rtol=1e-4)
    assert expected.std() > 0.1 * expected.mean()  # truly per coordinate on this fixture, not one number
    # z - mu of a noisy copy is sigma_j * eps_j, coordinate by coordinate
    torch.testing.assert_close(gen["actions"][3] - gen["mu"][3], gen["sigma"][3] * gen["eps"][3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gen["old_logps"], gaussian_log_prob(gen["actions"], gen["mu"], gen["sigma"]))
    assert torch.equal(thought_spread(torch.zeros(4, 3)), torch.full((3,), 1e-12))  # floored: 1 / sigma^2 finite


def test_spread_is_remeasured_with_the_reference_table_and_the_unchanged_policy_has_ratio_one(tmp_path):
    items, seqs = genre_world()
    trainer = _trainer(tmp_path, items, seqs, max_steps=4, num_iterations=2, learning_rate=0.05, noise_scale=0.5,
                       noise_scale_mode="spread", reference_refresh_steps=2, similarity="centered_cosine")
    measured = []
    original = trainer.encoder.thought_spread
    trainer.encoder.thought_spread = lambda ids: measured.append(trainer.state.global_step) or original(ids)
    trainer.train()
    assert measured == [0, 2]
    history = trainer.state.log_history
    first = [h["policy/log_ratio_abs/iter1"] for h in history if "policy/log_ratio_abs/iter1" in h]
    second = [h["policy/log_ratio_abs/iter2"] for h in history if "policy/log_ratio_abs/iter2" in h]
    assert first and all(v == 0.0 for v in first) and second and all(v > 0 for v in second)


# ---- the low-rank delta ----------------------------------------------------------------------------------------------
def test_lowrank_delta_starts_at_lrcl_trains_only_itself_and_saves_folded(tmp_path):
    from reaemb_trl.embedder import ThoughtEmbedder

    items, seqs = genre_world()
    base = tiny_embedder(seed=2)
    lrcl = copy.deepcopy(base.thought_module)
    trainer = _trainer(tmp_path, items, seqs, embedder=base, thought_trainable="lowrank", thought_delta_rank=2,
                       max_steps=2, num_iterations=1, learning_rate=0.05, noise_scale=0.5, weight_decay=0.1)
    module = trainer.embedder.thought_module
    ids = [str(i) for i in range(10)]
    prefix = base.encode_prefix(base.prefix_ids([items[int(i)]["attributes"] for i in ids]))
    assert torch.equal(module(prefix.hidden, prefix.mask), lrcl(prefix.hidden, prefix.mask))  # step 0 is LRCL
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"embedder.thought_module.v_proj.parametrizations.weight.0.down",
                         "embedder.thought_module.v_proj.parametrizations.weight.0.up"}
    frozen = {n: p.clone() for n, p in module.named_parameters() if p.requires_grad is False}
    delta = {n: p.clone() for n, p in lowrank_delta(module).named_parameters()}
    trainer.train()
    decay = [g["weight_decay"] for g in trainer.optimizer.param_groups if g["params"]]
    assert decay == [0.1]  # the factors are decayed by the optimizer's weight_decay
    assert all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)
    assert all(not torch.equal(p, delta[n]) for n, p in lowrank_delta(module).named_parameters())
    after = module(prefix.hidden, prefix.mask)
    assert not torch.allclose(after, lrcl(prefix.hidden, prefix.mask))
    assert torch.linalg.matrix_rank(module.v_proj.weight - lrcl.v_proj.weight) == 2
    # the checkpoint holds a plain thought module with the delta folded in; the factors resume exactly
    trainer.save_model(str(tmp_path / "final"))
    loaded = ThoughtEmbedder.from_pretrained(tmp_path / "final")
    torch.testing.assert_close(loaded.thought_module(prefix.hidden, prefix.mask), after, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "final" / DELTA_FILE).exists()
    # the state dict Trainer passes under ZeRO-3 / FSDP gives the same checkpoint
    trainer.model.save_pretrained(tmp_path / "gathered", state_dict=dict(trainer.model.state_dict()))
    gathered = ThoughtEmbedder.from_pretrained(tmp_path / "gathered").thought_module.state_dict()
    assert all(torch.equal(v, gathered[k]) for k, v in loaded.thought_module.state_dict().items())
    torch.testing.assert_close(module(prefix.hidden, prefix.mask), after, atol=0, rtol=0)  # saving left it intact
    resumed = _trainer(tmp_path, items, seqs, embedder=tiny_embedder(seed=2), thought_trainable="lowrank",
                       thought_delta_rank=2)
    resumed.model.load_checkpoint(tmp_path / "final")
    torch.testing.assert_close(resumed.embedder.thought_module(prefix.hidden, prefix.mask), after)


# ---- candidates that match the yardstick ------------------------------------------------------------------------------
@pytest.mark.parametrize("pos_num", [3, 5])
def test_uniform_negatives_with_several_cosine_positives_of_support_two(pos_num):
    items, seqs = genre_world(users=96)
    ids = [it["item_id"] for it in items]
    index = CooccurrenceCandidates.from_sequences(seqs, ids, candidate_num=10, pos_num=pos_num, seed=1,
                                                  positive_score="cosine", min_support=2, negative_sampling="uniform")
    for item in index.items_with_positives()[:12]:
        (cols, counts), = index.cooccurrence([item])
        a = index.index_of([item])[0]
        score = counts / np.sqrt(index.popularity[a] * index.popularity[cols])
        allowed = counts >= 2
        best = sorted(zip(-score[allowed], -counts[allowed], cols[allowed]))[:pos_num]
        cand, weights = index.candidates([item], epoch=0)
        k = int((weights[0] > 0).sum())
        assert k == min(pos_num, int(allowed.sum())) and cand[0][:k] == [ids[c] for _, _, c in best]
        np.testing.assert_allclose(weights[0][:k], [-s for s, _, _ in best] / -np.sum([s for s, _, _ in best]), rtol=1e-5)
        negatives = set(cand[0][k:])
        assert len(negatives) == 10 - k and not negatives & ({ids[c] for c in cols} | {item})


def test_popularity_proportional_negatives_follow_training_popularity():
    rng = np.random.default_rng(0)
    items = [f"i{k}" for k in range(60)]
    # "a" co-occurs only with "b"; item i{k} is in about k of the other users' sequences, i0 in none
    seqs = {f"u{u}": ["a", "b"] for u in range(10)}
    seqs.update({f"v{u}": [it for k, it in enumerate(items) if k and rng.random() < k / 80] for u in range(80)})
    ids = ["a", "b"] + items
    index = CooccurrenceCandidates.from_sequences(seqs, ids, candidate_num=4, pos_num=1, holdout=0, seed=3,
                                                  negative_sampling="popularity_proportional")
    drawn = np.zeros(len(ids))
    for epoch in range(300):
        (cand,), _ = index.candidates(["a"], epoch=epoch)
        drawn[index.index_of(cand[1:])] += 1
    (cols, _), = index.cooccurrence(["a"])
    assert drawn[index.index_of(["i0"])[0]] == 0 and drawn[cols].sum() == 0  # never popular-zero, never co-occurring
    pool = np.setdiff1d(np.arange(len(ids)), np.append(cols, 0))
    pop = index.popularity[pool]
    assert np.corrcoef(drawn[pool], pop)[0, 1] > 0.9


# ---- the budget: distinct items rolled out, and G without extra prefix passes -------------------------------------------
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_distinct_items_rolled_out(tmp_path, num_iterations):
    """TRL's RepeatSampler serves each generation batch num_iterations times: S steps of k items roll out
    S * k / num_iterations distinct items, each once."""
    items, seqs = genre_world()
    trainer = _trainer(tmp_path, items, seqs, max_steps=4, num_iterations=num_iterations, learning_rate=0.01,
                       noise_scale=0.5, per_device_train_batch_size=32, num_generations=8)  # k = 4 items a step
    rolled = []
    original = trainer._generate_and_score_completions

    def counting(inputs):
        rolled.extend(str(x["item_id"]) for x in inputs[:: trainer.num_generations])
        return original(inputs)

    trainer._generate_and_score_completions = counting
    trainer.train()
    assert len(rolled) == 4 * 4 // num_iterations and len(set(rolled)) == len(rolled)


@pytest.mark.parametrize("G", [8, 32])
def test_group_size_does_not_redo_prefix_passes(tmp_path, G):
    items, seqs = genre_world()
    trainer = _trainer(tmp_path, items, seqs, max_steps=2, num_iterations=1, learning_rate=0.01, noise_scale=0.5,
                       per_device_train_batch_size=4 * G, num_generations=G, reference_refresh_steps=1,
                       noise_scale_mode="spread")
    encoded = []
    original = trainer.embedder.encode_prefix
    trainer.embedder.encode_prefix = lambda ids, *a, **k: encoded.append(len(ids)) or original(ids, *a, **k)
    trainer.train()
    # every catalogue item's prefix is encoded exactly once in the run, whatever G (the store serves the rest)
    assert sum(encoded) == len(items)


# ---- selection and validation -------------------------------------------------------------------------------------
def test_the_run_is_selected_on_held_out_items_and_validation_pairs(tmp_path):
    from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items
    from reaemb_trl.embedder import ThoughtEmbedder

    items, seqs = genre_world(users=96)
    # validation pairs need 99 items the user never had: a catalogue of 148
    items = items + [{"item_id": f"x{k}", "attributes": [{"key": "title", "value": f"extra {k}"}]} for k in range(100)]
    ids = [it["item_id"] for it in items]
    held = held_out_items(ids, 0.25)
    catalogue = Dataset.from_list(items)
    index = CooccurrenceCandidates.from_sequences(seqs, ids, candidate_num=6, seed=0)
    args = config(tmp_path, max_steps=4, num_iterations=1, learning_rate=0.05, noise_scale=0.5,
                  eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                  load_best_model_at_end=True, metric_for_best_model="eval_selection", greater_is_better=True)
    trainer = CRRLTrainer(
        tiny_embedder(), args, candidates=index, catalogue=catalogue, yardstick=CRRLYardstick(seqs, ids, held),
        train_dataset=catalogue.filter(lambda r: r["item_id"] in set(index.items_with_positives()) - set(held)),
        eval_dataset=catalogue.filter(lambda r: r["item_id"] in set(held)))
    metrics = trainer.evaluate()
    assert metrics["eval_selection"] == pytest.approx(
        (metrics["eval_anchor_normalized_centered_cosine"] + metrics["eval_pairs_centered_cosine"]) / 2)
    trainer.train()
    scores = {h["step"]: h["eval_selection"] for h in trainer.state.log_history if "eval_selection" in h and h["step"]}
    best = max(scores, key=scores.get)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    kept = ThoughtEmbedder.from_pretrained(trainer.state.best_model_checkpoint).thought_module.state_dict()
    for name, value in trainer.embedder.thought_module.state_dict().items():
        assert torch.equal(value, kept[name]), name  # the run ends on its best checkpoint's thought module


def test_new_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match=r"CRRLConfig.thought_delta_rank must be >= 1, got 0"):
        config(tmp_path, thought_trainable="lowrank", thought_delta_rank=0)
    with pytest.raises(ValueError, match=r"CRRLConfig.noise_scale_mode must be one of .*'spread'"):
        config(tmp_path, noise_scale_mode="per_item")
    with pytest.raises(ValueError, match=r"CRRLConfig.negative_sampling must be one of .*'popularity_proportional'"):
        config(tmp_path, negative_sampling="proportional")


def test_item_span_keys_reach_the_rollout_and_the_policy_loss(tmp_path):
    """With a thought module that reads only the item's own tokens, the fast path's mu (rollout and loss) is the
    literal path's: the item-span mask travels with the cached prefix states."""
    from reaemb_trl.thought_module import LatentThoughtModule

    items, seqs = genre_world()
    base = tiny_embedder(seed=4)
    torch.manual_seed(0)
    base.thought_module = LatentThoughtModule(base.thought_module.hidden_size, keys="item")
    mus = {}
    for method in ("fast", "literal"):
        trainer = _trainer(tmp_path, items, seqs, embedder=copy.deepcopy(base), forward_method=method,
                           noise_scale=0.5)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        rows = [{"item_id": i, "attributes": items[int(i)]["attributes"]} for i in ("0", "5") for _ in range(8)]
        out = trainer._generate_and_score_completions(rows)
        out["first_use"] = torch.zeros_like(out["first_use"])  # compare with the rollout's own old log-prob
        trainer.compute_loss(trainer.model, out)
        assert trainer._metrics["train"]["policy/log_ratio_abs"][-1] < 1e-3  # the loss's mu is the rollout's
        mus[method] = trainer._last_generation["mu"]
    torch.testing.assert_close(mus["fast"], mus["literal"], atol=2e-5, rtol=1e-4)
    everything = LatentThoughtModule(base.thought_module.hidden_size)
    everything.load_state_dict(base.thought_module.state_dict())
    whole = _mu_of(base, items, ["0"])
    with torch.no_grad():
        prefix = base.encode_prefix(base.prefix_ids([items[0]["attributes"]]))
        assert not torch.allclose(whole, everything(prefix.hidden, prefix.mask))  # the option changes mu here


def test_fit_check_summary_lists_every_run_and_the_mean_of_their_changes(tmp_path):
    import json

    from experiments.crrl_fit_check import summarise

    paths = []
    for n, (held, trained) in enumerate([(0.04, 0.01), (-0.002, -0.009)]):
        result = {s: {"anchor_normalized_centered_cosine": {"lrcl": 0.5, "crrl": 0.5 + g, "gain": g},
                      "paired_wilcoxon": {"items": 10 if s == "held_out" else 30, "items_changed": 3, "p": 0.5}}
                  for s, g in (("held_out", held), ("trained", trained))}
        paths.append(tmp_path / f"fit{n}.json")
        paths[-1].write_text(json.dumps(result))
    table = summarise(paths).splitlines()
    assert len(table) == 2 + 2 + 1  # header, rule, one row per run, the mean
    assert "held-out (10)" in table[0] and "trained (30)" in table[0]
    assert "+0.0400" in table[2] and "-0.0090" in table[3]
    assert table[-1].startswith("| mean ± std | change +0.0190 ± 0.0297 (2 runs) | change +0.0005 ± 0.0134")


def test_fit_check_decomposition_moves_exactly_the_named_rows():
    import torch

    from experiments.crrl_fit_check import decomposition_tables, table_change

    lrcl = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    crrl = lrcl * 2 + 10  # rows moved apart, and the whole table shifted by 10 + 1.5
    parts = decomposition_tables({"lrcl": lrcl, "crrl": crrl}, ["a", "b", "c", "d"], ["b", "d"])
    # each table centred on its own mean first (LRCL's 1.5, CRRL's 13), so the shared shift is not a change
    assert parts["own rows moved"][:, 0].tolist() == [-1.5, -1.0, 0.5, 3.0]
    assert parts["other rows moved"][:, 0].tolist() == [-3.0, -0.5, 1.0, 1.5]
    assert lrcl[:, 0].tolist() == [0, 1, 2, 3]  # the inputs are not changed
    change = table_change({"lrcl": lrcl, "crrl": crrl})
    assert change["centred_norm_ratio"] == pytest.approx(2.0)
    assert change["mean_row_shift"] == pytest.approx(11.5 / 1.0)  # LRCL's mean centred-row norm is 1.0
