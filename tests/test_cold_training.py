"""Cold items through CRRL (builders.build_crrl_trainer): on a hand-made log, no cold item reaches the candidates'
co-occurrence counts, positives, negatives, CRRL's catalogue, training or held-out items, or the yardstick; with no
cold items the candidates are those of the whole log."""

import numpy as np
import pytest

import reaemb_trl.crrl_trainer
from reaemb_trl.builders import DataArguments, build_crrl_trainer
from reaemb_trl.candidates import CooccurrenceCandidates
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items
from reaemb_trl.data import RecDataset, cold_item_ids, make_item

# The items of the log, and items nobody had (the yardstick's validation pairs need 99 negatives per user).
ITEM_IDS = list("abcdefghijklmn") + [f"z{n:03d}" for n in range(100)]
# Chronological; each user's last two items are the validation and test targets. `c` would be a's top positive
# (4 users have both in training), `h` sits in u7's training part; u2's and u5's validation targets are cold; u6's
# training part is all cold.
LOG = {
    "u1": list("acbdef"),
    "u2": list("acbghi"),
    "u3": list("acjkl"),
    "u4": list("camne"),
    "u5": list("defcg"),
    "u6": list("cab"),
    "u7": list("ghijkm"),
    "u8": list("cd"),
}
COLD = {"c", "h"}
# Training parts without c and h, as the counts must see them.
WARM_TRAINING = {"u1": "abd", "u2": "abg", "u3": "aj", "u4": "am", "u5": "def", "u7": "gij"}


def dataset() -> RecDataset:
    return RecDataset(items=[make_item(i, [("title", f"item {i}")]) for i in ITEM_IDS],
                      sequences={u: list(s) for u, s in LOG.items()})


def config(tmp_path, **kwargs) -> CRRLConfig:
    return CRRLConfig(**{"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none",
                         "lrcl_checkpoint": "unused", "candidate_num": 4, "pos_num": 1, "positive_score": "count",
                         "min_support": 1, "eval_item_fraction": 0.3, "eval_item_seed": 1, **kwargs})


@pytest.fixture
def built(monkeypatch):
    """build_crrl_trainer with the trainer replaced by a recorder of what it is given (no model is loaded)."""
    monkeypatch.setattr(reaemb_trl.crrl_trainer, "CRRLTrainer", lambda **given: given)

    def build(tmp_path, data_args=DataArguments(dataset="unused"), cold=None, **kwargs):
        return build_crrl_trainer(data_args, config(tmp_path, **kwargs), dataset(), cold_items=cold)

    return build


def assert_no_cold_item_anywhere(given: dict, cold: set[str]) -> None:
    candidates: CooccurrenceCandidates = given["candidates"]
    assert cold.isdisjoint(candidates.item_ids)  # the universe: no count, positive or negative can name them
    assert cold.isdisjoint(given["catalogue"]["item_id"])
    assert cold.isdisjoint(given["train_dataset"]["item_id"])
    assert given["eval_dataset"] is not None and cold.isdisjoint(given["eval_dataset"]["item_id"])
    warm = list(candidates.item_ids)
    for cols, _ in candidates.cooccurrence(warm):
        assert cold.isdisjoint(candidates.item_ids[c] for c in cols)
    for positives, _ in candidates.positives(warm):
        assert cold.isdisjoint(positives)
    for epoch in range(5):
        ids, _ = candidates.candidates(warm, epoch=epoch)
        assert all(cold.isdisjoint(row) for row in ids)
    yardstick: CRRLYardstick = given["yardstick"]
    for task in yardstick.anchor_tasks.values():
        assert cold.isdisjoint(task.item_ids) and all(cold.isdisjoint(row) for row in task.candidate_ids)
    assert cold.isdisjoint(yardstick.pairs.anchor_ids)
    assert all(cold.isdisjoint(row) for row in yardstick.pairs.candidate_ids)


def test_cold_items_never_reach_crrl(tmp_path, built):
    given = built(tmp_path, cold=COLD)
    assert_no_cold_item_anywhere(given, COLD)
    candidates = given["candidates"]
    # the counts are those of the warm training parts: users per item, and a's positive is b (2 users), not c (4)
    users_of = {i: sum(i in part for part in WARM_TRAINING.values()) for i in candidates.item_ids}
    assert dict(zip(candidates.item_ids, candidates.popularity.tolist())) == users_of
    assert candidates.positives(["a"]) == [(["b"], [2])]
    assert set(given["train_dataset"]["item_id"]) <= {i for part in WARM_TRAINING.values() for i in part}
    assert sorted(given["eval_dataset"]["item_id"]) == sorted(held_out_items(candidates.item_ids, 0.3, 1))
    # the yardstick scores a table of the warm catalogue: u2 and u5, whose validation targets (h, c) are cold, have
    # no pair, nor have u6 and u8 (no training part); u7's anchor is its last warm training item
    pairs = given["yardstick"].pairs
    assert list(zip(pairs.anchor_ids, [row[0] for row in pairs.candidate_ids])) == [
        ("d", "e"), ("j", "k"), ("m", "n"), ("j", "k")]


def test_the_log_would_show_a_leak(tmp_path, built):
    # without cold items, c is a's top positive: the assertions above are not vacuous
    candidates = built(tmp_path, cold=set())["candidates"]
    assert candidates.positives(["a"]) == [(["c"], [4])]
    assert "c" in candidates.item_ids and "h" in candidates.item_ids


def test_cold_share_from_data_arguments_is_the_evaluations_draw(tmp_path, built):
    data_args = DataArguments(dataset="unused", cold_items=0.25, cold_item_seed=3)
    cold = set(cold_item_ids(ITEM_IDS, 0.25, 3))
    assert len(cold) == 29 and cold & set("abcdefghijklmn")
    given = built(tmp_path, data_args=data_args)
    assert sorted(given["catalogue"]["item_id"]) == sorted(set(ITEM_IDS) - cold)
    assert_no_cold_item_anywhere(given, cold)


def test_no_cold_items_gives_the_candidates_of_the_whole_log(tmp_path, built):
    given = built(tmp_path)  # DataArguments' default share: 0
    args = config(tmp_path)
    before = CooccurrenceCandidates.from_sequences(
        LOG, ITEM_IDS, candidate_num=args.candidate_num, pos_num=args.pos_num, holdout=args.holdout,
        seed=args.negative_seed, positive_score=args.positive_score, min_support=args.min_support,
        negative_sampling=args.negative_sampling)
    now = given["candidates"]
    assert now.item_ids == before.item_ids
    for name in ("item_users_ptr", "item_users", "user_items_ptr", "user_items"):
        np.testing.assert_array_equal(getattr(now, name), getattr(before, name))
    for epoch in range(3):
        ids, weights = now.candidates(ITEM_IDS, epoch)
        ids_before, weights_before = before.candidates(ITEM_IDS, epoch)
        assert ids == ids_before
        np.testing.assert_array_equal(weights, weights_before)
    assert list(given["catalogue"]["item_id"]) == ITEM_IDS
    held = sorted(held_out_items(ITEM_IDS, 0.3, 1))
    assert sorted(given["eval_dataset"]["item_id"]) == held
    assert sorted(given["train_dataset"]["item_id"]) == sorted(set(before.items_with_positives()) - set(held))
    yardstick = CRRLYardstick(LOG, ITEM_IDS, held, args.holdout)
    assert given["yardstick"].pairs == yardstick.pairs
    for name, task in yardstick.anchor_tasks.items():
        mine = given["yardstick"].anchor_tasks[name]
        assert (mine.item_ids, mine.candidate_ids) == (task.item_ids, task.candidate_ids)
        np.testing.assert_array_equal(mine.positive_weights, task.positive_weights)


def test_the_crrl_recipe_takes_the_cold_share(tmp_path, built):
    import signal
    from pathlib import Path

    from reaemb_trl.preflight import parse_recipe_args

    config = Path(__file__).parent.parent / "recipes" / "configs" / "crrl_tiny.yaml"
    args = ["--config", str(config), "--output_dir", str(tmp_path), "--cold_items", "0.25", "--cold_item_seed", "3"]
    before = signal.getsignal(signal.SIGTERM)
    try:
        data_args, _ = parse_recipe_args(DataArguments, CRRLConfig, args=args)
    finally:  # the recipes' loader installs a SIGTERM handler; leave the test process as it was
        signal.signal(signal.SIGTERM, before)
    assert (data_args.cold_items, data_args.cold_item_seed) == (0.25, 3)
    given = built(tmp_path, data_args=data_args)
    assert_no_cold_item_anywhere(given, set(cold_item_ids(ITEM_IDS, 0.25, 3)))
