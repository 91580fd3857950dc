"""CRRL reward functions and similarities on hand-computed cases; the reward keyword contract."""

import dataclasses
import math

import pytest
import torch

from reaemb_trl.rewards import (
    CollaborativeTable,
    RewardInputs,
    collaborative_agreement_reward,
    log_softmax_reward,
    multi_positive_rank_reward,
    positive_ranks,
    rank_reward,
    resolve_reward,
    softmax_reward,
)
from reaemb_trl.similarity import SIMILARITIES, similarity_matrix


def test_rank_reward_hand_computed():
    sims = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.5, 0.1], [0.1, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # ranks of the positive: 0, 2, 3
    expected = [1 / math.log2(2), 1 / math.log2(4), 1 / math.log2(5)]
    assert rank_reward(similarities=sims, positive_mask=mask) == pytest.approx(expected)


def test_rank_reward_ties_count_against_the_positive():
    sims = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # row 0: two negatives tie with the positive -> rank 2; row 1: constant similarities -> the worst rank 3
    assert positive_ranks(sims, mask)[:, 0].tolist() == [2, 3]
    assert rank_reward(similarities=sims, positive_mask=mask) == pytest.approx([1 / math.log2(4), 1 / math.log2(5)])


def test_rank_reward_none_without_positive():
    sims = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    mask = torch.tensor([[0, 0], [0, 1]], dtype=torch.bool)
    assert rank_reward(similarities=sims, positive_mask=mask) == [None, pytest.approx(1.0)]


def test_multi_positive_rank_reward_weights():
    sims = torch.tensor([[0.9, 0.2, 0.5, 0.1, 0.7]])
    mask = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    weights = torch.tensor([[3.0, 1.0, 0, 0, 0]]) / 4  # counts 3 and 1
    # positive 0 ranks 0; positive 1 (0.2) has 0.9, 0.5, 0.7 above it -> rank 3
    expected = 0.75 / math.log2(2) + 0.25 / math.log2(5)
    got = multi_positive_rank_reward(similarities=sims, positive_mask=mask, positive_weights=weights)
    assert got == pytest.approx([expected])
    # two tied positives do not push each other down
    tied = torch.tensor([[0.5, 0.5, 0.1]])
    assert positive_ranks(tied, torch.tensor([[1, 1, 0]], dtype=torch.bool))[0, :2].tolist() == [0, 0]
    # with one positive it is the rank reward
    one = torch.tensor([[1, 0, 0, 0, 0]], dtype=torch.bool)
    assert multi_positive_rank_reward(similarities=sims, positive_mask=one) == rank_reward(similarities=sims, positive_mask=one)


def test_log_softmax_reward():
    sims = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.2, 0.4, 0.1]])
    mask = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.25, 0.75, 0.0]])
    got = log_softmax_reward(similarities=sims, positive_mask=mask, positive_weights=w, reward_temperature=0.5)
    log_z = math.log(math.exp(0.4) + math.exp(0.8) + math.exp(0.2))
    assert got[0] == pytest.approx(2 - math.log(math.exp(2) + 2)) and got[1] is None
    assert got[2] == pytest.approx(0.25 * (0.4 - log_z) + 0.75 * (0.8 - log_z))
    # it keeps rising where the softmax probability is already ~1 (no saturation)
    near, far = ([log_softmax_reward(similarities=torch.tensor([[s, 0.0]]), positive_mask=torch.tensor([[True, False]]),
                                     reward_temperature=0.05)[0] for s in (1.0, 1.2)])
    assert far > near


def test_softmax_reward():
    sims = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    got = softmax_reward(similarities=sims, positive_mask=mask, reward_temperature=0.5)
    p = math.exp(2) / (math.exp(2) + 2)
    assert got == [pytest.approx(p), None]
    two = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    w = torch.tensor([[0.25, 0.75, 0.0]])
    sims2 = torch.tensor([[1.0, 0.0, 0.0]])
    q = torch.tensor([math.exp(1), 1, 1]) / (math.exp(1) + 2)
    assert softmax_reward(similarities=sims2, positive_mask=two, positive_weights=w) == [pytest.approx(float(0.25 * q[0] + 0.75 * q[1]))]


def test_collaborative_agreement_reward(tmp_path):
    table = CollaborativeTable(["a", "b", "c", "d"], torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    path = tmp_path / "table.safetensors"
    table.save(path)
    loaded = CollaborativeTable.load(path)
    assert loaded.item_ids == ["a", "b", "c", "d"]
    # table similarities of a to (b, c, d): 1, 0, 0.5
    sims = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    got = collaborative_agreement_reward(
        similarities=sims,
        item_ids=["a", "a", "zz", "a"],
        candidate_ids=[["b", "c", "d"]] * 4,
        collaborative_table=loaded,
    )
    assert got[0] == pytest.approx(1.0)
    assert got[1] == pytest.approx(-1.0)
    assert got[2] is None  # item missing from the table
    assert got[3] is None  # constant similarities: correlation undefined
    with pytest.raises(ValueError, match="collaborative table"):
        collaborative_agreement_reward(similarities=sims, item_ids=["a"] * 4, candidate_ids=[["b", "c", "d"]] * 4)


def test_collaborative_agreement_centres_the_table_for_centred_cosine():
    """The table's similarities are of the same kind as the embedding's: centred cosine centres on the table's
    mean row (it was a dot product before)."""
    embeddings = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 2.5], [2.0, 1.5]])  # mean row (2, 2)
    table = CollaborativeTable(["a", "b", "c", "d"], embeddings)
    centred = torch.nn.functional.normalize(embeddings - embeddings.mean(0), dim=-1)
    target = centred[1:] @ centred[0]  # a against b, c, d: -1, -0.6, 0.6 (the dot products would rank d first)
    sims = target.unsqueeze(0).clone()
    got = collaborative_agreement_reward(similarities=sims, item_ids=["a"], candidate_ids=[["b", "c", "d"]],
                                         collaborative_table=table, similarity="centered_cosine")
    assert got[0] == pytest.approx(1.0)


def test_similarities_by_hand():
    items = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    cands = torch.tensor([[[3.0, 4.0], [0.0, -1.0]], [[1.0, 0.0], [2.0, 4.0]]])
    assert similarity_matrix(items, cands, "dot").tolist() == [[3.0, 0.0], [2.0, 12.0]]
    cosine = similarity_matrix(items, cands, "cosine")
    torch.testing.assert_close(cosine, torch.tensor([[0.6, 0.0], [0.5**0.5, 12 / (8**0.5 * 20**0.5)]]))
    center = torch.tensor([1.0, 1.0])
    centred = similarity_matrix(items, cands, "centered_cosine", center)
    torch.testing.assert_close(centred, similarity_matrix(items - center, cands - center, "cosine"))
    assert SIMILARITIES == ("dot", "cosine", "centered_cosine")
    with pytest.raises(ValueError, match="center"):
        similarity_matrix(items, cands, "centered_cosine")
    with pytest.raises(ValueError, match="similarity must be one of"):
        similarity_matrix(items, cands, "l2")


def test_reward_keywords_are_the_fields_and_the_dataset_columns():
    tensor = torch.zeros(2, 3)
    values = {f.name: f.name for f in dataclasses.fields(RewardInputs)}
    inputs = RewardInputs(**dict(values, similarities=tensor))
    rows = [{"item_id": "a", "attributes": "x", "similarity": "column"}, {"item_id": "b", "attributes": "y",
                                                                          "similarity": "column"}]
    kwargs = inputs.keywords(rows)
    assert set(kwargs) == set(values) | {"item_id", "attributes"}
    assert kwargs["attributes"] == ["x", "y"] and kwargs["similarity"] == "similarity"  # a field wins over a column
    assert kwargs["similarities"] is tensor  # passed, not copied


def test_resolve_reward_names_and_dotted_paths():
    assert resolve_reward("rank") is rank_reward
    assert resolve_reward("reaemb_trl.rewards:softmax_reward") is softmax_reward
    assert resolve_reward("reaemb_trl.rewards.softmax_reward") is softmax_reward
    with pytest.raises(ValueError, match=r"unknown reward 'nope': use a built-in name \(rank, .*\) or a dotted path"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="no attribute"):
        resolve_reward("reaemb_trl.rewards:nope")
