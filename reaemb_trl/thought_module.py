"""The latent thought module (docs/method.md, "The thought module"): one attention head that reads the LLM's states
and writes the thought vector."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_angles(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape positions.shape + (dim,), half-split layout (the same layout for queries and keys)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class LatentThoughtModule(nn.Module):
    """r = softmax(RoPE(q) . RoPE(K) / sqrt(d)) V over the real tokens before the thought position.

    The query is the state of the last allowed token. Positions count real tokens only, so r does not depend on
    the padding side, the amount of padding or the batch mates.
    """

    def __init__(self, hidden_size: int, rope_base: float = 1000.0):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"hidden_size must be even for RoPE, got {hidden_size}")
        self.hidden_size = hidden_size
        self.rope_base = rope_base
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, d) last-layer states; key_mask (B, L) true for the real tokens before the thought.

        Runs in the module's own dtype (float32 by default) even inside a bf16 autocast region: mu is the mean of
        CRRL's Gaussian policy, and bf16 rounding of mu (|mu| ~ 30 on SmolLM2: steps of ~0.1) is as large as the
        exploration noise."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self._attend(hidden, key_mask)

    def _attend(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        key_mask = key_mask.bool()
        if not key_mask.any(-1).all():
            raise ValueError("every row needs at least one real token before the thought token")
        dtype = self.q_proj.weight.dtype
        # Padded states can be NaN under SDPA; zero them so neither values nor gradients see them.
        hidden = hidden.to(dtype).masked_fill(~key_mask.unsqueeze(-1), 0.0)
        positions = key_mask.long().cumsum(-1) - 1
        steps = torch.arange(hidden.shape[1], device=hidden.device)
        last = torch.where(key_mask, steps, -1).argmax(-1)  # last real token (works for either padding side)
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        q = self.q_proj(hidden[batch, last])
        k = self.k_proj(hidden)
        v = self.v_proj(hidden)
        cos_k, sin_k = rope_angles(positions.clamp(min=0), self.hidden_size, self.rope_base)
        cos_q, sin_q = rope_angles(positions[batch, last], self.hidden_size, self.rope_base)
        precise = torch.promote_types(dtype, torch.float32)  # at least fp32 for the angles and scores
        q = apply_rope(q.to(precise), cos_q.to(precise), sin_q.to(precise))
        k = apply_rope(k.to(precise), cos_k.to(precise), sin_k.to(precise))
        scores = torch.einsum("bd,bld->bl", q, k) / math.sqrt(self.hidden_size)
        weights = scores.masked_fill(~key_mask, float("-inf")).softmax(-1)
        return torch.einsum("bl,bld->bd", weights.to(v.dtype), v)
