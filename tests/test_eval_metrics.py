import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reaemb_trl.data import RecDataset, make_item
from reaemb_trl.evaluation import full_ranks, leave_one_out, metrics_from_ranks, sample_negatives, sampled_ranks
from reaemb_trl.evaluation.tables import load_embedding_file


def test_full_ranks_ties_are_pessimistic_and_padding_ignored():
    # columns: 0 = pad, items 1..5
    scores = torch.tensor([[99.0, 0.5, 0.9, 0.5, 0.1, 0.5],   # target 1 ties with 3 and 5, below 2 -> rank 4
                           [99.0, 0.2, 0.9, 0.3, 0.1, 0.0],   # target 2 best -> rank 1
                           [99.0, 1.0, 1.0, 1.0, 1.0, 1.0]])  # all equal -> worst rank 5
    ranks = full_ranks(scores, torch.tensor([1, 2, 4]))
    assert ranks.tolist() == [4, 1, 5]


def test_full_ranks_exclude_history_keeps_target():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.1]])
    exclude = torch.tensor([[False, True, False, True, False]])  # history = items 1 and 3, target 3
    assert full_ranks(scores, torch.tensor([3]), exclude).tolist() == [2]  # only item 2 is above it


def test_metrics_by_hand():
    m = metrics_from_ranks([1, 3, 7, 15, 30], ks=(5, 10, 20))
    assert m["HR@5"] == pytest.approx(2 / 5) and m["HR@10"] == pytest.approx(3 / 5) and m["HR@20"] == pytest.approx(4 / 5)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 5)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / math.log2(16)) / 5)


def test_sampled_protocol():
    rng = np.random.default_rng(0)
    negs = sample_negatives(rng, num_items=200, forbidden=[1, 2, 3], n=100)
    assert len(set(negs)) == 100 and not set(negs) & {1, 2, 3} and min(negs) >= 1 and max(negs) <= 200
    with pytest.raises(ValueError):
        sample_negatives(rng, num_items=50, forbidden=[1], n=100)
    scores = torch.arange(10, dtype=torch.float).view(1, 10)  # item i scores i
    ranks = sampled_ranks(scores, torch.tensor([5]), torch.tensor([[1, 6, 8, 5 - 1]]))
    assert ranks.tolist() == [3]  # 6 and 8 above 5
    tie = torch.ones(1, 10)
    assert sampled_ranks(tie, torch.tensor([5]), torch.tensor([[1, 2, 3]])).tolist() == [4]


def test_leave_one_out_split():
    items = [make_item(i, [("t", i)]) for i in "abcde"]
    ds = RecDataset(items, {"u1": ["a", "b", "c", "d"], "u2": ["e", "a"], "u3": ["c", "d", "e"]})
    split = leave_one_out(ds)
    assert split.users == ["u1", "u2", "u3"]
    assert split.train == [[1, 2], [5, 1], [3]]  # u2 (< 3 items) is kept whole, in training only
    assert split.valid == [(0, [1, 2], 3), (2, [3], 4)]
    assert split.test == [(0, [1, 2, 3], 4), (2, [3, 4], 5)]
    assert split.train_popularity() == [0, 2, 1, 1, 0, 1]


def test_embedding_file_aligned_by_id(tmp_path):
    table = torch.arange(12, dtype=torch.float).view(4, 3)
    path = tmp_path / "t.safetensors"
    save_file({"embeddings": table}, str(path), metadata={"item_ids": json.dumps(["z", "x", "y", "extra"])})
    out = load_embedding_file(path, ["x", "y", "z"])
    assert torch.equal(out, table[[1, 2, 0]])
    with pytest.raises(ValueError, match="no embedding"):
        load_embedding_file(path, ["x", "missing"])
    save_file({"embeddings": table}, str(path))
    with pytest.raises(ValueError, match="no item ids"):
        load_embedding_file(path, ["x"])
