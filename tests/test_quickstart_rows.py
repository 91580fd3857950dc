"""experiments.quickstart_rows: the rank profile and the paired tests it prints, on hand-made ranks."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.quickstart_rows import first_value, per_user_ndcg, present_groups, rank_profile
from reaemb_trl.evaluation.significance import paired_tests


def test_rank_profile_counts_the_groups_targets_over_all_seeds():
    ranks = np.array([[1, 30, 400, 5], [12, 60, 2, 5]])  # 2 seeds x 4 users
    mask = np.array([True, True, False, True])
    popularity = np.array([100, 7, 50, 3])  # each user's target's count in the whole log
    profile = rank_profile(ranks, mask, popularity)
    assert profile["median_rank"] == pytest.approx(np.median([1, 30, 5, 12, 60, 5]))
    assert profile["top10"] == pytest.approx(3 / 6)
    assert profile["top50"] == pytest.approx(5 / 6)
    assert profile["hit_popularity"] == pytest.approx(np.median([100, 3, 3]))  # user 0 seed 0, user 3 both seeds
    assert profile["group_popularity"] == pytest.approx(np.median([100, 7, 3]))


def test_paired_tests_are_holm_corrected_within_a_group_and_skip_empty_groups():
    rng = np.random.default_rng(0)
    n = 60
    better = rng.uniform(0.2, 1.0, n)
    users = {"a": better, "b": np.zeros(n), "c": better.copy()}
    masks = {"all": np.ones(n, bool), "cold_item": np.zeros(n, bool), "head_item": np.arange(n) < 30}
    tests = paired_tests(users, [("a", "b"), ("a", "c")], present_groups(masks))
    assert {t["group"] for t in tests} == {"all", "head_item"}  # the empty cold group is left out
    by = {(t["group"], t["b"]): t for t in tests}
    assert by[("all", "b")]["p"] < 1e-6 and by[("all", "b")]["differing_users"] == n
    assert by[("all", "c")]["p"] == 1.0 and by[("all", "c")]["differing_users"] == 0
    # Holm over the two pairs of the group: the smaller p doubles
    assert by[("all", "b")]["p_holm"] == pytest.approx(min(1.0, 2 * by[("all", "b")]["p"]))
    assert by[("head_item", "b")]["users"] == 30
    assert by[("head_item", "b")]["mean_a"] == pytest.approx(better[:30].mean())


def test_per_user_ndcg_averages_the_seeds():
    ranks = np.array([[1, 11], [3, 1]])
    assert per_user_ndcg(ranks) == pytest.approx([(1.0 + 0.5) / 2, (0.0 + 1.0) / 2])


@pytest.mark.parametrize("attributes", [[{"key": "title", "value": "Heat"}, {"key": "year", "value": "1995"}],
                                        [("title", "Heat")], {"title": "Heat", "year": "1995"}])
def test_first_value_reads_every_attribute_layout(attributes):
    assert first_value(attributes) == "Heat"
