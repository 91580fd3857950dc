"""What the embedder hands the decoder and reads back: padded token-id batches, real-token positions, span masks,
common prefixes, the prefix states the suffix pass needs (`PrefixStates`), the decoder-call details that differ
between transformers versions, and what in the model's state forbids sharing a template's keys and values."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass
class PrefixStates:
    """Everything the suffix pass needs about a batch of prefixes (the tokens before the thought)."""

    hidden: torch.Tensor  # (B, P, d) last-layer states
    mask: torch.Tensor  # (B, P) bool, real tokens
    lengths: torch.Tensor  # (B,) real-token counts = position of the thought token
    past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (B, heads, P, head_dim)
    pool_mask: torch.Tensor | None = None  # (B, P) bool, the item's own tokens (item_mean pools; item thought keys)

    def select(self, rows: torch.Tensor) -> "PrefixStates":
        kv = None if self.past_key_values is None else [(k[rows], v[rows]) for k, v in self.past_key_values]
        pool = None if self.pool_mask is None else self.pool_mask[rows]
        return PrefixStates(self.hidden[rows], self.mask[rows], self.lengths[rows], kv, pool)

    def masked_sum(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.mask if mask is None else mask
        return self.hidden.masked_fill(~mask.unsqueeze(-1), 0.0).sum(1)


def pad_ids(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into (ids, mask) tensors on the given side."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, span] = True
    return ids, mask


def real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix that every sequence starts with."""
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n


def span_mask(mask: torch.Tensor, spans: torch.Tensor, tail: int) -> torch.Tensor:
    """(B, L) true for real tokens whose real-token index lies in spans[b] = [start, end), or among the row's last
    `tail` real tokens. Works for any padding layout."""
    index = mask.long().cumsum(-1) - 1
    length = mask.sum(-1, keepdim=True)
    inside = (index >= spans[:, :1]) & (index < spans[:, 1:])
    return mask & (inside | (index >= length - tail))


def base_model_of(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft wrapper, or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a causal LM, through a peft wrapper if there is one."""
    return base_model_of(model).get_decoder()


def activation_checkpointing_on(model: nn.Module) -> bool:
    base = base_model_of(model)
    if hasattr(base, "is_activation_checkpointing"):
        return bool(base.is_activation_checkpointing)
    return bool(getattr(base, "is_gradient_checkpointing", False))  # transformers < 5.24 (not deprecated there)


def cache_argument(body: nn.Module) -> str:
    """transformers 5.24 renamed the decoder's `past_key_values` argument to `cache`; accept both."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def layer_keys_values(out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of the cache a decoder call returned (`cache` from transformers 5.24,
    `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    cache = cache if cache is not None else getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError("the backbone returned no key/value cache (is gradient checkpointing on?)")
    return [(layer.keys, layer.values) for layer in cache.layers]


def sharing_blockers(model: nn.Module) -> set[str]:
    """What makes a shared template (`ThoughtEmbedder.template_length`) wrong for `model` now: `sharded` weights
    (DeepSpeed ZeRO-3, FSDP: each forward gathers them collectively, and whether a batch shares could differ between
    processes), `checkpointing` (layers then drop the key/value cache the rows need) or live `dropout` (LoRA or
    attention dropout in training mode)."""
    if any(hasattr(p, "ds_numel") for p in model.parameters()):
        return {"sharded"}
    blockers = set()
    if model.training and getattr(model.config.get_text_config(), "attention_dropout", 0):
        blockers.add("dropout")
    for m in model.modules():
        if type(m).__name__.startswith(("FSDP", "FullyShardedDataParallel")):
            blockers.add("sharded")
        if getattr(m, "gradient_checkpointing", False) is True and m.training and torch.is_grad_enabled():
            blockers.add("checkpointing")
        if isinstance(m, nn.Dropout) and m.p > 0 and m.training:
            blockers.add("dropout")
    return blockers


# the poolings that read only the positions after the prefix (the thought's and EOS's states)
SUFFIX_POOLINGS = ("last", "thought", "thought_eos")


def pool_suffix(pooling: str, thought: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """The pooled vector of a SUFFIX_POOLINGS pooling from the (B, d) states at the thought and EOS positions."""
    return eos if pooling == "last" else thought if pooling == "thought" else (thought + eos) / 2
