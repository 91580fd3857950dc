"""Ranks and HR/NDCG@k.

Ties are ranked pessimistically: the target's rank is 1 + the number of *other* candidates scoring
greater than *or equal to* it. A model that scores everything alike therefore gets the worst rank
instead of a lucky one, and a model that outputs NaN-free constants cannot look good.
A non-finite score (NaN, +inf or -inf) ranks last: a diverged model scores zero, never a perfect hit.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

DEFAULT_KS = (5, 10, 20)


def pessimistic_rank(scores, target_col):
    """scores: (B, C) tensor; target_col: (B,) long tensor of the target's column. Returns (B,) ranks >= 1."""
    import torch

    scores = torch.where(torch.isfinite(scores), scores, -torch.inf)  # NaN and +inf would otherwise rank first
    target = scores.gather(1, target_col.view(-1, 1))
    at_least = (scores >= target).sum(dim=1)  # counts the target itself once; -inf targets tie with everything
    return at_least.to(torch.long)


def full_ranks(scores, targets, exclude=None):
    """Rank the target among all catalogue items. scores: (B, N + 1) with column 0 = padding (ignored).

    exclude: optional (B, N + 1) bool tensor of items to drop from the ranking (e.g. history); the
    target itself is never excluded.
    """
    import torch

    scores = torch.where(torch.isfinite(scores.float()), scores.float(), -torch.inf)
    scores[:, 0] = -torch.inf
    if exclude is not None:
        keep_target = torch.zeros_like(exclude)
        keep_target.scatter_(1, targets.view(-1, 1), True)
        scores = scores.masked_fill(exclude & ~keep_target, -torch.inf)
    return pessimistic_rank(scores, targets)


def sample_negatives(rng: np.random.Generator, num_items: int, forbidden: Iterable[int], n: int = 100) -> list[int]:
    """`n` distinct item indices drawn uniformly from 1..num_items outside `forbidden` (the user's sequence)."""
    forbidden = set(forbidden)
    allowed = num_items - len([i for i in forbidden if 1 <= i <= num_items])
    if allowed < n:
        raise ValueError(f"only {allowed} items outside the user's sequence; cannot draw {n} negatives")
    out: list[int] = []
    chosen: set[int] = set()
    while len(out) < n:
        for i in rng.integers(1, num_items + 1, size=2 * (n - len(out))).tolist():
            if i not in forbidden and i not in chosen:
                chosen.add(i)
                out.append(i)
                if len(out) == n:
                    break
    return out


def sampled_ranks(scores, targets, negatives):
    """Rank the target among itself + its negatives. scores: (B, N + 1); negatives: (B, n) long tensor."""
    import torch

    candidates = torch.cat([targets.view(-1, 1), negatives], dim=1)
    cand_scores = scores.float().gather(1, candidates)
    return pessimistic_rank(cand_scores, torch.zeros_like(targets))


def metrics_from_ranks(ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@k = share of ranks <= k; NDCG@k = mean of 1 / log2(rank + 1) over ranks <= k (one relevant item)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"HR@{k}"] = float(hit.mean()) if ranks.size else math.nan
        gains = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
        out[f"NDCG@{k}"] = float(gains.mean()) if ranks.size else math.nan
    return out
