"""CRRL's policy maths and signal: fp32 thought, exact first-iteration ratio, the noisy-copy baseline, relative
sigma, popularity-normalised positives, the prefix store, and learning on held-out items with the recommended
settings."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from conftest import tiny_embedder
from reaemb_trl.candidates import CooccurrenceCandidates
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.crrl_policy import action_noise, action_scale, compute_advantages
from reaemb_trl.crrl_trainer import CRRLTrainer
from reaemb_trl.thought_module import LatentThoughtModule

ASSETS = Path(__file__).parent / "assets"

# What experiments/crrl_ablation.py supports on MovieLens-100k, scaled to the tiny fixture.
RECOMMENDED = dict(noise_scale=0.3, noise_scale_mode="relative", reward_funcs=["log_softmax"], reward_temperature=0.05,
                   similarity="centered_cosine", advantage_baseline="noisy", positive_score="cosine",
                   min_support=2, negative_sampling="popularity", reference_refresh_steps=2, antithetic=True)


def genre_world(users: int = 48, seed: int = 0):
    """The 48-item tiny catalogue (4 genres x 12); every user stays within one genre."""
    from reaemb_trl.data.canonical import read_items

    items = read_items(ASSETS / "tiny_catalog")
    by_genre: dict[str, list[str]] = {}
    for it in items:
        by_genre.setdefault(it["attributes"][2]["value"], []).append(it["item_id"])
    genres = sorted(by_genre)
    rng = random.Random(seed)
    seqs = {f"u{u}": rng.sample(by_genre[genres[u % len(genres)]], 8) for u in range(users)}
    return items, seqs


def config(tmp_path, **kwargs) -> CRRLConfig:
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=32, num_generations=8,
                    candidate_num=6, max_steps=2, logging_steps=1, use_cpu=True, save_strategy="no",
                    disable_tqdm=True, report_to="none")
    defaults.update(kwargs)
    return CRRLConfig(**defaults)


def test_thought_module_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    module = LatentThoughtModule(32)
    hidden, mask = torch.randn(3, 7, 32), torch.ones(3, 7, dtype=torch.bool)
    plain = module(hidden, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = module(hidden.bfloat16(), mask)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, module(hidden.bfloat16().float(), mask), rtol=0, atol=0)
    assert plain.dtype == torch.float32


def test_noisy_baseline_leaves_the_anchor_out():
    rewards = torch.tensor([[0.9], [0.1], [0.3], [0.5], [0.8], [0.2], [0.2], [0.2]])  # two groups of 4
    adv, _, zero = compute_advantages(rewards, torch.ones(1), 4, "none", baseline="noisy")
    noisy_mean = (0.1 + 0.3 + 0.5) / 3
    torch.testing.assert_close(adv[:4], torch.tensor([0.0, 0.1 - noisy_mean, 0.3 - noisy_mean, 0.5 - noisy_mean]))
    # the second group differs only in its anchor: TRL's group baseline would push the noisy copies along
    # their noise; the noisy baseline gives them nothing to follow
    assert torch.equal(adv[4:], torch.zeros(4)) and bool(zero[4:].all())
    group, _, _ = compute_advantages(rewards, torch.ones(1), 4, "none", baseline="group")
    assert (group[5:] != 0).all()
    scaled, _, _ = compute_advantages(rewards, torch.ones(1), 4, "group", baseline="noisy")
    std = torch.tensor([0.1, 0.3, 0.5]).std()
    torch.testing.assert_close(scaled[1], (0.1 - noisy_mean) / (std + 1e-4))


def test_relative_sigma_scales_with_mu_and_antithetic_pairs_mirror():
    mu = torch.randn(5, 64)
    sigma = action_scale(mu, 0.3, "relative")
    torch.testing.assert_close(sigma, 0.3 * mu.norm(dim=-1) / 8.0)
    torch.testing.assert_close(action_scale(3 * mu, 0.3, "relative"), 3 * sigma)
    assert torch.equal(action_scale(mu, 0.1, "absolute"), torch.full((5,), 0.1))
    eps = action_noise(0, "k", [0] * 6, list(range(6)), ["a"] * 6, 16, anchor_copy=True, antithetic=True)
    assert torch.equal(eps[0], torch.zeros(16))
    assert torch.equal(eps[2], -eps[1]) and torch.equal(eps[4], -eps[3]) and not torch.equal(eps[5], -eps[4])


def test_popularity_normalised_positives_on_a_hand_made_log():
    # "p" is everyone's item (popular); "a" co-occurs with "p" 4 times and with "b" twice, but "b" is rare
    seqs = {"u1": ["a", "p", "b", "h1", "h2"], "u2": ["a", "p", "b", "h1", "h2"], "u3": ["a", "p", "h1", "h2"],
            "u4": ["a", "p", "h1", "h2"], "u5": ["p", "c", "h1", "h2"], "u6": ["p", "c", "h1", "h2"],
            "u7": ["p", "d", "h1", "h2"], "u8": ["p", "e", "h1", "h2"]}
    ids = ["a", "b", "c", "d", "e", "p", "h1", "h2", "x1", "x2", "x3", "x4"]
    count = CooccurrenceCandidates.from_sequences(seqs, ids, candidate_num=4, positive_score="count")
    cosine = CooccurrenceCandidates.from_sequences(seqs, ids, candidate_num=4, positive_score="cosine")
    lift = CooccurrenceCandidates.from_sequences(seqs, ids, candidate_num=4, positive_score="lift", min_support=2)
    assert count.positives(["a"])[0][0] == ["p"]  # raw counts pick the popular item
    # cosine: a-p 4 / sqrt(4 * 8) = 0.707; a-b 2 / sqrt(4 * 2) = 0.707 -> tie broken by the larger count (p)
    (pos, score), = cosine.positives(["a"])
    assert pos == ["p"] and score[0] == pytest.approx(4 / math.sqrt(32))
    # lift: a-b 2 * 8 / (4 * 2) = 2.0 beats a-p 4 * 8 / (4 * 8) = 1.0
    (pos, score), = lift.positives(["a"])
    assert pos == ["b"] and score[0] == pytest.approx(2.0)
    # min_support drops pairs seen once: c co-occurs with p twice, d and e once
    assert lift.positives(["d"])[0][0] == []
    matched = CooccurrenceCandidates.from_sequences(seqs, ids, candidate_num=4, negative_sampling="popularity")
    negatives = matched.candidates(["c"], epoch=0)[0][0][1:]
    assert not {"p", "c"} & set(negatives) and len(set(negatives)) == 3


def _trainer(tmp_path, embedder, items, seqs, **kwargs):
    catalogue = Dataset.from_list(items)
    index = CooccurrenceCandidates.from_sequences(
        seqs, [it["item_id"] for it in items], candidate_num=kwargs.get("candidate_num", 6), holdout=2, seed=0,
        positive_score=kwargs.get("positive_score", "count"), min_support=kwargs.get("min_support", 1),
        negative_sampling=kwargs.get("negative_sampling", "uniform"))
    scorable = set(index.items_with_positives())
    train = catalogue.filter(lambda r: r["item_id"] in scorable)
    return CRRLTrainer(embedder, config(tmp_path, **kwargs), train_dataset=train, candidates=index, catalogue=catalogue)


def test_first_iteration_ratio_is_exactly_one(tmp_path):
    items, seqs = genre_world()
    trainer = _trainer(tmp_path, tiny_embedder(), items, seqs, max_steps=4, num_iterations=2, learning_rate=0.05,
                       noise_scale=0.3, noise_scale_mode="relative", bf16=True)
    trainer.train()
    history = trainer.state.log_history
    first = [h["policy/log_ratio_abs/iter1"] for h in history if "policy/log_ratio_abs/iter1" in h]
    second = [h["policy/log_ratio_abs/iter2"] for h in history if "policy/log_ratio_abs/iter2" in h]
    assert first and all(v == 0.0 for v in first)
    assert second and all(v > 0 for v in second)  # the update moved mu: the second iteration sees it
    moved = [h["policy/delta_mu_over_sigma/iter2"] for h in history if "policy/delta_mu_over_sigma/iter2" in h]
    assert moved and all(v > 0 for v in moved)


def test_prefix_store_gives_the_rollouts_and_the_reference_table_of_fresh_encoding(tmp_path):
    items, seqs = genre_world()
    base = tiny_embedder(seed=3)
    outs = {}
    for budget in (0.0, 1.0):
        trainer = _trainer(tmp_path, copy.deepcopy(base), items, seqs, prefix_cache_gb=budget,
                           reference_refresh_steps=1, similarity="centered_cosine")
        trainer.model.train()
        rows = [{"item_id": i, "attributes": next(it["attributes"] for it in items if it["item_id"] == i)}
                for i in ("0", "5") for _ in range(8)]
        trainer._generate_and_score_completions(rows)
        ids, table = trainer.catalogue_table()
        outs[budget] = (trainer._last_generation, table, trainer.encoder.prefix_store)
    (fresh, table0, none), (stored, table1, store) = outs[0.0], outs[1.0]
    assert none is None and len(store.rows) == len(items)
    torch.testing.assert_close(table1, table0, atol=1e-5, rtol=1e-4)
    for key in ("mu", "item_embeddings", "candidate_embeddings", "similarities"):
        torch.testing.assert_close(stored[key], fresh[key], atol=1e-5, rtol=1e-4, msg=key)
    reference = base.encode([it["attributes"] for it in items])
    torch.testing.assert_close(table1.cpu(), reference, atol=1e-5, rtol=1e-4)


def test_recommended_settings_raise_the_held_out_anchor_reward(tmp_path):
    """Users stay within a genre; CRRL trains on 75% of the items and must move the frozen yardstick on the other
    25%, which it never trains on: the module has to learn to write the genre, not to memorise items. Last-token
    pooling: with mean pooling over ~100 prompt tokens the two suffix tokens barely move the tiny model's
    embedding (docs/ablations.md measures this leverage on SmolLM2)."""
    from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items

    items, seqs = genre_world(users=96)
    ids = [it["item_id"] for it in items]
    held = held_out_items(ids, 0.25, seed=0)
    yardstick = CRRLYardstick(seqs, ids, held)
    catalogue = Dataset.from_list(items)
    index = CooccurrenceCandidates.from_sequences(seqs, ids, candidate_num=6, holdout=2, seed=0,
                                                  positive_score="cosine", min_support=2,
                                                  negative_sampling="popularity")
    train = catalogue.filter(lambda r: r["item_id"] in set(index.items_with_positives()) - set(held))
    args = config(tmp_path, **RECOMMENDED, candidate_num=6, max_steps=60, learning_rate=1e-2, num_iterations=1,
                  per_device_train_batch_size=64, num_generations=16)
    embedder = tiny_embedder(hidden=32, seed=0, pooling="last")
    llm_before = {k: v.clone() for k, v in embedder.model.state_dict().items()}
    trainer = CRRLTrainer(embedder, args, train_dataset=train, candidates=index, catalogue=catalogue,
                          eval_dataset=catalogue.filter(lambda r: r["item_id"] in set(held)), yardstick=yardstick)
    key = "eval_anchor_count_centered_cosine"
    before = trainer.evaluate()[key]
    trainer.train()
    after = trainer.evaluate()[key]
    assert after > before + 0.02, (before, after)
    assert all(torch.equal(llm_before[k], v) for k, v in embedder.model.state_dict().items())
    zero_std = [h["frac_reward_zero_std"] for h in trainer.state.log_history if "frac_reward_zero_std" in h]
    assert sum(zero_std) / len(zero_std) < 0.1  # the smooth reward gives every group a signal
