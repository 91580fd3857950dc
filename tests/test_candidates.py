"""Co-occurrence candidates: training interactions only, top-m positives, seeded never-co-occurring negatives."""

import numpy as np
import pytest

from reaemb_trl.candidates import CooccurrenceCandidates

SEQS = {
    "u1": ["a", "b", "c", "x", "y"],  # x, y are u1's validation and test targets
    "u2": ["a", "b", "d", "e", "f"],
    "u3": ["c", "d", "g", "h", "i"],
}
ITEMS = list("abcdefghixyz")


def test_counts_every_pair_of_training_interactions():
    index = CooccurrenceCandidates.from_sequences(SEQS, ITEMS, candidate_num=4, pos_num=2)
    (cols, counts), = index.cooccurrence(["a"])
    got = {ITEMS[c]: n for c, n in zip(cols.tolist(), counts.tolist())}
    assert got == {"b": 2, "c": 1, "d": 1}  # e, f, x, y are held out
    pos, pos_counts = index.positives(["a"])[0]
    assert pos == ["b", "c"] and pos_counts == [2, 1]  # ties broken by the smaller index


def test_held_out_items_are_never_positives():
    index = CooccurrenceCandidates.from_sequences(SEQS, ITEMS, candidate_num=5, pos_num=3)
    held_out = {i for s in SEQS.values() for i in s[-2:]}
    for item in ITEMS:
        ids, weights = index.candidates([item], epoch=0)
        positives = {c for c, w in zip(ids[0], weights[0]) if w > 0}
        assert not positives & held_out, item
    # an item seen only in held-out positions has no positives at all
    ids, weights = index.candidates(["x"], epoch=0)
    assert weights.sum() == 0


def test_negatives_never_cooccur_and_are_seeded_per_epoch():
    rng = np.random.default_rng(0)
    items = [f"i{k}" for k in range(200)]
    seqs = {f"u{u}": list(rng.choice(items, 12, replace=False)) for u in range(60)}
    index = CooccurrenceCandidates.from_sequences(seqs, items, candidate_num=10, pos_num=1, seed=7)
    item = index.items_with_positives()[0]
    (cols, _), = index.cooccurrence([item])
    co = {items[c] for c in cols.tolist()}
    ids, weights = index.candidates([item], epoch=0)
    assert weights[0, 0] == 1.0 and weights[0, 1:].sum() == 0
    negatives = ids[0][1:]
    assert len(set(negatives)) == 9 and item not in negatives and not set(negatives) & co
    # deterministic given (seed, epoch, item), whatever the batch
    again, _ = index.candidates([items[5], item, items[9]], epoch=0)
    assert again[1] == ids[0]
    other_epoch, _ = index.candidates([item], epoch=1)
    assert other_epoch[0][0] == ids[0][0] and other_epoch[0][1:] != negatives


def test_dense_rows_fall_back_to_least_cooccurring():
    seqs = {"u1": ["a", "b", "c", "d", "p", "q"], "u2": ["a", "b", "e", "p", "q"]}
    index = CooccurrenceCandidates.from_sequences(seqs, list("abcde"), candidate_num=4, pos_num=1)
    ids, weights = index.candidates(["a"], epoch=0)
    assert ids[0][0] == "b" and sorted(ids[0][1:]) == ["c", "d", "e"]
    with pytest.raises(ValueError, match="at least"):
        CooccurrenceCandidates.from_sequences(seqs, list("abc"), candidate_num=4)
