"""Leave-one-out split over a RecDataset, with items turned into indices 1..N (0 is padding)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from reaemb_trl.data.canonical import RecDataset
from reaemb_trl.data.cold import without_items

MIN_EVAL_LENGTH = 3
HISTORY_RULES = ("auto", "exclude", "keep")


@dataclass
class SplitData:
    """Per user (in dataset order):

    - ``train[u]``: the training sequence: all but the last two items; users with fewer than 3 items keep
      their whole sequence here and are never evaluated (they have no held-out items to spare).
    - ``valid`` / ``test``: lists of (user index, history, target) for users with >= 3 items; validation
      history is ``seq[:-2]`` with target ``seq[-2]``; test history is ``seq[:-1]`` with target ``seq[-1]``.
    - ``full[u]``: the whole sequence (used to draw sampled-protocol negatives outside it).
    - ``cold``: the cold items' indices (sorted; empty without cold items). Their interactions are gone from
      every sequence's training part (`data.cold.without_items`), so they are in no ``train`` sequence and no
      validation history; a held-out target (and so a test history's last item) may be cold.
    """

    item_ids: list[str]  # item_ids[i - 1] is the id of item index i
    users: list[str]
    train: list[list[int]]
    full: list[list[int]]
    valid: list[tuple[int, list[int], int]] = field(default_factory=list)
    test: list[tuple[int, list[int], int]] = field(default_factory=list)
    cold: list[int] = field(default_factory=list)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def has_repeated_items(self) -> bool:
        """Whether any user's sequence holds an item twice (re-consumption): then history must stay rankable."""
        return any(len(set(seq)) < len(seq) for seq in self.full)

    def resolve_history(self, rule: str) -> str:
        """`exclude`, `keep`, or `auto` = exclude when no sequence repeats an item, keep otherwise."""
        if rule not in HISTORY_RULES:
            raise ValueError(f"history rule must be one of {HISTORY_RULES}, got {rule!r}")
        if rule == "auto":
            return "keep" if self.has_repeated_items else "exclude"
        return rule

    def train_interaction_counts(self) -> list[int]:
        """Training interactions per item index (index 0 unused): MostPop's score."""
        counts = [0] * (self.num_items + 1)
        for seq in self.train:
            for i in seq:
                counts[i] += 1
        return counts

    def train_popularity(self) -> list[int]:
        """Distinct training users per item index (index 0 unused)."""
        pop = [0] * (self.num_items + 1)
        for seq in self.train:
            for i in set(seq):
                pop[i] += 1
        return pop


def group_masks(split: SplitData, part, tail_user_threshold: int, tail_item_threshold: int) -> dict[str, np.ndarray]:
    """The user groups of a split part (validation or test): all, tail/head users (history shorter than
    `tail_user_threshold`), tail/head items (target used by fewer than `tail_item_threshold` training users), and
    with cold items `cold_item` (target is a cold item; its training popularity is 0, so it is a tail item too)."""
    popularity = split.train_popularity()
    lengths = np.array([len(h) for _, h, _ in part])
    pops = np.array([popularity[t] for _, _, t in part])
    tail_user, tail_item = lengths < tail_user_threshold, pops < tail_item_threshold
    masks = {"all": np.ones(len(part), dtype=bool), "tail_user": tail_user, "head_user": ~tail_user,
             "tail_item": tail_item, "head_item": ~tail_item}
    if split.cold:
        cold = set(split.cold)
        masks["cold_item"] = np.array([t in cold for _, _, t in part], dtype=bool)
    return masks


def leave_one_out(dataset: RecDataset, cold_items: Iterable[str] = ()) -> SplitData:
    """The leave-one-out split of `dataset`; `cold_items` (ids, `data.cold.cold_item_ids`) are removed from every
    training part first (`data.cold.without_items`: a user whose training part was all cold keeps only its
    non-cold items and becomes a training-only user)."""
    index = {item_id: n + 1 for n, item_id in enumerate(dataset.item_ids)}
    cold = set(cold_items)
    unknown = sorted(cold - set(index))
    if unknown:
        raise ValueError(f"cold items {unknown[:5]} are not in the catalogue")
    sequences = without_items(dataset.sequences, cold, keep_last=MIN_EVAL_LENGTH - 1) if cold else dataset.sequences
    split = SplitData(item_ids=list(dataset.item_ids), users=[], train=[], full=[],
                      cold=sorted(index[i] for i in cold))
    for user, seq in sequences.items():
        ids = [index[i] for i in seq]
        u = len(split.users)
        split.users.append(user)
        split.full.append(ids)
        if len(ids) < MIN_EVAL_LENGTH:
            split.train.append(ids)
            continue
        split.train.append(ids[:-2])
        split.valid.append((u, ids[:-2], ids[-2]))
        split.test.append((u, ids[:-1], ids[-1]))
    return split


@dataclass
class Window:
    """A slice `train[user][start:end]` of one user's training sequence; `start` items of history precede it."""

    user: int
    start: int
    end: int


def training_windows(train: list[list[int]], width: int, min_length: int = 2) -> list[Window]:
    """Consecutive windows of `width` items over every training sequence, so that each epoch sees every item
    of every sequence once as a target.

    Next-item models (width = max_len + 1): windows end at n, n - max_len, n - 2 max_len, ... and overlap by one
    item, so every transition (items[:t] -> items[t], t >= 1) is a target in exactly one window. Cloze models
    (width = max_len, overlap 0, `step=width`): every item lies in exactly one window. Windows shorter than
    `min_length` (nothing to predict) are dropped."""
    step = width - 1 if min_length >= 2 else width
    windows = []
    for user, seq in enumerate(train):
        end = len(seq)
        while end > 0:
            start = max(0, end - width)
            if end - start >= min_length:
                windows.append(Window(user, start, end))
            if start == 0:
                break
            end -= step
    return windows
