"""Cold items: a seeded share of the catalogue whose interactions no training stage may see.

The cold-item protocol simulates items added after training (what `reaemb encode` does for a user): their
interactions are removed from every training signal, and the users whose held-out target is a cold item are
measured as a group. Every stage that trains on interactions (the downstream models, CRRL, co-occurrence counts)
takes its sequences from `without_items`, so they all see the same cold-free training data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence


def _rank_key(seed: int, item_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{item_id}".encode("utf-8")).digest()


def cold_item_ids(item_ids: Sequence[str], fraction: float, seed: int = 0) -> list[str]:
    """The cold items: the round(fraction x catalogue) items with the smallest sha256 of (seed, item id), in the
    catalogue's order. An item's draw depends only on its id and the seed, not on the catalogue's order, so the
    same seed picks the same items from a reordered catalogue. fraction 0 -> []."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"cold item fraction must be in [0, 1), got {fraction}")
    count = int(fraction * len(item_ids) + 0.5)  # round half up
    if count == 0:
        return []
    chosen = set(sorted(item_ids, key=lambda item: _rank_key(seed, item))[:count])
    return [item for item in item_ids if item in chosen]


def without_items(sequences: Mapping[str, Sequence[str]], items: set[str] | frozenset[str],
                  keep_last: int = 2) -> dict[str, list[str]]:
    """Each user's sequence with `items` removed from its training part (all but the last `keep_last` items, the
    held-out validation and test targets, which are kept as they are, cold or not).

    Leave-one-out's rule (`evaluation.split`): a user with fewer than keep_last + 1 items is never evaluated and
    trains on the whole sequence. So a user with that few items, or one whose training part was all cold, loses
    `items` from the whole sequence and becomes a training-only user: no cold item ever lands in a training part
    of the result, whatever splits it the same way. Users keep their order; a user left with no items is kept
    (with an empty list), so user counts do not change."""
    kept: dict[str, list[str]] = {}
    for user, seq in sequences.items():
        seq = list(seq)
        if len(seq) > keep_last:
            head = [item for item in seq[:len(seq) - keep_last] if item not in items]
            if head:
                kept[user] = head + seq[len(seq) - keep_last:]
                continue
        kept[user] = [item for item in seq if item not in items]
    return kept
