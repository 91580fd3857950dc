"""Co-occurrence candidates for CRRL (docs/method.md, "CRRL"): top-m co-occurring positives plus never-co-occurring
negatives.

    index = CooccurrenceCandidates.from_sequences(user_sequences, candidate_num=10, pos_num=1, seed=42)
    ids, weights = index.candidates(["item_7", "item_9"], epoch=0)   # (2, 10) ids, (2, 10) positive weights

- Counts come from *training* interactions only: each user's last `holdout` (default 2) items are the validation
  and test targets downstream and are dropped before counting (**fix**: the reference code counted them).
- `count(a, b)` = the number of users whose training sequence contains both a and b (a != b): every pair of a
  sequence counts, not only neighbours; a user who repeats an item counts once.
- Positives of a: the `pos_num` items with the largest score among those with count >= `min_support` (ties: the
  larger count, then the smaller internal index), weighted by `score_b / sum of the positives' scores`. Scores
  (`positive_score`): `count` (the paper's raw count), or popularity-normalised - `cosine` = count / sqrt(n_a n_b),
  `lift` = count U / (n_a n_b), with n the number of training users of an item and U the number of users. Raw
  counts favour the most popular items (on MovieLens-100k a quarter of all items share one top positive), which
  turns the reward into a popularity test.
- Negatives of a: `candidate_num - #positives` distinct items that never co-occur with a (and are not a), drawn
  afresh for every epoch and deterministic given (seed, epoch, item id) - the batch an item lands in, the process
  and the order of calls do not matter. `negative_sampling`: `uniform` over those items (the paper's), or
  `popularity` - drawn among the items closest in popularity to a's first positive, so that no candidate stands
  out by popularity alone, or `popularity_proportional` - drawn without replacement with probability proportional
  to the item's training popularity (items no training user had are never drawn; if fewer than needed have any,
  the draw is uniform). If fewer never-co-occurring items exist than needed, the rest are the least co-occurring
  items.

Building the index sorts the interactions once (numpy, no scipy); co-occurrence rows are computed on demand for
the items of a batch, so the full item x item matrix (often 10^8 non-zeros) is never materialised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

POSITIVE_SCORES = ("count", "cosine", "lift")
NEGATIVE_SAMPLING = ("uniform", "popularity", "popularity_proportional")


def stable_hash(value: object) -> int:
    """A 63-bit hash of str(value) that does not change between processes (unlike `hash`)."""
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def training_prefix(sequence: Sequence, holdout: int = 2) -> Sequence:
    """A user's training interactions: the sequence without its last `holdout` items."""
    return sequence[: max(len(sequence) - holdout, 0)]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each pair, vectorised."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(total, dtype=np.int64)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is several times slower on 10^6+ int64 keys)."""
    values = np.sort(values)
    if len(values) == 0:
        return values
    return values[np.concatenate([[True], values[1:] != values[:-1]])]


@dataclass
class CooccurrenceCandidates:
    """Sparse user-item index answering 'candidates of these items for this epoch'."""

    item_ids: list[str]  # internal index -> item id
    item_users_ptr: np.ndarray  # (I + 1,) CSR over items
    item_users: np.ndarray  # users of each item (training interactions, deduplicated)
    user_items_ptr: np.ndarray  # (U + 1,) CSR over users
    user_items: np.ndarray  # items of each user
    candidate_num: int = 10
    pos_num: int = 1
    seed: int = 0
    positive_score: str = "count"
    min_support: int = 1
    negative_sampling: str = "uniform"

    def __post_init__(self):
        if self.candidate_num < 1 or not 0 <= self.pos_num <= self.candidate_num:
            raise ValueError(
                f"need candidate_num >= 1 and 0 <= pos_num <= candidate_num, got {self.candidate_num}, {self.pos_num}"
            )
        if self.positive_score not in POSITIVE_SCORES:
            raise ValueError(f"positive_score must be one of {POSITIVE_SCORES}, got {self.positive_score!r}")
        if self.negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(f"negative_sampling must be one of {NEGATIVE_SAMPLING}, got {self.negative_sampling!r}")
        if self.min_support < 1:
            raise ValueError(f"min_support must be >= 1, got {self.min_support}")
        if self.candidate_num > len(self.item_ids) - 1:
            raise ValueError(
                f"candidate_num={self.candidate_num} needs at least {self.candidate_num + 1} items, "
                f"the catalogue has {len(self.item_ids)}"
            )
        self._index = {item: i for i, item in enumerate(self.item_ids)}
        self.popularity = np.diff(self.item_users_ptr)  # training users per item
        self.num_users = int(self.user_items_ptr.shape[0] - 1)
        order = np.lexsort((np.arange(self.num_items), self.popularity))  # by popularity, then index
        self._by_popularity = order
        self._popularity_rank = np.empty(self.num_items, dtype=np.int64)
        self._popularity_rank[order] = np.arange(self.num_items)

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_sequences(
        cls,
        sequences: Mapping[str, Sequence[str]],
        item_ids: Iterable[str] | None = None,
        *,
        candidate_num: int = 10,
        pos_num: int = 1,
        holdout: int = 2,
        seed: int = 0,
        **options,
    ) -> "CooccurrenceCandidates":
        """Index user sequences (`{user: [item, ...]}`, chronological). `item_ids` is the candidate universe (every
        item that may be drawn; default: every item seen in any sequence, held-out positions included). Items of
        the sequences outside `item_ids` are ignored."""
        if holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {holdout}")
        if item_ids is None:
            universe = sorted({str(i) for seq in sequences.values() for i in seq})
        else:
            universe = list(dict.fromkeys(str(i) for i in item_ids))
        index = {item: i for i, item in enumerate(universe)}
        users, items = [], []
        for u, seq in enumerate(sequences.values()):
            train = [index[s] for s in map(str, training_prefix(list(seq), holdout)) if s in index]
            users.extend([u] * len(train))
            items.extend(train)
        num_users = len(sequences)
        users_a = np.asarray(users, dtype=np.int64)
        items_a = np.asarray(items, dtype=np.int64)
        return cls.from_arrays(users_a, items_a, universe, num_users, candidate_num=candidate_num, pos_num=pos_num,
                               seed=seed, **options)

    @classmethod
    def from_arrays(
        cls,
        users: np.ndarray,
        items: np.ndarray,
        item_ids: Sequence[str],
        num_users: int | None = None,
        *,
        candidate_num: int = 10,
        pos_num: int = 1,
        seed: int = 0,
        **options,
    ) -> "CooccurrenceCandidates":
        """Index (user, item) pairs that are already training-only integer arrays (items index `item_ids`).
        `options`: positive_score, min_support, negative_sampling."""
        num_items = len(item_ids)
        num_users = int(users.max()) + 1 if num_users is None and len(users) else (num_users or 0)
        keys = _sorted_unique(users.astype(np.int64) * num_items + items.astype(np.int64))  # dedupe (user, item)
        u, i = keys // num_items, keys % num_items
        user_ptr = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(u, minlength=num_users), out=user_ptr[1:])
        order = np.argsort(i, kind="stable")  # keys are sorted by user, so users stay sorted within an item
        item_ptr = np.zeros(num_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(i, minlength=num_items), out=item_ptr[1:])
        return cls(
            item_ids=[str(x) for x in item_ids],
            item_users_ptr=item_ptr,
            item_users=u[order],
            user_items_ptr=user_ptr,
            user_items=i,
            candidate_num=candidate_num,
            pos_num=pos_num,
            seed=seed,
            **options,
        )

    # ---- queries ----------------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def index_of(self, item_ids: Sequence[str]) -> np.ndarray:
        try:
            return np.asarray([self._index[str(i)] for i in item_ids], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"item {exc.args[0]!r} is not in the candidate index") from None

    def cooccurrence(self, item_ids: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each item: (co-occurring item indices sorted ascending, their counts), the item itself excluded."""
        idx = self.index_of(item_ids)
        rows = np.arange(len(idx))
        u_start, u_end = self.item_users_ptr[idx], self.item_users_ptr[idx + 1]
        users = self.item_users[_ranges(u_start, u_end)]
        user_row = np.repeat(rows, u_end - u_start)
        i_start, i_end = self.user_items_ptr[users], self.user_items_ptr[users + 1]
        partners = self.user_items[_ranges(i_start, i_end)]
        partner_row = np.repeat(user_row, i_end - i_start)
        keys = np.sort(partner_row * self.num_items + partners)
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else np.zeros(0, np.int64)
        counts = np.diff(np.append(starts, len(keys)))
        keys = keys[starts]
        key_row, key_item = keys // self.num_items, keys % self.num_items
        keep = key_item != idx[key_row]
        key_row, key_item, counts = key_row[keep], key_item[keep], counts[keep]
        bounds = np.searchsorted(key_row, np.arange(len(idx) + 1))
        return [(key_item[bounds[r] : bounds[r + 1]], counts[bounds[r] : bounds[r + 1]]) for r in rows]

    def scores(self, item: int, cols: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The positive score of each co-occurring item `cols` of internal item `item` (see `positive_score`)."""
        if self.positive_score == "count":
            return counts.astype(np.float64)
        both = self.popularity[item].astype(np.float64) * self.popularity[cols]
        if self.positive_score == "cosine":
            return counts / np.sqrt(both)
        return counts * float(self.num_users) / both

    def _top_positives(self, item: int, cols: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(internal indices, scores) of the positives of `item`, best first."""
        keep = counts >= self.min_support
        cols, counts = cols[keep], counts[keep]
        score = self.scores(item, cols, counts)
        top = np.lexsort((cols, -counts, -score))[: self.pos_num]
        return cols[top], score[top]

    def positives(self, item_ids: Sequence[str]) -> list[tuple[list[str], list[float]]]:
        """For each item: its top `pos_num` positives and their scores (best first; scores are counts with the
        default `positive_score`)."""
        out = []
        for item, (cols, counts) in zip(self.index_of(item_ids), self.cooccurrence(item_ids)):
            pos, score = self._top_positives(int(item), cols, counts)
            scores = score.tolist() if self.positive_score != "count" else [int(v) for v in score]
            out.append(([self.item_ids[c] for c in pos], scores))
        return out

    def negatives(self, item_id: str, count: int, epoch: int, cooccurring: np.ndarray, counts: np.ndarray,
                  anchor: int | None = None) -> np.ndarray:
        """`count` distinct never-co-occurring item indices, deterministic given (seed, epoch, item id). With
        `negative_sampling="popularity"` they are drawn among the items nearest in popularity to `anchor` (an
        internal index, the first positive); with `popularity_proportional`, in proportion to training popularity."""
        me = self._index[str(item_id)]
        excluded = np.union1d(cooccurring, [me])
        rng = np.random.default_rng([self.seed, epoch, stable_hash(item_id)])
        pool_size = self.num_items - len(excluded)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        if self.negative_sampling == "popularity" and anchor is not None and pool_size >= count:
            return self._popularity_matched(anchor, count, excluded, rng)
        if self.negative_sampling == "popularity_proportional":
            pool = np.setdiff1d(np.arange(self.num_items), excluded, assume_unique=True)
            weight = self.popularity[pool].astype(np.float64)
            if np.count_nonzero(weight) >= count:
                return rng.choice(pool, size=count, replace=False, p=weight / weight.sum()).astype(np.int64)
        if pool_size >= 4 * count:  # sparse row: rejection sampling, cheap
            picked: list[int] = []
            while len(picked) < count:
                draw = rng.integers(0, self.num_items, size=2 * count + 8)
                draw = draw[~np.isin(draw, excluded)]
                for d in draw.tolist():
                    if d not in picked:
                        picked.append(d)
                        if len(picked) == count:
                            break
            return np.asarray(picked, dtype=np.int64)
        pool = np.setdiff1d(np.arange(self.num_items), excluded, assume_unique=True)
        chosen = rng.choice(pool, size=min(count, len(pool)), replace=False) if len(pool) else pool
        if len(chosen) < count:  # dense row: fill with the least co-occurring items
            fill = cooccurring[np.lexsort((cooccurring, counts))][: count - len(chosen)]
            chosen = np.concatenate([chosen, fill])
        return chosen.astype(np.int64)

    def _popularity_matched(self, anchor: int, count: int, excluded: np.ndarray, rng) -> np.ndarray:
        """`count` items drawn from the smallest window of popularity ranks around `anchor` that holds at least
        3 x count allowed items (fewer when the catalogue runs out)."""
        rank = int(self._popularity_rank[anchor])
        width = 2 * count
        while True:
            low, high = max(0, rank - width), min(self.num_items, rank + width + 1)
            window = self._by_popularity[low:high]
            allowed = window[~np.isin(window, excluded)]
            if len(allowed) >= 3 * count or (low == 0 and high == self.num_items):
                break
            width *= 2
        return rng.choice(allowed, size=min(count, len(allowed)), replace=False).astype(np.int64)

    def candidates(self, item_ids: Sequence[str], epoch: int = 0) -> tuple[list[list[str]], np.ndarray]:
        """Candidate ids (B lists of `candidate_num`, positives first) and positive weights (B, candidate_num):
        score_b / sum of the positives' scores on positive slots, 0 on negatives. An item without a positive gets
        only negatives (all-zero weights; rank rewards return None for it)."""
        rows = self.cooccurrence(item_ids)
        ids_out, weights = [], np.zeros((len(item_ids), self.candidate_num), dtype=np.float32)
        for r, (item, internal, (cols, counts)) in enumerate(zip(item_ids, self.index_of(item_ids), rows)):
            pos, score = self._top_positives(int(internal), cols, counts)
            anchor = int(pos[0]) if len(pos) else None
            neg = self.negatives(item, self.candidate_num - len(pos), epoch, cols, counts, anchor)
            ids_out.append([self.item_ids[c] for c in np.concatenate([pos, neg]).tolist()])
            if len(pos):
                weights[r, : len(pos)] = score / score.sum()
        return ids_out, weights

    def items_with_positives(self) -> list[str]:
        """Items with at least one positive (a co-occurring item with count >= min_support): the ones a rank
        reward can score."""
        if self.min_support <= 1:
            user_len = np.diff(self.user_items_ptr)
            hits = np.zeros(len(self.item_users) + 1, dtype=np.int64)
            np.cumsum(user_len[self.item_users] >= 2, out=hits[1:])
            counts = hits[self.item_users_ptr[1:]] - hits[self.item_users_ptr[:-1]]
            return [self.item_ids[i] for i in np.flatnonzero(counts > 0)]
        out = []
        for start in range(0, self.num_items, 512):
            chunk = self.item_ids[start : start + 512]
            out += [item for item, (_, counts) in zip(chunk, self.cooccurrence(chunk))
                    if len(counts) and counts.max() >= self.min_support]
        return out
