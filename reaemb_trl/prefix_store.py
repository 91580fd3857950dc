"""Prefix states of a frozen LLM: batches concatenated to a common width, and kept per item across CRRL rollouts."""

from __future__ import annotations

from typing import Sequence

import torch

from reaemb_trl.embedder import PrefixStates


def cat_prefix_states(parts: list[PrefixStates]) -> PrefixStates:
    """Concatenate prefix batches, left-padding states, masks and caches to a common width (masked, so exact)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.hidden.shape[1] for p in parts)

    def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
        extra = width - x.shape[dim]
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    kv = None
    if parts[0].past_key_values is not None:
        kv = [
            (torch.cat([pad(p.past_key_values[l][0], 2) for p in parts]), torch.cat([pad(p.past_key_values[l][1], 2) for p in parts]))
            for l in range(len(parts[0].past_key_values))
        ]
    pool = None if parts[0].pool_mask is None else torch.cat([pad(p.pool_mask, 1) for p in parts])
    return PrefixStates(
        torch.cat([pad(p.hidden, 1) for p in parts]),
        torch.cat([pad(p.mask, 1) for p in parts]),
        torch.cat([p.lengths for p in parts]),
        kv,
        pool,
    )


class PrefixStore:
    """The prefix states of a frozen LLM, one unpadded row per item, kept across rollouts (the LLM never changes
    during CRRL, so an item's prefix is encoded once per run instead of once per rollout) up to a memory budget;
    items beyond it are encoded again when needed. Rows are re-padded on the left when assembled: masked positions
    carry no weight, so the suffix sees the same keys and values."""

    def __init__(self, budget_bytes: float):
        self.budget = budget_bytes
        self.used = 0
        self.full = False  # set once a row did not fit: later requests skip the store
        self.rows: dict[str, tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]] = {}

    def add(self, item_ids: Sequence[str], prefix: PrefixStates) -> None:
        for r, item in enumerate(item_ids):
            if item in self.rows:
                continue
            real = prefix.mask[r]
            hidden = prefix.hidden[r][real]
            kv = [(k[r][:, real], v[r][:, real]) for k, v in prefix.past_key_values]
            pool = None if prefix.pool_mask is None else prefix.pool_mask[r][real]
            size = hidden.numel() * hidden.element_size() + sum(2 * k.numel() * k.element_size() for k, _ in kv)
            if self.used + size > self.budget:
                self.full = True
                return
            self.rows[item] = (hidden, kv, pool)
            self.used += size

    def assemble(self, item_ids: Sequence[str]) -> PrefixStates:
        rows = [self.rows[i] for i in item_ids]
        width = max(h.shape[0] for h, _, _ in rows)
        batch, first = len(rows), rows[0]
        hidden = first[0].new_zeros(batch, width, first[0].shape[-1])
        mask = torch.zeros(batch, width, dtype=torch.bool, device=first[0].device)
        pool = None if first[2] is None else torch.zeros_like(mask)
        kv = [(k.new_zeros(batch, k.shape[0], width, k.shape[-1]), v.new_zeros(batch, v.shape[0], width, v.shape[-1]))
              for k, v in first[1]]
        for r, (h, layers, p) in enumerate(rows):
            n = h.shape[0]
            hidden[r, width - n:] = h
            mask[r, width - n:] = True
            if pool is not None:
                pool[r, width - n:] = p
            for (k_out, v_out), (k, v) in zip(kv, layers):
                k_out[r, :, width - n:] = k
                v_out[r, :, width - n:] = v
        return PrefixStates(hidden, mask, mask.sum(-1), kv, pool)
