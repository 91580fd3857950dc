"""k-core filtering and id remapping on a RecDataset (both return a new dataset)."""

from __future__ import annotations

from reaemb_trl.data.canonical import RecDataset


def kcore(dataset: RecDataset, k: int, item_k: int | None = None) -> RecDataset:
    """Iteratively drop users with fewer than `k` interactions and items with fewer than `item_k` (default k)
    interactions until both hold. Counts are interactions (repeats count), the usual "5-core" definition.
    Items left without interactions leave the catalogue.
    """
    item_k = k if item_k is None else item_k
    seqs = {u: list(s) for u, s in dataset.sequences.items()}
    stamps = {u: list(t) for u, t in dataset.timestamps.items()} if dataset.timestamps else None
    while True:
        counts: dict[str, int] = {}
        for seq in seqs.values():
            for item in seq:
                counts[item] = counts.get(item, 0) + 1
        bad_items = {i for i, c in counts.items() if c < item_k}
        changed = False
        for user in list(seqs):
            keep = [j for j, item in enumerate(seqs[user]) if item not in bad_items]
            if len(keep) != len(seqs[user]):
                changed = True
                seqs[user] = [seqs[user][j] for j in keep]
                if stamps is not None and user in stamps:
                    stamps[user] = [stamps[user][j] for j in keep]
            if len(seqs[user]) < k:
                changed = True
                del seqs[user]
                if stamps is not None:
                    stamps.pop(user, None)
        if not changed:
            break
    alive = {item for seq in seqs.values() for item in seq}
    items = [it for it in dataset.items if it["item_id"] in alive]
    return RecDataset(items=items, sequences=seqs, source_format=dataset.source_format, timestamps=stamps)


def remap_ids(dataset: RecDataset) -> tuple[RecDataset, dict[str, dict[str, str]]]:
    """Rename items to "0".."n-1" in catalogue order and users to "0".."m-1" in file order.

    Returns the new dataset and the maps {"items": {new: old}, "users": {new: old}} so ids can be traced back.
    """
    item_map = {it["item_id"]: str(n) for n, it in enumerate(dataset.items)}
    user_map = {u: str(n) for n, u in enumerate(dataset.sequences)}
    items = [{"item_id": item_map[it["item_id"]], "attributes": it["attributes"]} for it in dataset.items]
    seqs = {user_map[u]: [item_map[i] for i in s] for u, s in dataset.sequences.items()}
    stamps = {user_map[u]: t for u, t in dataset.timestamps.items()} if dataset.timestamps else None
    maps = {"items": {v: k for k, v in item_map.items()}, "users": {v: k for k, v in user_map.items()}}
    return RecDataset(items=items, sequences=seqs, source_format=dataset.source_format, timestamps=stamps), maps
