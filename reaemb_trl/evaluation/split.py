"""Leave-one-out split over a RecDataset, with items turned into indices 1..N (0 is padding)."""

from __future__ import annotations

from dataclasses import dataclass, field

from reaemb_trl.data.canonical import RecDataset

MIN_EVAL_LENGTH = 3


@dataclass
class SplitData:
    """Per user (in dataset order):

    - ``train[u]``: the training sequence: all but the last two items; users with fewer than 3 items keep
      their whole sequence here and are never evaluated (they have no held-out items to spare).
    - ``valid`` / ``test``: lists of (user index, history, target) for users with >= 3 items; validation
      history is ``seq[:-2]`` with target ``seq[-2]``; test history is ``seq[:-1]`` with target ``seq[-1]``.
    - ``full[u]``: the whole sequence (used to draw sampled-protocol negatives outside it).
    """

    item_ids: list[str]  # item_ids[i - 1] is the id of item index i
    users: list[str]
    train: list[list[int]]
    full: list[list[int]]
    valid: list[tuple[int, list[int], int]] = field(default_factory=list)
    test: list[tuple[int, list[int], int]] = field(default_factory=list)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def train_popularity(self) -> list[int]:
        """Distinct training users per item index (index 0 unused)."""
        pop = [0] * (self.num_items + 1)
        for seq in self.train:
            for i in set(seq):
                pop[i] += 1
        return pop


def leave_one_out(dataset: RecDataset) -> SplitData:
    index = {item_id: n + 1 for n, item_id in enumerate(dataset.item_ids)}
    split = SplitData(item_ids=list(dataset.item_ids), users=[], train=[], full=[])
    for user, seq in dataset.sequences.items():
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
