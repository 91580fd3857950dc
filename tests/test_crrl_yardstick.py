"""The CRRL yardstick: anchor rewards by hand, the frozen definition, held-out items, validation pairs."""

import math

import torch

from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items

SEQUENCES = {
    "u1": ["a", "b", "c", "x", "y"],
    "u2": ["a", "b", "d", "x", "y"],
    "u3": ["c", "d", "e", "x", "y"],
    "u4": ["a", "e", "b", "z", "x"],
}
IDS = ["a", "b", "c", "d", "e", "x", "y", "z"] + [f"n{k}" for k in range(120)]


def hand_rank_reward(table, ids, item, row):
    sims = [float(table[ids.index(item)] @ table[ids.index(c)]) for c in row]
    rho = sum(s >= sims[0] for s in sims[1:])  # ties count against the positive
    return 1 / math.log2(rho + 2)


def test_anchor_rewards_match_hand_ranks():
    yardstick = CRRLYardstick(SEQUENCES, IDS, items=["a", "b", "c", "d", "e"])
    table = torch.randn(len(IDS), 4)
    for positive, task in yardstick.anchor_tasks.items():
        got = yardstick.anchor_rewards(table, IDS, positive, "dot")
        assert got and set(got) == set(task.item_ids)
        for item, row in zip(task.item_ids, task.candidate_ids):
            assert math.isclose(got[item], hand_rank_reward(table, IDS, item, row), rel_tol=1e-6)


def test_held_out_items_are_seeded_and_independent_of_order():
    items = [f"i{k}" for k in range(2000)]
    chosen = held_out_items(items, 0.2, seed=0)
    assert 0.17 < len(chosen) / len(items) < 0.23
    assert chosen == held_out_items(items, 0.2, seed=0)
    assert set(held_out_items(list(reversed(items)), 0.2, seed=0)) == set(chosen)
    assert set(held_out_items(items, 0.2, seed=1)) != set(chosen)
    assert held_out_items(items, 0.0) == []


def test_yardstick_scores_by_hand_and_its_definition_is_frozen():
    torch.manual_seed(0)
    yardstick = CRRLYardstick(SEQUENCES, IDS, items=["a", "b", "c", "d", "e"])
    count = yardstick.anchor_tasks["count"]
    # 10 candidates, the top raw-count positive first (training interactions only: x, y, z are held out)
    assert all(len(row) == 10 for row in count.candidate_ids)
    assert dict(zip(count.item_ids, (row[0] for row in count.candidate_ids)))["a"] == "b"
    assert not {"x", "y", "z"} & {row[0] for row in count.candidate_ids}
    table = torch.randn(len(IDS), 6)
    scores = yardstick.score(table, IDS)
    expected = [hand_rank_reward(table, IDS, item, row) for item, row in zip(count.item_ids, count.candidate_ids)]
    assert math.isclose(scores["anchor_count_dot"], sum(expected) / len(expected), rel_tol=1e-6)
    # centred cosine = cosine of the rows minus the table mean
    centred = table - table.mean(0)
    normed = torch.nn.functional.normalize(centred, dim=-1)
    expected = [hand_rank_reward(normed, IDS, item, row) for item, row in zip(count.item_ids, count.candidate_ids)]
    assert math.isclose(scores["anchor_count_centered_cosine"], sum(expected) / len(expected), rel_tol=1e-6)
    # the same candidates every time: the definition does not depend on anything but the data
    again = CRRLYardstick(SEQUENCES, IDS, items=["a", "b", "c", "d", "e"])
    assert again.anchor_tasks["count"].candidate_ids == count.candidate_ids
    assert again.pairs.candidate_ids == yardstick.pairs.candidate_ids


def test_per_item_anchor_rewards_are_the_ones_the_score_averages():
    yardstick = CRRLYardstick(SEQUENCES, IDS, items=["a", "b", "c", "d", "e"])
    table = torch.randn(len(IDS), 6)
    scores = yardstick.score(table, IDS)
    for positive in ("count", "normalized"):
        for kind in ("dot", "centered_cosine"):
            per_item = yardstick.anchor_rewards(table, IDS, positive, kind)
            assert set(per_item) == set(yardstick.anchor_tasks[positive].item_ids)
            assert math.isclose(sum(per_item.values()) / len(per_item), scores[f"anchor_{positive}_{kind}"],
                                rel_tol=1e-9)


def test_validation_pairs_use_the_validation_item_and_unseen_negatives():
    yardstick = CRRLYardstick(SEQUENCES, IDS, items=[])
    pairs = yardstick.pairs
    assert pairs.anchor_ids == ["c", "d", "e", "b"]  # seq[-3] of every user
    for user, anchor, row in zip(SEQUENCES, pairs.anchor_ids, pairs.candidate_ids):
        seq = SEQUENCES[user]
        assert row[0] == seq[-2] and len(row) == 100 and len(set(row)) == 100
        assert not set(row[1:]) & set(seq)
    # a table where each user's validation item sits next to its anchor ranks it first
    table = torch.zeros(len(IDS), len(IDS))
    for k in range(len(IDS)):
        table[k, k] = 1.0
    for anchor, row in zip(pairs.anchor_ids, pairs.candidate_ids):
        table[IDS.index(row[0]), IDS.index(anchor)] = 0.5
    assert yardstick.score(table, IDS)["pairs_dot"] == 1.0
