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

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from reaemb_trl.checkpointing import (
    load_causal_lm,
    load_embedder,
    load_thought_state,
    load_trained_state,
    quiet_peft,
    same_adapter,
    save_embedder,
)
from reaemb_trl.decoder_io import (
    SUFFIX_POOLINGS,
    PrefixStates,
    activation_checkpointing_on,
    cache_argument,
    common_prefix_length,
    decoder_of,
    layer_keys_values,
    pad_ids,
    pool_suffix,
    real_positions,
    sharing_blockers,
    span_mask,
)
from reaemb_trl.prompt import ItemPromptFormatter, add_thought_token
from reaemb_trl.thought_module import LatentThoughtModule

# mean: all real tokens; last: the EOS state; item_mean: the item's own tokens (not the prompt template), the
# thought and EOS; thought: the state at the thought position; thought_eos: the mean of the thought and EOS states
# (these two give the thought far more say in the table: reaemb_trl/thought_leverage.py).
POOLINGS = ("mean", "last", "item_mean", "thought", "thought_eos")
MIN_TEMPLATE_TOKENS = 8  # a shorter common prefix is not worth its own pass


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
        thought_keys: str = "all",
        thought_scale: str = "none",
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
        self.thought_module = thought_module or LatentThoughtModule.for_model(
            model, rope_base, thought_keys, thought_scale, skip_ids=(self.thought_token_id,))
        self.pooling = pooling
        self.backbone = backbone
        # The wrapper is what Trainer sees; these make it look enough like a PreTrainedModel.
        self.config = model.config

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
        thought_keys: str = "all",
        thought_scale: str = "none",
    ) -> "ThoughtEmbedder":
        """Load a causal LM by short name (`smollm2`), hub id or folder; attach a LoRA adapter if `lora` is a
        `peft.LoraConfig`; `quantization="4bit"` loads the backbone in bitsandbytes nf4 (QLoRA)."""
        from transformers import AutoTokenizer

        from reaemb_trl.assets import resolve_model_path

        path = resolve_model_path(backbone)
        model = load_causal_lm(path, dtype, quantization, attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if Path(backbone).is_dir():  # a local folder: record where it is, not where we were
            backbone = str(Path(backbone).resolve())
        embedder = cls(model, tokenizer, formatter=formatter, pooling=pooling, backbone=backbone, rope_base=rope_base,
                       thought_keys=thought_keys, thought_scale=thought_scale)
        if lora is not None:
            embedder.attach_lora(lora)
        return embedder

    def attach_lora(self, lora_config) -> None:
        from peft import get_peft_model

        with quiet_peft():
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

    def _padded(self, sequences: Sequence[Sequence[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_ids(sequences, self.tokenizer.pad_token_id, side)
        return ids.to(self.device), mask.to(self.device)

    # ---- fast path --------------------------------------------------------------------------------------------
    def template_length(self, prefix_ids: Sequence[Sequence[int]]) -> int:
        """How many leading tokens `encode_prefix` runs once for the whole batch (0: none).

        The batch's longest common token prefix (so BPE merges at the template/item boundary cannot matter), leaving
        every row at least one token of its own; 0 for a single row, a prefix under MIN_TEMPLATE_TOKENS, while
        dropout is live and `share_template` is not True, or with sharded weights or active gradient checkpointing
        (see `decoder_io.sharing_blockers`)."""
        if len(prefix_ids) < 2 or self.share_template is False:
            return 0
        blockers = sharing_blockers(self.model)
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
        states = (out.last_hidden_state, layer_keys_values(out))
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
        ids, mask = self._padded([p[shared:] for p in prefix_ids], padding_side)
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
                **{cache_argument(body): cache},
            )
            hidden = torch.cat([template_hidden.expand(batch, -1, -1), out.last_hidden_state], dim=1)
        else:
            positions = real_positions(mask)
            out = body(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=use_cache)
            hidden = out.last_hidden_state
        kv = layer_keys_values(out) if use_cache else None
        return PrefixStates(hidden, mask, mask.sum(-1), kv, span_mask(mask, self.item_spans(prefix_ids), 0))

    def thought_vector(self, prefix: PrefixStates) -> torch.Tensor:
        """r = mu(x): the thought vector from the detached prefix states (pass 1 sends no gradient into the LLM)."""
        return self.thought_module(prefix.hidden.detach(), prefix.mask, prefix.pool_mask)

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
            **{cache_argument(body): cache},
        )
        states = out.last_hidden_state  # (B, 2, d)
        if self.pooling in SUFFIX_POOLINGS:
            return pool_suffix(self.pooling, states[:, 0], states[:, 1])
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
    def _full_prompts(self, prefix_ids: Sequence[Sequence[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded whole prompts: prefix, thought token, EOS."""
        return self._padded([list(p) + self.formatter.suffix_ids(self.tokenizer) for p in prefix_ids], side)

    def literal_thought_vector(self, prefix_ids: Sequence[Sequence[int]], padding_side: str = "left") -> torch.Tensor:
        """Pass 1 of the literal method over the full prompt; returns the thought vector r (B, d), the same as
        `thought_vector(encode_prefix(prefix_ids))`."""
        ids, mask = self._full_prompts(prefix_ids, padding_side)
        thought_at = (ids == self.thought_token_id).long().argmax(-1)
        with torch.no_grad():
            hidden = decoder_of(self.model)(
                input_ids=ids, attention_mask=mask.long(), position_ids=real_positions(mask)
            ).last_hidden_state
        before = mask & (torch.arange(ids.shape[1], device=ids.device) < thought_at.unsqueeze(1))
        return self.thought_module(hidden, before, span_mask(before, self.item_spans(prefix_ids), 0))

    def embed_literal(self, prefix_ids: Sequence[Sequence[int]], padding_side: str = "left") -> torch.Tensor:
        """The two full passes of the method as written."""
        vectors = self.literal_thought_vector(prefix_ids, padding_side)
        return self.literal_embed_with_thought(prefix_ids, vectors, padding_side)

    def literal_embed_with_thought(
        self, prefix_ids: Sequence[Sequence[int]], thought_vector: torch.Tensor, padding_side: str = "left"
    ) -> torch.Tensor:
        """Pass 2 of the literal method: the full prompt with the thought row replaced by `thought_vector` (B, d)."""
        ids, mask = self._full_prompts(prefix_ids, padding_side)
        body = decoder_of(self.model)
        embeds = body.get_input_embeddings()(ids)
        at_thought = (ids == self.thought_token_id).unsqueeze(-1)
        embeds = torch.where(at_thought, thought_vector.to(embeds.dtype).unsqueeze(1), embeds)
        states = body(
            inputs_embeds=embeds, attention_mask=mask.long(), position_ids=real_positions(mask)
        ).last_hidden_state
        if self.pooling in SUFFIX_POOLINGS:
            last = torch.where(mask, torch.arange(ids.shape[1], device=ids.device), -1).argmax(-1)
            rows = torch.arange(ids.shape[0], device=ids.device)
            return pool_suffix(self.pooling, states[rows, last - 1], states[rows, last])
        return self._pool_mean(states, mask, prefix_ids, tail=2)

    def _pool_mean(self, states, mask, prefix_ids, tail: int) -> torch.Tensor:
        """Mean over the real tokens (`mean`) or over the item's own tokens plus the last `tail` (`item_mean`)."""
        if self.pooling == "item_mean":
            mask = span_mask(mask, self.item_spans(prefix_ids), tail)
        total = states.masked_fill(~mask.unsqueeze(-1), 0.0).sum(1)
        return total / mask.sum(-1, keepdim=True).to(states.dtype)

    def embed_without_thought(self, prefix_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """The no-fine-tuning baseline: the same prompt and pooling with EOS but no thought token (there the
        thought poolings read EOS, all that follows the prefix)."""
        prefix = self.encode_prefix([list(p) + [self.tokenizer.eos_token_id] for p in prefix_ids], use_cache=False)
        if self.pooling in SUFFIX_POOLINGS:
            return prefix.hidden[:, -1]  # left padding: the last column is every row's EOS
        return self._pool_mean(prefix.hidden, prefix.mask, prefix_ids, tail=1)

    # ---- public API -------------------------------------------------------------------------------------------
    def uses_fast_path(self) -> bool:
        """The fast path needs the key/value cache, which gradient checkpointing turns off while training."""
        return not (self.training and torch.is_grad_enabled() and activation_checkpointing_on(self.model))

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
        """Embed a list of items (each an attribute list or mapping) -> float32 tensor (N, d), in input order; no
        items give a (0, d) tensor.

        Items are batched by length (less padding); an item's vector does not depend on its batch mates."""
        return self._encode_batched(
            items, [""], lambda ids: {"": self(ids, method=method)}, batch_size, sort_by_length, progress, dtype
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
                name: self.embed_from_thought(prefix, module(prefix.hidden, prefix.mask, prefix.pool_mask))
                for name, module in modules.items()
            }

        return self._encode_batched(items, list(modules), run, batch_size, True, progress, dtype)

    def _encode_batched(self, items, names, run, batch_size, sort_by_length, progress, dtype) -> dict:
        """{name: (N, d) float32} for `names`, filled batch by batch from `run(prefix ids) -> {name: vectors}`."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        ids = self.prefix_ids(items)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if sort_by_length else list(range(len(ids)))
        out = {name: torch.empty(len(ids), self.thought_module.hidden_size, dtype=torch.float32) for name in names}
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        starts = range(0, len(order), batch_size)
        with autocast, self.reuse_template_states():  # no weight changes while encoding
            for start in tqdm(starts, desc="embedding items", disable=not progress, unit="batch"):
                rows = order[start : start + batch_size]
                for name, vectors in run([ids[i] for i in rows]).items():
                    out[name][rows] = vectors.float().cpu()
        self.train(was_training)
        return out

    # ---- persistence (reaemb_trl/checkpointing.py) -----------------------------------------------------------
    def save_pretrained(
        self, folder: str | os.PathLike, include_backbone: bool | None = None, state_dict: dict | None = None
    ) -> None:
        """Write adapter, thought module, prompt format, tokenizer and config into `folder`; the backbone weights
        too when `include_backbone`, or when the backbone has no loadable name (see `checkpointing.save_embedder`,
        which also says what `state_dict` is for)."""
        save_embedder(self, folder, include_backbone, state_dict)

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
        """Load a checkpoint folder written by `save_pretrained` (LRCL or CRRL); `backbone` replaces the recorded
        backbone name (e.g. a local copy)."""
        return load_embedder(cls, folder, backbone=backbone, dtype=dtype, is_trainable=is_trainable, device=device)

    @property
    def has_adapter(self) -> bool:
        """Whether the LLM carries a (peft) LoRA adapter."""
        return hasattr(self.model, "peft_config")

    def thought_module_from(self, folder: str | os.PathLike) -> LatentThoughtModule:
        """The thought module of another checkpoint folder, shaped like this embedder's, on its device."""
        module = LatentThoughtModule(self.thought_module.hidden_size, **self.thought_module.options())
        return load_thought_state(module, folder).to(self.device)

    def same_adapter_as(self, folder: str | os.PathLike) -> bool:
        """Whether checkpoint `folder` carries exactly this embedder's LoRA weights (or both have none): then the two
        differ only in their thought modules and can share prefix passes."""
        return same_adapter(self, folder)

    def load_trained_state(self, folder: str | os.PathLike, adapter: bool = True) -> None:
        """Load the trained weights of a checkpoint folder into this embedder (used when resuming): the thought
        module, and the LoRA adapter when `adapter` and the folder has one."""
        load_trained_state(self, folder, adapter)
