"""The latent thought module (docs/method.md, "The thought module"): one attention head that reads the LLM's states
and writes the thought vector."""

from __future__ import annotations

import math

import torch
from torch import nn

# all: every real token before the thought (the paper's); item: the item's own tokens only (not the shared template).
THOUGHT_KEYS = ("all", "item")
# none: r as the attention writes it (the paper's); token: r rescaled to norm `output_gain` (learnable, started at a
# token embedding's median norm), so the thought enters the sequence at the scale of a token.
THOUGHT_SCALES = ("none", "token")


def rope_angles(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape positions.shape + (dim,), half-split layout (the same layout for queries and keys)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def median_token_norm(model: nn.Module, skip_ids: tuple[int, ...] = ()) -> float:
    """Median L2 norm of the rows of `model`'s input-embedding table, leaving out `skip_ids` (the thought token's
    row, which is never read)."""
    weight = model.get_input_embeddings().weight.detach()
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[[i for i in skip_ids if i < weight.shape[0]]] = False
    return weight[keep].float().norm(dim=-1).median().item()


class LatentThoughtModule(nn.Module):
    """r = softmax(RoPE(q) . RoPE(K) / sqrt(d)) V over the real tokens before the thought position.

    The query is the state of the last real token before the thought. Positions count real tokens only, so r does
    not depend on the padding side, the amount of padding or the batch mates. `keys="item"` lets the query read only
    the item's own tokens (`item_mask`); `scale="token"` writes r at norm `output_gain` (see THOUGHT_SCALES).
    """

    def __init__(self, hidden_size: int, rope_base: float = 1000.0, keys: str = "all", scale: str = "none",
                 token_norm: float = 1.0):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"hidden_size must be even for RoPE, got {hidden_size}")
        if keys not in THOUGHT_KEYS:
            raise ValueError(f"thought keys must be one of {THOUGHT_KEYS}, got {keys!r}")
        if scale not in THOUGHT_SCALES:
            raise ValueError(f"thought scale must be one of {THOUGHT_SCALES}, got {scale!r}")
        self.hidden_size = hidden_size
        self.rope_base = rope_base
        self.keys = keys
        self.scale = scale
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        if scale == "token":
            self.output_gain = nn.Parameter(torch.tensor([float(token_norm)]))

    @classmethod
    def for_model(cls, model: nn.Module, rope_base: float = 1000.0, keys: str = "all", scale: str = "none",
                  skip_ids: tuple[int, ...] = ()) -> "LatentThoughtModule":
        """A fresh module for causal LM `model`; with scale="token" its gain starts at `median_token_norm`."""
        norm = median_token_norm(model, skip_ids) if scale == "token" else 1.0
        return cls(model.config.get_text_config().hidden_size, rope_base, keys, scale, norm)

    def options(self) -> dict:
        """The constructor arguments besides hidden_size that shape the computation (saved with a checkpoint)."""
        return {"rope_base": self.rope_base, "keys": self.keys, "scale": self.scale}

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor, item_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """hidden (B, L, d) last-layer states; key_mask (B, L) true for the real tokens before the thought;
        item_mask (B, L) true for the item's own tokens (needed with keys="item", ignored otherwise).

        Runs in the module's own dtype (float32 by default) even inside a bf16 autocast region: mu is the mean of
        CRRL's Gaussian policy, and bf16 rounding of mu (|mu| ~ 30 on SmolLM2: steps of ~0.1) is as large as the
        exploration noise."""
        with torch.autocast(hidden.device.type, enabled=False):
            hidden, key_mask = self._masked(hidden, key_mask)
            weights = self._weights(hidden, key_mask, item_mask)
            r = torch.einsum("bl,bld->bd", weights.to(hidden.dtype), self.v_proj(hidden))
            if self.scale == "token":
                r = r * (self.output_gain / torch.linalg.vector_norm(r, dim=-1, keepdim=True).clamp_min(1e-12))
            return r

    def attention_weights(self, hidden: torch.Tensor, key_mask: torch.Tensor, item_mask: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """(B, L) float32: how the query spreads its attention over the positions (0 outside the keys)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self._weights(*self._masked(hidden, key_mask), item_mask).float()

    def _masked(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key_mask = key_mask.bool()
        if not key_mask.any(-1).all():
            raise ValueError("every row needs at least one real token before the thought token")
        # Padded states can be NaN under SDPA; zero them so neither values nor gradients see them.
        return hidden.to(self.q_proj.weight.dtype).masked_fill(~key_mask.unsqueeze(-1), 0.0), key_mask

    def _weights(self, hidden: torch.Tensor, key_mask: torch.Tensor, item_mask: torch.Tensor | None) -> torch.Tensor:
        positions = key_mask.long().cumsum(-1) - 1
        steps = torch.arange(hidden.shape[1], device=hidden.device)
        last = torch.where(key_mask, steps, -1).argmax(-1)  # last real token (works for either padding side)
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        q = self.q_proj(hidden[batch, last])
        k = self.k_proj(hidden)
        cos_k, sin_k = rope_angles(positions.clamp(min=0), self.hidden_size, self.rope_base)
        cos_q, sin_q = rope_angles(positions[batch, last], self.hidden_size, self.rope_base)
        precise = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32 for the angles and scores
        q = apply_rope(q.to(precise), cos_q.to(precise), sin_q.to(precise))
        k = apply_rope(k.to(precise), cos_k.to(precise), sin_k.to(precise))
        scores = torch.einsum("bd,bld->bl", q, k) / math.sqrt(self.hidden_size)
        return scores.masked_fill(~self._keys(key_mask, item_mask, last), float("-inf")).softmax(-1)

    def _keys(self, key_mask: torch.Tensor, item_mask: torch.Tensor | None, last: torch.Tensor) -> torch.Tensor:
        """The positions the query may read: every real token, or (keys="item") the item's own tokens; a row
        without item tokens (an item with no text) reads its query token alone."""
        if self.keys == "all":
            return key_mask
        if item_mask is None:
            raise ValueError("thought keys 'item' need item_mask (PrefixStates.pool_mask, set by "
                             "ThoughtEmbedder.encode_prefix): pass it to the thought module")
        keys = key_mask & item_mask.bool()
        alone = torch.zeros_like(keys).scatter_(1, last.unsqueeze(1), True)
        return torch.where(keys.any(-1, keepdim=True), keys, alone)
