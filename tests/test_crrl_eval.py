"""The noise-free CRRL yardstick equals the rank reward computed by hand from the embeddings."""

import math

import torch

from conftest import ASSETS, tiny_embedder
from reaemb_trl.candidates import CooccurrenceCandidates
from reaemb_trl.crrl_eval import anchor_reward_from_table, mean_anchor_reward
from reaemb_trl.data.canonical import load_interactions, read_items


def test_anchor_reward_matches_hand_ranks():
    sequences = {"u1": ["a", "b", "c", "x", "y"], "u2": ["a", "b", "d", "x", "y"], "u3": ["c", "d", "e", "x", "y"]}
    ids = ["a", "b", "c", "d", "e", "x", "y"]
    index = CooccurrenceCandidates.from_sequences(sequences, ids, candidate_num=2, pos_num=1, holdout=2, seed=0)
    table = torch.randn(len(ids), 4)
    value = anchor_reward_from_table(table, ids, index, ["a", "e"])
    cand, _ = index.candidates(["a", "e"], epoch=0)
    expected = []
    for item, row in zip(["a", "e"], cand):
        sims = [float(table[ids.index(item)] @ table[ids.index(c)]) for c in row]
        rho = sum(s >= sims[0] for s in sims[1:])  # ties count against the positive
        expected.append(1 / math.log2(rho + 2))
    assert math.isclose(value, sum(expected) / 2, rel_tol=1e-6)


def test_mean_anchor_reward_embeds_items_and_candidates():
    embedder = tiny_embedder()
    folder = ASSETS / "tiny_catalog"
    items = read_items(folder)
    catalogue = {i["item_id"]: i["attributes"] for i in items}
    index = CooccurrenceCandidates.from_sequences(load_interactions(folder), list(catalogue), candidate_num=5)
    chosen = index.items_with_positives()[:6]
    value = mean_anchor_reward(embedder, index, catalogue, chosen)
    table = embedder.encode([catalogue[i] for i in catalogue])
    assert math.isclose(value, anchor_reward_from_table(table, list(catalogue), index, chosen), rel_tol=1e-5)
    assert 1 / math.log2(5 + 1) <= value <= 1.0
