"""How much the thought decides an item's embedding: the thought-swap test.

Give every item another item's thought vector (a random derangement) and compare the two embeddings of the item
after subtracting the catalogue centre (the mean of the items' own embeddings): leverage = 1 - their mean cosine.
0 means the table does not see which thought an item got; with `item_mean` pooling the thought and EOS are 2 of ~22
pooled positions, so swapping thoughts leaves the centred embedding almost where it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from reaemb_trl.similarity import similarity_matrix


@contextmanager
def pooling_as(embedder, pooling: str):
    """`embedder` with another pooling inside the block."""
    from reaemb_trl.embedder import POOLINGS

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    previous, embedder.pooling = embedder.pooling, pooling
    try:
        yield embedder
    finally:
        embedder.pooling = previous


def swap_partners(n: int, seed: int = 0) -> torch.Tensor:
    """(n,) a random derangement: partner[i] != i for every i (n >= 2)."""
    if n < 2:
        raise ValueError(f"the thought-swap test needs at least 2 items, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner


@torch.no_grad()
def thought_swap_leverage(
    embedder, prefix_ids: Sequence[Sequence[int]], poolings: Sequence[str] | None = None, batch_size: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """{pooling: leverage} of `embedder` on the items of `prefix_ids` (at least 2), for each of `poolings` (default:
    the embedder's own). Leverage = 1 - mean centred cosine between an item's embedding with its own thought and
    with another item's (`swap_partners`). Uses the fast path (one prefix pass serves every pooling)."""
    poolings = list(poolings or [embedder.pooling])
    was_training = embedder.training
    embedder.eval()
    batches = [list(range(s, min(s + batch_size, len(prefix_ids)))) for s in range(0, len(prefix_ids), batch_size)]
    mu = torch.cat([embedder.thought_vector(embedder.encode_prefix([prefix_ids[i] for i in rows], use_cache=False))
                    for rows in batches])
    partner = swap_partners(len(prefix_ids), seed).to(mu.device)
    own: dict[str, list[torch.Tensor]] = {p: [] for p in poolings}
    swapped: dict[str, list[torch.Tensor]] = {p: [] for p in poolings}
    for rows in batches:
        prefix = embedder.encode_prefix([prefix_ids[i] for i in rows])
        index = torch.tensor(rows, device=mu.device)
        for pooling in poolings:
            with pooling_as(embedder, pooling):
                own[pooling].append(embedder.embed_from_thought(prefix, mu[index]).float())
                swapped[pooling].append(embedder.embed_from_thought(prefix, mu[partner[index]]).float())
    embedder.train(was_training)
    result = {}
    for pooling in poolings:
        mine, theirs = torch.cat(own[pooling]), torch.cat(swapped[pooling])
        cosine = similarity_matrix(mine, theirs.unsqueeze(1), "centered_cosine", mine.mean(0))[:, 0]
        result[pooling] = 1.0 - cosine.mean().item()
    return result
