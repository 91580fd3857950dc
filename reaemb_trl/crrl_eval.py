"""Noise-free CRRL yardstick: the mean reward of the anchor action (z = mu) over a fixed set of items.

Training logs are noisy (a few items per step, noisy copies); comparing this number for the checkpoint before and
after CRRL on the same items and candidates says whether the collaborative reward went up.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from reaemb_trl.candidates import CooccurrenceCandidates
from reaemb_trl.embedder import ThoughtEmbedder
from reaemb_trl.rewards import resolve_reward, similarity_matrix


def anchor_reward_from_table(
    table: torch.Tensor,
    table_ids: Sequence[str],
    candidates: CooccurrenceCandidates,
    item_ids: Sequence[str],
    reward: str = "rank",
    similarity: str = "dot",
) -> float:
    """Mean `reward` over `item_ids`, scoring each item against its epoch-0 candidates with rows of `table`."""
    cand_ids, weights = candidates.candidates(list(item_ids), epoch=0)
    row = {item: n for n, item in enumerate(table_ids)}
    items = table[torch.tensor([row[i] for i in item_ids])].float()
    cands = table[torch.tensor([[row[c] for c in r] for r in cand_ids])].float()
    weights = torch.as_tensor(weights)
    values = resolve_reward(reward)(
        similarities=similarity_matrix(items, cands, similarity),
        positive_mask=weights > 0,
        positive_weights=weights,
        item_ids=list(item_ids),
        candidate_ids=cand_ids,
    )
    scored = [v for v in values if v is not None]
    if not scored:
        raise ValueError("no item has a co-occurring positive: nothing to score")
    return sum(scored) / len(scored)


def mean_anchor_reward(
    embedder: ThoughtEmbedder,
    candidates: CooccurrenceCandidates,
    catalogue: Mapping[str, object],
    item_ids: Sequence[str],
    reward: str = "rank",
    similarity: str = "dot",
    batch_size: int = 32,
    dtype: torch.dtype | None = None,
) -> float:
    """Mean `reward` over `item_ids` when every item and candidate is embedded with its noise-free thought."""
    cand_ids, _ = candidates.candidates(list(item_ids), epoch=0)
    unique = list(dict.fromkeys(list(item_ids) + [c for row in cand_ids for c in row]))
    table = embedder.encode([catalogue[i] for i in unique], batch_size=batch_size, dtype=dtype)
    return anchor_reward_from_table(table, unique, candidates, item_ids, reward, similarity)
