"""ThoughtEmbedder: a causal LLM plus the latent thought module, turning item attributes into embeddings
(docs/method.md, "The thought module").

Two ways compute the same numbers:

- `literal`: the method as written. Pass 1 runs the whole prompt without gradient, the thought module reads its
  states; pass 2 runs the whole prompt again with the thought row replaced.
- `fast` (default): the LLM is causal, so pass-2 states before the thought equal pass-1 states. One forward over
  the prefix (with gradient, keeping keys and values), the thought vector from the detached prefix states, then
  only the 2-token suffix (thought, EOS) against the cached keys and values. Same pooled vector, loss and gradients.

The fast path is also split into `encode_prefix` / `thought_vector` / `embed_from_thought`, which CRRL uses to
share one prefix pass between all noisy copies of an item.

Shared template (also exact): every prompt starts with the same tokens (system prompt, chat tokens, "Item:"). When
the rows of a batch share a long enough common token prefix, `encode_prefix` runs it once (batch 1) and runs only
the rest of each row against its keys/values, expanded (not copied) over the batch, so the gradient that reaches
the shared part is the sum of the rows' contributions. The states it returns are the same as one pass over the
whole rows: padding sits between the template and the item text, and positions count real tokens.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager, nullcontext
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from reaemb_trl.prompt import ItemPromptFormatter, add_thought_token
from reaemb_trl.thought_module import LatentThoughtModule

# The files of a checkpoint folder, as `save_pretrained` writes them (prompt.py names PROMPT_FORMAT_FILE). Modules
# that only need them for checks and messages (the CLI, preflight, hub) import them inside functions.
CONFIG_FILE = "reaemb_config.json"  # written last: a folder with it is complete
THOUGHT_FILE = "thought_module.safetensors"  # the thought module's own state dict (q_proj.*, k_proj.*, v_proj.*)
ADAPTER_DIR = "adapter"
BACKBONE_DIR = "backbone"
# State-dict prefix of the thought module before it was renamed `thought_module` (see `_load_legacy_thought_keys`).
LEGACY_THOUGHT_PREFIX = "thought."

# mean: all real tokens; last: the EOS state; item_mean: the item's own tokens (not the prompt template), the
# thought and EOS.
POOLINGS = ("mean", "last", "item_mean")
MIN_TEMPLATE_TOKENS = 8  # a shorter common prefix is not worth its own pass


@dataclass
class PrefixStates:
    """Everything the suffix pass needs about a batch of prefixes (the tokens before the thought)."""

    hidden: torch.Tensor  # (B, P, d) last-layer states
    mask: torch.Tensor  # (B, P) bool, real tokens
    lengths: torch.Tensor  # (B,) real-token counts = position of the thought token
    past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (B, heads, P, head_dim)
    pool_mask: torch.Tensor | None = None  # (B, P) bool, prefix tokens that `item_mean` pooling counts

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


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a causal LM, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


class ThoughtEmbedder(nn.Module):
    """Causal LM (optionally with a LoRA adapter) + latent thought module + prompt format + pooling."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        thought_module: LatentThoughtModule | None = None,
        formatter: ItemPromptFormatter | None = None,
        pooling: str = "mean",
        backbone: str | None = None,
        rope_base: float = 1000.0,
        share_template: bool | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        # None: share the common template of a batch wherever that is exact (not while dropout is live: a shared
        # template would get one dropout mask for all rows). True: share even then. False: never share.
        self.share_template = share_template
        self._template_memo: dict | None = None  # set inside `reuse_template_states()`
        self._template_only: tuple | None = None  # (formatter fields, tokenizer id, template-only ids)
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = formatter or ItemPromptFormatter()
        self.thought_token_id = add_thought_token(tokenizer, model, self.formatter.thought_token)
        hidden_size = model.config.get_text_config().hidden_size
        self.thought_module = thought_module or LatentThoughtModule(hidden_size, rope_base)
        self.pooling = pooling
        self.backbone = backbone
        # The wrapper is what Trainer sees; these make it look enough like a PreTrainedModel.
        self.config = model.config
        self.register_load_state_dict_pre_hook(_load_legacy_thought_keys)

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        *,
        formatter: ItemPromptFormatter | None = None,
        pooling: str = "mean",
        lora: Any = None,
        dtype: torch.dtype | str | None = None,
        quantization: str | None = None,
        attn_implementation: str | None = None,
        rope_base: float = 1000.0,
    ) -> "ThoughtEmbedder":
        """Load a causal LM by short name (`smollm2`), hub id or folder; attach a LoRA adapter if `lora` is a
        `peft.LoraConfig`; `quantization="4bit"` loads the backbone in bitsandbytes nf4 (QLoRA)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from reaemb_trl.assets import resolve_model_path

        path = resolve_model_path(backbone)
        kwargs: dict[str, Any] = {}
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if quantization:
            kwargs["quantization_config"] = quantization_config(quantization)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if quantization:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if Path(backbone).is_dir():  # a local folder: record where it is, not where we were
            backbone = str(Path(backbone).resolve())
        embedder = cls(model, tokenizer, formatter=formatter, pooling=pooling, backbone=backbone, rope_base=rope_base)
        if lora is not None:
            embedder.attach_lora(lora)
        return embedder

    def attach_lora(self, lora_config) -> None:
        from peft import get_peft_model

        self.model = get_peft_model(self.model, lora_config)

    # ---- tokens -----------------------------------------------------------------------------------------------
    def prefix_ids(self, items: Sequence[Any]) -> list[list[int]]:
        """Token ids before the thought token for each item's attributes."""
        return [self.formatter.prefix_ids(attrs, self.tokenizer) for attrs in items]

    def item_spans(self, prefix_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, 2) [start, end) of each item's own tokens in its prefix ids (see `ItemPromptFormatter.item_span`).
        Depends on the item and the prompt format only, never on the batch."""
        key = (tuple(self.formatter.to_dict().items()), id(self.tokenizer))
        if self._template_only is None or self._template_only[:2] != key:
            self._template_only = (*key, self.formatter.template_ids(self.tokenizer))
        template = self._template_only[2]
        spans = [self.formatter.item_span(ids, self.tokenizer, template) for ids in prefix_ids]
        return torch.tensor(spans, dtype=torch.long, device=self.device).view(-1, 2)

    @property
    def device(self) -> torch.device:
        return self.thought_module.q_proj.weight.device

    # ---- fast path --------------------------------------------------------------------------------------------
    def _sharing_blockers(self) -> set[str]:
        """What makes a shared template wrong now: `sharded` weights (DeepSpeed ZeRO-3, FSDP: each forward gathers
        them collectively, and whether a batch shares could differ between processes), `checkpointing` (layers then
        drop the key/value cache the rows need) or live `dropout` (LoRA or attention dropout in training mode)."""
        if any(hasattr(p, "ds_numel") for p in self.model.parameters()):
            return {"sharded"}
        blockers = set()
        if self.model.training and getattr(self.model.config.get_text_config(), "attention_dropout", 0):
            blockers.add("dropout")
        for m in self.model.modules():
            if type(m).__name__.startswith(("FSDP", "FullyShardedDataParallel")):
                blockers.add("sharded")
            if getattr(m, "gradient_checkpointing", False) is True and m.training and torch.is_grad_enabled():
                blockers.add("checkpointing")
            if isinstance(m, nn.Dropout) and m.p > 0 and m.training:
                blockers.add("dropout")
        return blockers

    def template_length(self, prefix_ids: Sequence[Sequence[int]]) -> int:
        """How many leading tokens `encode_prefix` runs once for the whole batch (0: none).

        The batch's longest common token prefix (so BPE merges at the template/item boundary cannot matter), leaving
        every row at least one token of its own; 0 for a single row, a prefix under MIN_TEMPLATE_TOKENS, while
        dropout is live and `share_template` is not True, or with sharded weights or active gradient checkpointing
        (see `_sharing_blockers`)."""
        if len(prefix_ids) < 2 or self.share_template is False:
            return 0
        blockers = self._sharing_blockers()
        if blockers - {"dropout"} or (blockers and self.share_template is None):
            return 0
        shared = min(common_prefix_length(prefix_ids), min(len(p) for p in prefix_ids) - 1)
        return shared if shared >= MIN_TEMPLATE_TOKENS else 0

    @contextmanager
    def reuse_template_states(self):
        """Within this block, no-grad passes keep a template's states and reuse them in later batches. Only for
        stretches in which no weight changes (export, a frozen LLM): the states are not recomputed."""
        previous, self._template_memo = self._template_memo, {}
        try:
            yield
        finally:
            self._template_memo = previous

    def _encode_template(self, ids: list[int]):
        """Last-layer states (1, T, d) and per-layer keys/values (1, heads, T, head_dim) of the shared template."""
        memo = self._template_memo if not torch.is_grad_enabled() else None
        autocast = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else None
        key = (tuple(ids), autocast, self.model.training)
        if memo is not None and key in memo:
            return memo[key]
        tokens = torch.tensor([ids], device=self.device)
        out = decoder_of(self.model)(
            input_ids=tokens, position_ids=torch.arange(len(ids), device=self.device).unsqueeze(0), use_cache=True
        )
        cache = _output_cache(out)
        if cache is None:
            raise RuntimeError("the backbone returned no key/value cache (is gradient checkpointing on?)")
        states = (out.last_hidden_state, [(layer.keys, layer.values) for layer in cache.layers])
        if memo is not None:
            memo[key] = states
        return states

    def encode_prefix(
        self, prefix_ids: Sequence[Sequence[int]], padding_side: str = "left", use_cache: bool = True
    ) -> PrefixStates:
        """One LLM pass over the prefixes (gradient follows the caller's grad mode); the batch's common template
        runs once (see the module docstring)."""
        body = decoder_of(self.model)
        shared = self.template_length(prefix_ids)
        ids, mask = pad_ids([p[shared:] for p in prefix_ids], self.tokenizer.pad_token_id, padding_side)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if shared:
            from transformers import DynamicCache

            batch = len(prefix_ids)
            template_hidden, template_kv = self._encode_template(list(prefix_ids[0][:shared]))
            cache = DynamicCache(
                ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in template_kv],
                config=body.config,
            )
            positions = shared + real_positions(mask)
            mask = torch.cat([mask.new_ones(batch, shared), mask], dim=1)
            # The cache must be filled even when the caller wants none back: the rows attend to the template.
            out = body(
                input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=True,
                **{_cache_argument(body): cache},
            )
            hidden = torch.cat([template_hidden.expand(batch, -1, -1), out.last_hidden_state], dim=1)
        else:
            positions = real_positions(mask)
            out = body(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=use_cache)
            hidden = out.last_hidden_state
        kv = None
        if use_cache:
            if _output_cache(out) is None:
                raise RuntimeError("the backbone returned no key/value cache (is gradient checkpointing on?)")
            kv = [(layer.keys, layer.values) for layer in _output_cache(out).layers]
        pool = span_mask(mask, self.item_spans(prefix_ids), 0) if self.pooling == "item_mean" else None
        return PrefixStates(hidden, mask, mask.sum(-1), kv, pool)

    def thought_vector(self, prefix: PrefixStates) -> torch.Tensor:
        """r = mu(x): the thought vector from the detached prefix states (pass 1 sends no gradient into the LLM)."""
        return self.thought_module(prefix.hidden.detach(), prefix.mask)

    def embed_from_thought(self, prefix: PrefixStates, thought_vector: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings with `thought_vector` (B, d) written at the thought position, running only (thought,
        EOS)."""
        from transformers import DynamicCache

        if prefix.past_key_values is None:
            raise ValueError("embed_from_thought needs prefix states encoded with use_cache=True")
        body = decoder_of(self.model)
        embeddings = body.get_input_embeddings()
        batch, device = thought_vector.shape[0], thought_vector.device
        eos = embeddings(torch.full((batch, 1), self.tokenizer.eos_token_id, device=device))
        suffix = torch.cat([thought_vector.to(eos.dtype).unsqueeze(1), eos], dim=1)
        mask = torch.cat([prefix.mask, prefix.mask.new_ones(batch, 2)], dim=1)
        positions = prefix.lengths.unsqueeze(1) + torch.arange(2, device=device)
        cache = DynamicCache(ddp_cache_data=prefix.past_key_values, config=body.config)
        out = body(
            inputs_embeds=suffix,
            attention_mask=mask.long(),
            position_ids=positions,
            use_cache=True,
            **{_cache_argument(body): cache},
        )
        states = out.last_hidden_state  # (B, 2, d)
        if self.pooling == "last":
            return states[:, -1]
        pool = prefix.mask
        if self.pooling == "item_mean":
            if prefix.pool_mask is None:
                raise ValueError("item_mean pooling needs PrefixStates.pool_mask (set by encode_prefix; keep it when "
                                 "selecting or concatenating prefix states)")
            pool = prefix.pool_mask
        total = prefix.masked_sum(pool).to(states.dtype) + states.sum(1)
        return total / (pool.sum(-1) + 2).unsqueeze(-1).to(states.dtype)

    def embed_fast(self, prefix_ids: Sequence[Sequence[int]], padding_side: str = "left") -> torch.Tensor:
        prefix = self.encode_prefix(prefix_ids, padding_side)
        return self.embed_from_thought(prefix, self.thought_vector(prefix))

    # ---- literal path (reference oracle) ---------------------------------------------------------------------
    def literal_thought_vector(self, prefix_ids: Sequence[Sequence[int]], padding_side: str = "left") -> torch.Tensor:
        """Pass 1 of the literal method over the full prompt; returns the thought vector r (B, d), the same as
        `thought_vector(encode_prefix(prefix_ids))`."""
        full = [list(p) + self.formatter.suffix_ids(self.tokenizer) for p in prefix_ids]
        ids, mask = pad_ids(full, self.tokenizer.pad_token_id, padding_side)
        ids, mask = ids.to(self.device), mask.to(self.device)
        thought_at = (ids == self.thought_token_id).long().argmax(-1)
        with torch.no_grad():
            hidden = decoder_of(self.model)(
                input_ids=ids, attention_mask=mask.long(), position_ids=real_positions(mask)
            ).last_hidden_state
        before = torch.arange(ids.shape[1], device=ids.device) < thought_at.unsqueeze(1)
        return self.thought_module(hidden, mask & before)

    def embed_literal(self, prefix_ids: Sequence[Sequence[int]], padding_side: str = "left") -> torch.Tensor:
        """The two full passes of the method as written."""
        vectors = self.literal_thought_vector(prefix_ids, padding_side)
        return self.literal_embed_with_thought(prefix_ids, vectors, padding_side)

    def literal_embed_with_thought(
        self, prefix_ids: Sequence[Sequence[int]], thought_vector: torch.Tensor, padding_side: str = "left"
    ) -> torch.Tensor:
        """Pass 2 of the literal method: the full prompt with the thought row replaced by `thought_vector` (B, d)."""
        full = [list(p) + self.formatter.suffix_ids(self.tokenizer) for p in prefix_ids]
        ids, mask = pad_ids(full, self.tokenizer.pad_token_id, padding_side)
        ids, mask = ids.to(self.device), mask.to(self.device)
        body = decoder_of(self.model)
        embeds = body.get_input_embeddings()(ids)
        at_thought = (ids == self.thought_token_id).unsqueeze(-1)
        embeds = torch.where(at_thought, thought_vector.to(embeds.dtype).unsqueeze(1), embeds)
        states = body(
            inputs_embeds=embeds, attention_mask=mask.long(), position_ids=real_positions(mask)
        ).last_hidden_state
        if self.pooling == "last":
            last = torch.where(mask, torch.arange(ids.shape[1], device=ids.device), -1).argmax(-1)
            return states[torch.arange(ids.shape[0], device=ids.device), last]
        return self._pool_mean(states, mask, prefix_ids, tail=2)

    def _pool_mean(self, states, mask, prefix_ids, tail: int) -> torch.Tensor:
        """Mean over the real tokens (`mean`) or over the item's own tokens plus the last `tail` (`item_mean`)."""
        if self.pooling == "item_mean":
            mask = span_mask(mask, self.item_spans(prefix_ids), tail)
        total = states.masked_fill(~mask.unsqueeze(-1), 0.0).sum(1)
        return total / mask.sum(-1, keepdim=True).to(states.dtype)

    def embed_without_thought(self, prefix_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """The no-fine-tuning baseline: the same prompt and pooling with EOS but no thought token."""
        prefix = self.encode_prefix([list(p) + [self.tokenizer.eos_token_id] for p in prefix_ids], use_cache=False)
        if self.pooling == "last":
            return prefix.hidden[:, -1]  # left padding: the last column is every row's EOS
        return self._pool_mean(prefix.hidden, prefix.mask, prefix_ids, tail=1)

    # ---- public API -------------------------------------------------------------------------------------------
    def uses_fast_path(self) -> bool:
        """The fast path needs the key/value cache, which gradient checkpointing turns off while training."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        checkpointing = getattr(base, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers < 5.24
            checkpointing = getattr(base, "is_gradient_checkpointing", False)
        return not (self.training and torch.is_grad_enabled() and checkpointing)

    def forward(self, prefix_ids: Sequence[Sequence[int]], method: str = "fast") -> torch.Tensor:
        """Pooled embeddings (B, d) for tokenised prefixes.

        `method`: 'fast' or 'literal' (the same numbers), or 'no_thought' (the bare-backbone baseline)."""
        if method == "no_thought":
            return self.embed_without_thought(prefix_ids)
        if method == "fast" and self.uses_fast_path():
            return self.embed_fast(prefix_ids)
        if method not in ("fast", "literal"):
            raise ValueError(f"method must be 'fast', 'literal' or 'no_thought', got {method!r}")
        return self.embed_literal(prefix_ids)

    @torch.no_grad()
    def encode(
        self,
        items: Sequence[Any],
        batch_size: int = 32,
        method: str = "fast",
        sort_by_length: bool = True,
        progress: bool = False,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Embed a list of items (each an attribute list or mapping) -> float32 tensor (N, d), in input order.

        Items are batched by length (less padding); an item's vector does not depend on its batch mates."""
        return self._encode_batched(
            items, lambda ids: {"": self(ids, method=method)}, batch_size, sort_by_length, progress, dtype
        )[""]

    @torch.no_grad()
    def encode_with_thought_modules(
        self,
        items: Sequence[Any],
        modules: dict[str, nn.Module],
        batch_size: int = 32,
        progress: bool = False,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embeddings of the same LLM under several thought modules ({name: LatentThoughtModule}; e.g. before and
        after CRRL, which leaves the LLM untouched): one prefix pass per batch serves them all, each adds only its
        2-token suffix. Returns {name: (N, d) float32}."""

        def run(ids):
            prefix = self.encode_prefix(ids)
            return {
                name: self.embed_from_thought(prefix, module(prefix.hidden, prefix.mask))
                for name, module in modules.items()
            }

        return self._encode_batched(items, run, batch_size, True, progress, dtype)

    def _encode_batched(self, items, run, batch_size, sort_by_length, progress, dtype) -> dict[str, torch.Tensor]:
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        ids = self.prefix_ids(items)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if sort_by_length else list(range(len(ids)))
        out: dict[str, torch.Tensor] = {}
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        starts = range(0, len(order), batch_size)
        with autocast, self.reuse_template_states():  # no weight changes while encoding
            for start in tqdm(starts, desc="embedding items", disable=not progress, unit="batch"):
                rows = order[start : start + batch_size]
                for name, vectors in run([ids[i] for i in rows]).items():
                    if name not in out:
                        out[name] = torch.empty(len(ids), vectors.shape[-1], dtype=torch.float32)
                    out[name][rows] = vectors.float().cpu()
        self.train(was_training)
        return out

    # ---- persistence ------------------------------------------------------------------------------------------
    def save_pretrained(
        self, folder: str | os.PathLike, include_backbone: bool | None = None, state_dict: dict | None = None
    ) -> None:
        """Write adapter, thought module, prompt format, tokenizer and config into `folder`.

        The backbone weights are stored too when `include_backbone` is true, or when the backbone has no name
        that can be loaded again (e.g. a model built in-process). `state_dict` (names as in `self.state_dict()`:
        `model.*`, `thought_module.*`) is written instead of the live weights when given: under DeepSpeed ZeRO-3 the
        live parameters are partitioned (empty local tensors) and the gathered full state dict is the only copy."""
        folder = Path(folder)
        if include_backbone is None:
            include_backbone = self.backbone is None
        model_state = module_state = None
        if state_dict is not None:
            model_state = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
            prefix = "thought_module."
            module_state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
            missing = sorted(set(self.thought_module.state_dict()) - set(module_state))
            if missing:
                raise KeyError(f"state_dict lacks thought-module weights {missing}; keys: {sorted(state_dict)[:5]}...")
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".reaemb-save-", dir=folder))
        try:
            # The file holds the module's own keys (q_proj.weight, ...), not the embedder's `thought_module.*` names.
            source = module_state if module_state is not None else self.thought_module.state_dict()
            state = {k: v.detach().cpu().contiguous() for k, v in source.items()}
            save_file(state, staging / THOUGHT_FILE)
            self.formatter.save(staging)
            self.tokenizer.save_pretrained(staging)
            has_adapter = self.has_adapter
            if has_adapter:
                # The row grown for the thought token is never read (the thought vector replaces it), so the
                # embedding table is not part of the adapter.
                self.model.save_pretrained(staging / ADAPTER_DIR, state_dict=model_state, save_embedding_layers=False)
            if include_backbone:
                _save_base_weights(self.model, staging / BACKBONE_DIR, model_state)
            config = {
                "format": "reaemb-trl/1",
                "backbone": None if include_backbone else self.backbone,
                "backbone_in_folder": include_backbone,
                "pooling": self.pooling,
                "hidden_size": self.thought_module.hidden_size,
                "rope_base": self.thought_module.rope_base,
                "adapter": has_adapter,
                "architecture": (self.config.architectures or [None])[0],
            }
            (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            # Move entries in one by one (the folder may also hold Trainer checkpoints and logs); the config
            # goes last, so a folder with a config is always complete.
            (folder / CONFIG_FILE).unlink(missing_ok=True)
            for entry in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG_FILE):
                target = folder / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        backbone: str | None = None,
        dtype: torch.dtype | str | None = None,
        is_trainable: bool = False,
        device: str | torch.device | None = None,
    ) -> "ThoughtEmbedder":
        """Load a checkpoint folder written by `save_pretrained` (LRCL or CRRL)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from reaemb_trl.assets import resolve_model_path

        folder = Path(folder)
        if not (folder / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{folder} is not a reaemb-trl checkpoint: {CONFIG_FILE} is missing")
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("backbone_in_folder"):
            path = str(folder / BACKBONE_DIR)
        else:
            path = resolve_model_path(backbone or config["backbone"])
        kwargs = {"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype} if dtype else {}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        add_thought_token(tokenizer, model)
        if config["adapter"]:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder / ADAPTER_DIR, is_trainable=is_trainable)
        thought_module = LatentThoughtModule(config["hidden_size"], config["rope_base"])
        thought_module.load_state_dict(load_file(folder / THOUGHT_FILE))
        embedder = cls(
            model,
            tokenizer,
            thought_module=thought_module,
            formatter=ItemPromptFormatter.load(folder),
            pooling=config["pooling"],
            backbone=config["backbone"] if not config.get("backbone_in_folder") else None,
        )
        if device is not None:
            embedder.to(device)
        return embedder.train(is_trainable)

    # ---- what a checkpoint holds (the trainers, the quickstart and export ask here) -------------------------
    @property
    def has_adapter(self) -> bool:
        """Whether the LLM carries a (peft) LoRA adapter."""
        return hasattr(self.model, "peft_config")

    @staticmethod
    def adapter_weights_file(folder: str | os.PathLike) -> Path:
        from peft.utils import SAFETENSORS_WEIGHTS_NAME

        return Path(folder) / ADAPTER_DIR / SAFETENSORS_WEIGHTS_NAME

    def thought_module_from(self, folder: str | os.PathLike) -> LatentThoughtModule:
        """The thought module of another checkpoint folder, shaped like this embedder's, on its device."""
        module = LatentThoughtModule(self.thought_module.hidden_size, self.thought_module.rope_base)
        module.load_state_dict(load_file(Path(folder) / THOUGHT_FILE))
        return module.to(self.device)

    def same_adapter_as(self, folder: str | os.PathLike) -> bool:
        """Whether checkpoint `folder` carries exactly this embedder's LoRA weights (or both have none): then the two
        differ only in their thought modules and can share prefix passes."""
        from peft import get_peft_model_state_dict

        file = self.adapter_weights_file(folder)
        if not self.has_adapter or not file.exists():
            return not self.has_adapter and not file.exists()
        theirs = load_file(file)
        # as saved: without the (resized) embedding layers, which the LoRA checkpoint never holds
        mine = get_peft_model_state_dict(self.model, save_embedding_layers=False)
        mine = {k: v.detach().cpu() for k, v in mine.items()}
        return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    def load_trained_state(self, folder: str | os.PathLike, adapter: bool = True) -> None:
        """Load the trained weights of a checkpoint folder into this embedder (used when resuming): the thought
        module, and the LoRA adapter when `adapter` and the folder has one."""
        from peft import set_peft_model_state_dict

        folder = Path(folder)
        self.thought_module.load_state_dict(load_file(folder / THOUGHT_FILE))
        adapter_file = self.adapter_weights_file(folder)
        if adapter and adapter_file.exists():
            set_peft_model_state_dict(self.model, load_file(adapter_file))


def save_wrapped_embedder(wrapper: nn.Module, folder: str | os.PathLike, state_dict: dict | None) -> dict | None:
    """Save `wrapper.embedder` (a trainer's model: LRCLModel, CRRLPolicy) into `folder`.

    `state_dict`: the full state dict Trainer passes under DeepSpeed ZeRO-3 / FSDP (names as in
    `wrapper.state_dict()`). The files are written straight from it: the live parameters are empty partitions
    then. Returns the (prefix-stripped) state dict used, or None when nothing could be written: ZeRO-3 without
    `zero3_save_16bit_model` passes `{}`, and DeepSpeed's own checkpoint holds the weights."""
    if state_dict:
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        missing = sorted(n for n, p in wrapper.named_parameters() if p.requires_grad and n not in state_dict)
        if missing:
            raise KeyError(f"state_dict lacks trainable weights {missing[:5]} (of {len(missing)})")
        prefix = "embedder."
        wrapper.embedder.save_pretrained(
            folder, state_dict={k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        )
        return state_dict
    if any(hasattr(p, "ds_numel") for p in wrapper.parameters()):
        import logging

        logging.getLogger(__name__).warning(
            "DeepSpeed ZeRO-3 without zero3_save_16bit_model: no embedding checkpoint written to %s; set "
            "zero3_save_16bit_model: true (accelerate_configs/deepspeed_zero3.yaml) to get a loadable folder",
            folder,
        )
        return None
    wrapper.embedder.save_pretrained(folder)
    return dict(wrapper.state_dict())


def _load_legacy_thought_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a state dict saved while the embedder's thought-module attribute was still called
    `thought` (keys `<prefix>thought.q_proj.weight`, also under an LRCLModel / CRRLPolicy wrapper's `embedder.`
    prefix) loads as `<prefix>thought_module.q_proj.weight`."""
    old, new = prefix + LEGACY_THOUGHT_PREFIX, prefix + "thought_module."
    for key in [k for k in state_dict if k.startswith(old)]:
        renamed = new + key[len(old) :]
        if renamed not in state_dict:
            state_dict[renamed] = state_dict.pop(key)


def _cache_argument(body: nn.Module) -> str:
    """transformers 5.24 renamed the decoder's `past_key_values` argument to `cache`; accept both."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def _output_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", None)


def _save_base_weights(model, folder: Path, state_dict: dict | None = None) -> None:
    """Save the backbone without any LoRA layers (peft renames wrapped weights to `*.base_layer.*`).

    `state_dict` (names as in `model.state_dict()`) replaces the live weights when given."""
    is_peft = hasattr(model, "peft_config")
    base = model.get_base_model() if is_peft else model
    if state_dict is None:
        source = base.state_dict()
    else:
        prefix = "base_model.model." if is_peft else ""
        source = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    state = {k.replace(".base_layer", ""): v for k, v in source.items() if "lora_" not in k}
    base.save_pretrained(folder, state_dict=state)


def quantization_config(kind: str):
    from transformers import BitsAndBytesConfig

    if kind != "4bit":
        raise ValueError(f"quantization must be '4bit' (bitsandbytes nf4), got {kind!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
