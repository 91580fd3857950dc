"""CRRLTrainer: stage 2 of ReaEmb, GRPO on the latent thought (docs/method.md, "CRRL"), a `trl.GRPOTrainer` subclass.

The "generations" of a group are Gaussian perturbations of the thought vector: copy g of item a takes the action
`z_g = mu_theta(x_a) + sigma * eps_g` (copy 0 noise-free when `anchor_copy`), its embedding `e_g` is the pooled LLM
output with thought z_g, and rewards score `e_g` against co-occurrence candidates. The policy is Gaussian,
`log pi(z | x) = -||z - mu_theta(x)||^2 / (2 sigma^2)` (+ const), one ratio per row, PPO-clipped as in TRL.

How it hooks into GRPOTrainer (TRL 1.16):

- `__init__` does NOT run `GRPOTrainer.__init__` (its tokenizer / generation / LM-head / vLLM setup assumes a
  causal LM producing text). `_init_grpo_state` sets, in one place, the attributes that the GRPOTrainer methods
  CRRL inherits read; `tests/test_trl_coupling.py` reads those methods' source in the installed TRL and fails,
  naming the attribute, when one is missing. Then `_BaseTrainer.__init__` (i.e. `transformers.Trainer`) runs.
- Kept from GRPOTrainer unchanged: `get_train_dataloader`, `_get_train_sampler` (RepeatSampler: G consecutive
  copies of an item, the same order on every process), `_prepare_inputs` (generation every
  `steps_per_generation * num_iterations` steps, `_buffered_inputs`), `training_step`, `compute_loss`,
  `prediction_step`, `log` (the `_metrics` averaging).
- Overridden: `_generate_and_score_completions` (latent actions instead of text), `_compute_loss` (Gaussian
  log-prob, no LLM pass), `evaluate` (the frozen yardstick of `crrl_yardstick` when items are held out),
  `_save` / `_load_from_checkpoint` (a `ThoughtEmbedder` checkpoint folder), `create_model_card` (no LM card).
  Rewards are computed by `_latent_rewards` (TRL's reward contract with richer keyword arguments).
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from accelerate.utils import gather, gather_object
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import set_seed
from trl import GRPOTrainer
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import disable_dropout_in_model, identity, nanstd

from reaemb_trl.candidates import CooccurrenceCandidates, stable_hash
from reaemb_trl.checkpointing import EmbedderCheckpointMixin
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.embedder import PrefixStates, ThoughtEmbedder, save_wrapped_embedder
from reaemb_trl.hub import HubPushMixin
from reaemb_trl.prompt import normalise_attributes
from reaemb_trl.rewards import CollaborativeTable, resolve_reward, reward_name, similarity_matrix
from reaemb_trl.zero3 import gathered_for_rollout


# ---- the maths, as plain functions (tested against hand computations) ----------------------------------------------
def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """log pi(z | x) = -||z - mu||^2 / (2 sigma^2), per row, up to a constant (sigma: a float or one per row, fixed
    at the rollout, so -d log sigma is a constant too)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=z.device)
    return -((z.float() - mu.float()) ** 2).sum(-1) / (2.0 * sigma**2)


def gaussian_kl(mu: torch.Tensor, mu_ref: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2 I) || N(mu_ref, sigma^2 I)) = ||mu - mu_ref||^2 / (2 sigma^2), per row."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=mu.device)
    return ((mu.float() - mu_ref.float()) ** 2).sum(-1) / (2.0 * sigma**2)


def action_scale(mu: torch.Tensor, noise_scale: float, mode: str) -> torch.Tensor:
    """sigma per row: `noise_scale` (absolute), or `noise_scale` x RMS of the row's coordinates (relative)."""
    if mode == "absolute":
        return torch.full((mu.shape[0],), float(noise_scale), device=mu.device)
    if mode == "relative":
        return noise_scale * mu.detach().float().norm(dim=-1) / mu.shape[-1] ** 0.5
    raise ValueError(f"noise_scale_mode must be 'absolute' or 'relative', got {mode!r}")


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str = "grpo",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss of TRL's objectives with one action ("token") per row; returns (loss, ratio).

    grpo/bnpo/dr_grpo/dapo: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (r optionally capped at `delta`);
    cispo: -clip(r, max=eps_high).detach() A log pi; sapo: TRL's soft gate."""
    ratio = torch.exp(logp - old_logp)
    if loss_type == "cispo":
        return -torch.clamp(ratio, max=epsilon_high).detach() * advantages * logp, ratio
    if loss_type == "sapo":
        temps = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        return -(torch.sigmoid(temps * (ratio - 1)) * 4 / temps) * advantages, ratio
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    capped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    return -torch.min(capped * advantages, clipped * advantages), ratio


def compute_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
    baseline: str = "group",
    anchor_copy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advantages over the *global* batch (rows in group order). Returns (advantages, weighted rewards,
    is_std_zero per row); NaN-aware like TRL: rows every function scored None get advantage 0.

    baseline `group`: GRPOTrainer's (minus the group mean, `scale_rewards` group/batch/none); `noisy`: the same over
    the noisy copies only (copy 0, the anchor, is left out of mean and std and gets advantage 0); `anchor`:
    A_g = R_g - R_0."""
    weights = reward_weights.to(rewards_per_func.device).unsqueeze(0)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    G = num_generations
    rewards = (rewards_per_func * weights).nansum(dim=1)
    rewards[unscorable] = torch.nan
    if baseline == "anchor":
        grouped = rewards.view(-1, G)
        advantages = (grouped - grouped[:, :1]).reshape(-1)
        std = nanstd(grouped, dim=1).repeat_interleave(G) if G > 1 else torch.zeros_like(rewards)
    elif baseline == "noisy":
        grouped = rewards.view(-1, G)
        first = 1 if anchor_copy else 0
        noisy = grouped[:, first:]
        mean = torch.nanmean(noisy, dim=1, keepdim=True)
        spread = nanstd(noisy, dim=1).unsqueeze(1) if noisy.shape[1] > 1 else torch.zeros_like(mean)
        if scale_rewards == "batch":
            spread = nanstd(noisy.reshape(-1)).expand_as(spread)
        advantages = grouped - mean
        if scale_rewards != "none":
            advantages = advantages / (spread + 1e-4)
        if anchor_copy:
            advantages[:, 0] = 0.0
        advantages = advantages.reshape(-1)
        std = spread.expand(-1, G).reshape(-1)
    elif aggregation == "sum_then_normalize":
        mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
        if scale_rewards in ("group", "none"):
            std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if G > 1 else torch.zeros_like(rewards)
        elif scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        else:
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    elif aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, G, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1])
        summed = (reward_k * weights).nansum(dim=1)
        summed[unscorable] = torch.nan
        std = nanstd(summed).expand_as(summed) if summed.numel() > 1 else torch.zeros_like(summed)
        advantages = (summed - torch.nanmean(summed)) / (std + 1e-4)
    else:
        raise ValueError("multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum'")
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), rewards, is_std_zero


def action_noise(
    seed: int, step_key: str, groups: Sequence[int], copies: Sequence[int], item_ids: Sequence[str], dim: int,
    anchor_copy: bool = True, antithetic: bool = False,
) -> torch.Tensor:
    """eps (rows, dim), each row drawn from its own generator keyed by (seed, step, group, copy, item id): the
    same numbers whatever the number of processes, the batch split or the device. Copy 0 is zero with an anchor.
    `antithetic`: noisy copies pair up, the second of a pair takes minus the first's noise (an odd one out draws
    its own)."""
    out = torch.zeros(len(groups), dim)
    first = 1 if anchor_copy else 0
    for row, (group, copy_idx, item) in enumerate(zip(groups, copies, item_ids)):
        if anchor_copy and copy_idx == 0:
            continue
        sign, source = 1.0, copy_idx
        if antithetic and (copy_idx - first) % 2 == 1:
            sign, source = -1.0, copy_idx - 1
        generator = torch.Generator().manual_seed(stable_hash(f"{seed}|{step_key}|{group}|{source}|{item}"))
        out[row] = sign * torch.randn(dim, generator=generator)
    return out


# ---- LLM passes -----------------------------------------------------------------------------------------------------
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


@contextmanager
def _thought_module_swapped(embedder: ThoughtEmbedder, module: nn.Module):
    original = embedder.thought_module
    embedder.thought_module = module
    try:
        yield
    finally:
        embedder.thought_module = original


class CRRLPolicy(nn.Module):
    """What `Trainer` sees: the embedder (LLM frozen unless `train_lora`); its forward returns the policy mean mu."""

    def __init__(self, embedder: ThoughtEmbedder, train_lora: bool = False, llm_eval: bool = True):
        super().__init__()
        self.embedder = embedder
        self.train_lora = train_lora
        self.llm_eval = llm_eval
        self.config = embedder.config  # read by Trainer

    def train(self, mode: bool = True):
        super().train(mode)
        if self.llm_eval:  # the frozen LLM never runs dropout: its prefix states are constants of the problem
            self.embedder.model.eval()
        return self

    def forward(self, hidden=None, mask=None, prefix_ids=None, literal: bool = False) -> torch.Tensor:
        """mu_theta(x): from cached prefix states (fast), or re-encoding `prefix_ids` (LoRA training: with gradient
        through the LLM; literal: pass 1 of the literal method)."""
        if literal:
            return self.embedder.literal_thought_vector(prefix_ids)
        if prefix_ids is not None:
            prefix = self.embedder.encode_prefix(prefix_ids, use_cache=False)
            return self.embedder.thought_module(prefix.hidden, prefix.mask)
        return self.embedder.thought_module(hidden, mask)

    def save_pretrained(self, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
        save_wrapped_embedder(self, folder, state_dict)

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        self.embedder.load_trained_state(folder, adapter=self.train_lora)


def load_crrl_embedder(model: ThoughtEmbedder | str | os.PathLike | None, args: CRRLConfig) -> ThoughtEmbedder:
    """A ThoughtEmbedder from an instance, a checkpoint folder, `args.lrcl_checkpoint`, or `args.model_name_or_path`
    (fresh thought module, built from the `ModelArguments` fields as LRCL builds it, without LoRA)."""
    if isinstance(model, ThoughtEmbedder):
        return model
    path = model if model is not None else args.lrcl_checkpoint
    if path is not None:
        return ThoughtEmbedder.from_pretrained(path, is_trainable=args.train_lora, dtype=args.model_dtype)
    if args.model_name_or_path is None:
        raise ValueError("CRRLTrainer needs a ThoughtEmbedder, a checkpoint path, args.lrcl_checkpoint or args.model_name_or_path")
    warnings.warn("CRRL from a bare backbone: the thought module starts untrained (no LRCL checkpoint given)")
    return ThoughtEmbedder.from_backbone(
        args.model_name_or_path, formatter=args.prompt_formatter(), pooling=args.pooling, dtype=args.model_dtype,
        quantization=args.quantization, attn_implementation=args.attn_implementation, rope_base=args.thought_rope_base,
    )


def _catalogue_from(source) -> dict[str, Any]:
    """item id -> attributes, from a mapping, a `datasets.Dataset` / list of rows with `item_id` and `attributes`."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return {str(k): v for k, v in source.items()}
    ids, attrs = (source["item_id"], source["attributes"]) if hasattr(source, "column_names") else (
        [r["item_id"] for r in source], [r["attributes"] for r in source])
    return {str(i): a for i, a in zip(ids, attrs)}


def _names_keyword(func, name: str) -> bool:
    """Whether `func` names the keyword `name` in its signature (not merely through **kwargs)."""
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


class CRRLTrainer(EmbedderCheckpointMixin, HubPushMixin, GRPOTrainer):
    """GRPO on the latent thought of a `ThoughtEmbedder`; only the thought module trains (optionally LoRA too).

    Args:
        model: a ThoughtEmbedder, a checkpoint folder (LRCL output) or None (`args.lrcl_checkpoint`).
        args: `CRRLConfig`.
        train_dataset: `datasets.Dataset` with `item_id` (and `attributes`) per item; optional columns
            `candidate_ids` (N ids) and `positive_weights` (N floats, > 0 marks a positive) fix the candidates of a
            row, otherwise `candidates` draws them. Other columns are passed to the reward functions.
        candidates: a `CooccurrenceCandidates` index (positives fixed, negatives redrawn every epoch).
        catalogue: id -> attributes of every item that can be a candidate (default: the train/eval datasets).
        reward_funcs: callables or names; default `args.reward_funcs`.
        yardstick: a `crrl_yardstick.CRRLYardstick`; when given, `evaluate()` scores it (on held-out items) instead of
            running rollouts on `eval_dataset`.
    """

    _tag_names = ["trl", "grpo", "reaemb", "crrl"]
    _name = "CRRL"

    def __init__(
        self,
        model: ThoughtEmbedder | str | os.PathLike | None = None,
        args: CRRLConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        candidates: CooccurrenceCandidates | None = None,
        catalogue=None,
        reward_funcs: Sequence[Any] | Any | None = None,
        callbacks=None,
        optimizers=(None, None),
        yardstick=None,
    ):
        args = args or CRRLConfig(output_dir="crrl-output")
        if not isinstance(args, CRRLConfig):
            raise TypeError(f"args must be a CRRLConfig, got {type(args).__name__}")
        set_seed(args.seed)
        embedder = load_crrl_embedder(model, args)
        if args.share_template is not None:
            embedder.share_template = args.share_template
        # ---- what trains: the thought module (and LoRA when asked); the LLM is frozen --------------------------
        if args.train_lora and not embedder.has_adapter:
            raise ValueError("train_lora=True but the embedder has no LoRA adapter (LRCL checkpoints trained with LoRA have one)")
        for name, param in embedder.model.named_parameters():
            param.requires_grad_(bool(args.train_lora and "lora_" in name))
        embedder.thought_module.requires_grad_(True)
        if args.thought_trainable == "value":  # keep LRCL's attention pattern, move only what it reads out
            embedder.thought_module.q_proj.requires_grad_(False)
            embedder.thought_module.k_proj.requires_grad_(False)
        llm_eval = not args.train_lora or args.disable_dropout
        if args.disable_dropout:
            disable_dropout_in_model(embedder.model)
        self.embedder = embedder

        # ---- rewards (TRL attributes) ---------------------------------------------------------------------------
        specs = args.reward_funcs if reward_funcs is None else reward_funcs
        specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
        self.reward_funcs = [resolve_reward(s) for s in specs]
        if any(isinstance(f, nn.Module) for f in self.reward_funcs):
            raise TypeError("CRRL rewards score embeddings: reward models (nn.Module) are not supported")
        self.reward_func_names = [reward_name(f) for f in self.reward_funcs]
        for func, name in zip(self.reward_funcs, self.reward_func_names):
            if _names_keyword(func, "thoughts"):
                warnings.warn(f"reward function {name!r} takes `thoughts`, the deprecated name of `actions` (the noisy "
                              "latent actions z); rename the argument", DeprecationWarning, stacklevel=2)
        if args.reward_weights is not None:
            if len(args.reward_weights) != len(self.reward_funcs):
                raise ValueError(
                    f"{len(args.reward_weights)} reward weights for {len(self.reward_funcs)} reward functions"
                )
            self.reward_weights = torch.tensor(args.reward_weights, dtype=torch.float32)
        else:
            self.reward_weights = torch.ones(len(self.reward_funcs), dtype=torch.float32)
        self.reward_processing_classes = [None] * len(self.reward_funcs)
        self.collaborative_table = CollaborativeTable.load(args.collaborative_table) if args.collaborative_table else None

        # ---- data: candidates and the catalogue ------------------------------------------------------------------
        self.candidates = candidates
        columns = set(getattr(train_dataset, "column_names", None) or [])
        if train_dataset is not None and "item_id" not in columns:
            raise KeyError(f"train_dataset needs an 'item_id' column; it has {sorted(columns)}")
        if train_dataset is not None and candidates is None and "candidate_ids" not in columns:
            raise ValueError("give `candidates` (a CooccurrenceCandidates index) or a `candidate_ids` column")
        self.catalogue = _catalogue_from(train_dataset)
        if isinstance(eval_dataset, Mapping) and not hasattr(eval_dataset, "column_names"):
            for ds in eval_dataset.values():
                self.catalogue.update(_catalogue_from(ds) if "attributes" in getattr(ds, "column_names", []) else {})
        elif eval_dataset is not None and "attributes" in getattr(eval_dataset, "column_names", []):
            self.catalogue.update(_catalogue_from(eval_dataset))
        self.catalogue.update(_catalogue_from(catalogue))
        self.yardstick = yardstick
        self._prefix_ids_cache: dict[str, list[int]] = {}
        self._prefix_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._reference: dict[str, Any] | None = None  # catalogue table of the current thought module
        frozen_llm = not args.train_lora and args.forward_method == "fast"
        self._prefix_store = PrefixStore(args.prefix_cache_gb * 2**30) if frozen_llm and args.prefix_cache_gb > 0 else None
        self._rollout_global_step = -1
        self._eval_generations = 0
        self._last_generation: dict[str, Any] = {}

        self._init_grpo_state(args)
        _BaseTrainer.__init__(
            self,
            model=CRRLPolicy(embedder, train_lora=args.train_lora, llm_eval=llm_eval),
            args=args,
            data_collator=identity,  # rows stay dicts, as in GRPO
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=embedder.tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.ref_thought_module = None  # the starting thought module, for the KL term
        if self.beta != 0.0:
            self.ref_thought_module = copy.deepcopy(embedder.thought_module).requires_grad_(False).to(
                self.accelerator.device)

    def _init_grpo_state(self, args: CRRLConfig) -> None:
        """The state GRPOTrainer.__init__ would set and that the GRPOTrainer methods CRRL inherits read.

        This is the one place that couples CRRL to GRPOTrainer's private attributes: when moving TRL's pin, run
        tests/test_trl_coupling.py, which lists the attributes those methods read in the installed TRL."""
        self.num_generations = args.num_generations
        self.num_generations_eval = args.num_generations_eval or self.num_generations
        self.num_iterations = args.num_iterations
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.beta = args.beta
        self.loss_type = args.loss_type
        self.scale_rewards = args.scale_rewards
        self.multi_objective_aggregation = args.multi_objective_aggregation
        self.importance_sampling_level = args.importance_sampling_level
        self.shuffle_dataset = args.shuffle_dataset
        self.max_completion_length = args.max_completion_length
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.environment_factories = None
        self.environments = None
        self._multi_environment = False
        self.tools = []
        self.rollout_func = None
        self._has_async_funcs = False
        self.ref_model = None
        self.use_adaptive_entropy = False
        self.entropy_coef = 0.0
        self._last_world_entropy = None
        self._entropy_bonus_enabled = False
        self.aux_loss_enabled = False
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self._step = 0
        self._buffered_inputs = None
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        self._current_train_step_time = 0.0
        if args.log_completions:
            warnings.warn("log_completions is not supported by CRRL (there are no text completions); ignoring it")
        self.log_completions = False
        self.log_multimodal = False
        self.log_unique_prompts = False
        self.num_completions_to_print = args.num_completions_to_print
        self._logs = {"advantages": [], "rewards": defaultdict(list), "extra": defaultdict(list)}
        self._pending_extra_logs = defaultdict(list)
        self._pending_metrics = defaultdict(list)

    # ---- data ---------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["item_id", "attributes", "candidate_ids", "positive_weights"]

    def _item_prefix_ids(self, item_id: str) -> list[int]:
        ids = self._prefix_ids_cache.get(item_id)
        if ids is None:
            if item_id not in self.catalogue:
                raise KeyError(f"item {item_id!r} has no attributes: add it to `catalogue` (or the train dataset)")
            attrs = normalise_attributes(self.catalogue[item_id])
            ids = self._prefix_ids_cache[item_id] = self.embedder.formatter.prefix_ids(attrs, self.embedder.tokenizer)
        return ids

    def _row_candidates(self, inputs: list[dict], mode: str) -> tuple[list[list[str]], torch.Tensor]:
        if "candidate_ids" in inputs[0]:
            ids = [[str(c) for c in x["candidate_ids"]] for x in inputs]
            if "positive_weights" not in inputs[0]:
                raise KeyError("rows with `candidate_ids` also need `positive_weights` (> 0 marks a positive)")
            weights = torch.tensor([list(map(float, x["positive_weights"])) for x in inputs], dtype=torch.float32)
            return ids, weights
        epoch = int(self.state.epoch or 0) if mode == "train" else 0
        item_ids = [str(x["item_id"]) for x in inputs]
        unique = list(dict.fromkeys(item_ids))
        cand, weights = self.candidates.candidates(unique, epoch=epoch)
        where = {item: i for i, item in enumerate(unique)}
        rows = [where[i] for i in item_ids]
        return [list(cand[r]) for r in rows], torch.as_tensor(weights[rows], dtype=torch.float32)

    # ---- the catalogue table: reference candidates, the centre of centred cosine, the yardstick ----------------
    @torch.no_grad()
    def catalogue_table(self) -> tuple[list[str], torch.Tensor]:
        """Noise-free embeddings of every catalogue item under the current thought module (float32, on device)."""
        ids = list(self.catalogue)
        policy = self.accelerator.unwrap_model(self.model)
        training = policy.training
        with self.accelerator.autocast(), gathered_for_rollout(self.model_wrapped, self.accelerator,
                                                               self.args.ds3_gather_for_generation):
            if self._prefix_store is None:
                table = self.embedder.encode([self.catalogue[i] for i in ids], batch_size=self.args.embed_batch_size)
            else:  # the frozen LLM's prefixes come from the store: only the thought module and the suffix run
                chunk, emb, parts = self.args.embed_batch_size, self.embedder, []
                by_length = sorted(ids, key=lambda i: len(self._item_prefix_ids(i)))
                for start in range(0, len(by_length), chunk):
                    prefix = self._encode_prefixes(by_length[start : start + chunk])
                    parts.append(emb.embed_from_thought(prefix, emb.thought_vector(prefix)).float())
                order = {item: n for n, item in enumerate(by_length)}
                table = torch.cat(parts)[torch.tensor([order[i] for i in ids], device=parts[0].device)]
        policy.train(training)  # encode() restores the embedder's mode; the policy keeps the frozen LLM in eval
        return ids, table.to(self.accelerator.device)

    def _needs_reference(self) -> bool:
        return self.args.reference_refresh_steps > 0 or self.args.similarity == "centered_cosine"

    def _refresh_reference(self, force: bool = False) -> None:
        """(Re)compute the catalogue table when due: at the start, then every `reference_refresh_steps` steps."""
        step, every = self.state.global_step, self.args.reference_refresh_steps
        if not force and self._reference is not None and (every == 0 or step - self._reference["step"] < every):
            return
        ids, table = self.catalogue_table()
        self._reference = {"step": step, "ids": ids, "row": {i: n for n, i in enumerate(ids)}, "table": table,
                           "center": table.mean(0)}

    def _similarities(self, items: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        kind = self.args.similarity
        if kind == "centered_cosine":
            center = self._reference["center"].to(items.device)
            items, cands, kind = items - center, cands - center, "cosine"
        return similarity_matrix(items, cands, kind)

    # ---- the latent rollout ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_prefixes(self, item_ids: list[str]) -> PrefixStates:
        """Prefix states of `item_ids` (in order): from the store when the LLM is frozen, else encoded now."""
        emb, chunk, store = self.embedder, self.args.embed_batch_size, self._prefix_store
        if store is not None and not store.full:
            missing = [i for i in dict.fromkeys(item_ids) if i not in store.rows]
            for s in range(0, len(missing), chunk):
                part = missing[s : s + chunk]
                store.add(part, emb.encode_prefix([self._item_prefix_ids(i) for i in part]))
        if store is not None and all(i in store.rows for i in item_ids):
            return store.assemble(item_ids)
        return cat_prefix_states([emb.encode_prefix([self._item_prefix_ids(i) for i in item_ids[s : s + chunk]])
                                  for s in range(0, len(item_ids), chunk)])

    @torch.no_grad()
    def _embed_fast(self, item_ids, candidate_ids, eps, mode):
        emb, chunk = self.embedder, self.args.embed_batch_size
        item_unique = list(dict.fromkeys(item_ids))
        use_reference = self.args.reference_refresh_steps > 0
        cand_unique = [] if use_reference else [c for c in dict.fromkeys(c for r in candidate_ids for c in r)
                                                 if c not in set(item_unique)]
        prefix = self._encode_prefixes(item_unique + cand_unique)
        where = {item: i for i, item in enumerate(item_unique + cand_unique)}
        # Cache the item prefixes: the policy loss reads them, with no LLM pass. mu is computed from this cache,
        # as the loss will compute it.
        item_rows = torch.arange(len(item_unique), device=prefix.hidden.device)
        hidden, mask = prefix.hidden[item_rows].detach(), prefix.mask[item_rows]
        self._prefix_cache[mode] = (hidden, mask)
        local = {item: i for i, item in enumerate(item_unique)}
        prefix_index = torch.tensor([local[i] for i in item_ids], device=hidden.device)
        mu = emb.thought_module(hidden[prefix_index], mask[prefix_index]).float()
        sigma = action_scale(mu, self.args.noise_scale, self.args.noise_scale_mode)
        z = mu + sigma.unsqueeze(1) * eps.to(mu.device)
        item_emb = torch.cat(
            [emb.embed_from_thought(prefix.select(prefix_index[s : s + chunk]), z[s : s + chunk])
             for s in range(0, len(prefix_index), chunk)]
        ).float()
        if use_reference:
            ref = self._reference
            index = torch.tensor([[ref["row"][c] for c in row] for row in candidate_ids], device=ref["table"].device)
            cand_emb = ref["table"][index].to(item_emb.device)
        else:
            cand_unique = list(dict.fromkeys(c for row in candidate_ids for c in row))
            cand_rows = torch.tensor([where[c] for c in cand_unique], device=hidden.device)
            mu_cand = emb.thought_vector(prefix.select(cand_rows)).float()
            cand_emb = torch.cat(
                [emb.embed_from_thought(prefix.select(cand_rows[s : s + chunk]), mu_cand[s : s + chunk])
                 for s in range(0, len(cand_rows), chunk)]
            ).float()
            cand_where = {c: i for i, c in enumerate(cand_unique)}
            cand_emb = cand_emb[torch.tensor([[cand_where[c] for c in row] for row in candidate_ids],
                                             device=cand_emb.device)]
        ref_mu = None
        if self.ref_thought_module is not None:
            ref_mu = self.ref_thought_module(hidden[prefix_index], mask[prefix_index]).float()
        return mu, sigma, z, item_emb, cand_emb, prefix_index, ref_mu

    @torch.no_grad()
    def _embed_literal(self, item_ids, candidate_ids, eps):
        """Reference oracle: full passes per copy and per candidate slot, nothing shared."""
        emb, chunk = self.embedder, self.args.embed_batch_size
        ids = [self._item_prefix_ids(i) for i in item_ids]
        mu = torch.cat([emb.literal_thought_vector(ids[s : s + chunk]) for s in range(0, len(ids), chunk)]).float()
        sigma = action_scale(mu, self.args.noise_scale, self.args.noise_scale_mode)
        z = mu + sigma.unsqueeze(1) * eps.to(mu.device)
        item_emb = torch.cat(
            [emb.literal_embed_with_thought(ids[s : s + chunk], z[s : s + chunk]) for s in range(0, len(ids), chunk)]
        ).float()
        if self.args.reference_refresh_steps > 0:
            ref = self._reference
            index = torch.tensor([[ref["row"][c] for c in row] for row in candidate_ids], device=ref["table"].device)
            cand_emb = ref["table"][index].to(item_emb.device)
        else:
            flat = [self._item_prefix_ids(c) for row in candidate_ids for c in row]
            cand = []
            for s in range(0, len(flat), chunk):
                part = flat[s : s + chunk]
                cand.append(emb.literal_embed_with_thought(part, emb.literal_thought_vector(part)))
            cand_emb = torch.cat(cand).float().view(len(item_ids), len(candidate_ids[0]), -1)
        ref_mu = None
        if self.ref_thought_module is not None:
            with _thought_module_swapped(emb, self.ref_thought_module):
                ref_mu = torch.cat(
                    [emb.literal_thought_vector(ids[s : s + chunk]) for s in range(0, len(ids), chunk)]).float()
        return mu, sigma, z, item_emb, cand_emb, ref_mu

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        n = len(inputs)
        item_ids = [str(x["item_id"]) for x in inputs]
        # Rows of the global generation batch are the processes' local batches in process order; groups are G
        # consecutive rows of it (RepeatSampler), so (group, copy) do not depend on the number of processes.
        global_rows = np.arange(n) + self.accelerator.process_index * n
        groups, copies = (global_rows // G).tolist(), (global_rows % G).tolist()
        if mode == "train":
            step_key = f"train|{self.state.global_step}|{self._step % max(1, self.args.gradient_accumulation_steps)}"
            self._rollout_global_step = self.state.global_step
        else:
            step_key = f"eval|{self.state.global_step}|{self._eval_generations}"
            self._eval_generations += 1
        if self._needs_reference():
            self._refresh_reference()
        candidate_ids, positive_weights = self._row_candidates(inputs, mode)
        eps = action_noise(
            self.args.noise_seed, step_key, groups, copies, item_ids, self.embedder.thought_module.hidden_size,
            anchor_copy=self.args.anchor_copy, antithetic=self.args.antithetic,
        )
        literal = self.args.forward_method == "literal"
        # The LLM passes run under the run's mixed precision (bf16/fp16); the thought module always in float32.
        # Under ZeRO-3 the weights are gathered once per rollout: ranks make different numbers of LLM calls.
        rollout_weights = gathered_for_rollout(self.model_wrapped, self.accelerator, self.args.ds3_gather_for_generation)
        with torch.no_grad(), self.accelerator.autocast(), rollout_weights:
            if literal:
                mu, sigma, z, item_emb, cand_emb, ref_mu = self._embed_literal(item_ids, candidate_ids, eps)
                prefix_index = None
            else:
                mu, sigma, z, item_emb, cand_emb, prefix_index, ref_mu = self._embed_fast(
                    item_ids, candidate_ids, eps, mode)
            similarities = self._similarities(item_emb, cand_emb)
            old_logps = gaussian_log_prob(z, mu, sigma)

        positive_weights = positive_weights.to(device)
        reward_kwargs = {
            "item_ids": item_ids,
            "copy_index": copies,
            "candidate_ids": candidate_ids,
            "positive_mask": positive_weights > 0,
            "positive_weights": positive_weights,
            "item_embeddings": item_emb,
            "candidate_embeddings": cand_emb,
            "similarities": similarities,
            "similarity": self.args.similarity,
            "actions": z,
            "thoughts": z,  # deprecated alias of `actions`
            "reward_temperature": self.args.reward_temperature,
            "collaborative_table": self.collaborative_table,
        }
        rewards_per_func = self._latent_rewards(inputs, reward_kwargs)  # gathered: (global rows, F)
        advantages, rewards, is_std_zero = compute_advantages(
            rewards_per_func, self.reward_weights, G, self.scale_rewards, self.multi_objective_aggregation,
            self.args.advantage_baseline, self.args.anchor_copy,
        )
        process_slice = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        all_advantages = advantages.clone()
        advantages = advantages[process_slice]
        self._log_rollout_metrics(mode, G, rewards_per_func, rewards, is_std_zero, mu, sigma, similarities,
                                  positive_weights)

        self._last_generation = {
            "item_ids": item_ids,
            "copy_index": copies,
            "candidate_ids": candidate_ids,
            "eps": eps,
            "mu": mu,
            "sigma": sigma,
            "actions": z,
            "item_embeddings": item_emb,
            "candidate_embeddings": cand_emb,
            "similarities": similarities,
            "rewards_per_func": rewards_per_func,
            "advantages": all_advantages,
            "old_logps": old_logps,
        }

        output: dict[str, Any] = {
            "actions": z.to(device), "advantages": advantages.to(device), "sigma": sigma.to(device),
            "mu": mu.to(device), "old_logps": old_logps.to(device),
            # The policy loss's own log-prob at its first use replaces `old_logps` when no update has happened since
            # this rollout (see _compute_loss): then the first iteration's ratio is exactly 1.
            "first_use": torch.ones(n, dtype=torch.bool, device=device),
        }
        if ref_mu is not None:
            output["ref_mu"] = ref_mu.to(device)
        if literal or self.args.train_lora:
            output["prefix_ids"] = [self._item_prefix_ids(i) for i in item_ids]
        else:
            output["prefix_index"] = prefix_index
        return output

    def _log_rollout_metrics(self, mode, G, rewards_per_func, rewards, is_std_zero, mu, sigma, similarities,
                             positive_weights) -> None:
        metrics = self._metrics[mode]
        device = self.accelerator.device
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, i]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        metrics["frac_reward_zero_std"].append(is_std_zero.float().mean().item())
        if self.args.anchor_copy and G > 2:
            # groups whose noisy copies all score alike while the anchor scores differently: no usable signal
            grouped = rewards.view(-1, G)
            noisy_flat = (grouped[:, 1:] == grouped[:, 1:2]).all(dim=1)
            metrics["frac_anchor_only_differs"].append((noisy_flat & (grouped[:, 0] != grouped[:, 1])).float().mean().item())
        anchor_sim = similarities.gather(1, positive_weights.argmax(-1, keepdim=True)).squeeze(1)
        rms = mu.norm(dim=-1) / mu.shape[-1] ** 0.5
        metrics["thought/mu_norm"].append(self.accelerator.gather(mu.norm(dim=-1)).mean().item())
        metrics["thought/sigma"].append(self.accelerator.gather(sigma).mean().item())
        metrics["thought/sigma_over_rms_mu"].append(self.accelerator.gather(sigma / rms.clamp(min=1e-12)).mean().item())
        metrics["similarity/positive_mean"].append(self.accelerator.gather(anchor_sim).mean().item())
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            stats = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=device)
            total, count = self.accelerator.gather(stats).view(-1, 2).sum(dim=0).tolist()
            metrics[name].append(total / max(count, 1))
        self._pending_metrics.clear()
        self._pending_extra_logs.clear()

    def _latent_rewards(self, inputs: list[dict], reward_kwargs: dict[str, Any]) -> torch.Tensor:
        """TRL's reward contract: keyword arguments, one `float | None` per row, None -> NaN; gathered from all
        processes. (GRPOTrainer's `_calculate_rewards` takes text completions; this is its latent counterpart.)"""
        device = self.accelerator.device
        n = len(inputs)
        kwargs = {key: [x[key] for x in inputs] for key in inputs[0] if key not in reward_kwargs}
        kwargs.update(reward_kwargs)
        kwargs["trainer_state"] = self.state
        kwargs["log_extra"] = self._log_completion_extra
        kwargs["log_metric"] = self._log_metric
        rewards_per_func = torch.zeros(n, len(self.reward_funcs), device=device)
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names)):
            values = func(**kwargs)
            if len(values) != n:
                raise ValueError(f"The reward function '{name}' returned {len(values)} rewards, but {n} were expected")
            rewards_per_func[:, i] = torch.tensor(
                [torch.nan if v is None else float(v) for v in values], dtype=torch.float32, device=device
            )
        if torch.isnan(rewards_per_func).all(dim=1).any():
            row = int(torch.isnan(rewards_per_func).all(dim=1).nonzero()[0, 0])
            warnings.warn(f"every reward function returned None for item {kwargs['item_ids'][row]!r}; its advantage is 0")
        return gather(rewards_per_func)

    # ---- the policy loss (no LLM pass on the fast path) -----------------------------------------------------------
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        if self.args.forward_method == "literal":
            mu = model(prefix_ids=inputs["prefix_ids"], literal=True)
        elif self.args.train_lora:
            mu = model(prefix_ids=inputs["prefix_ids"])
        else:
            hidden, mask = self._prefix_cache[mode]
            index = inputs["prefix_index"]
            mu = model(hidden=hidden[index], mask=mask[index])
        mu = mu.float()
        sigma = inputs["sigma"].float()
        z, advantages = inputs["actions"].float(), inputs["advantages"].float()
        logp = gaussian_log_prob(z, mu, sigma)
        if mode == "train" and bool(inputs["first_use"].all()) and self.state.global_step == self._rollout_global_step:
            # No optimizer step since the rollout: the policy is the rollout's, so its log-prob computed exactly as
            # the later iterations will compute theirs is the old log-prob (ratio exactly 1, no float drift).
            inputs["old_logps"] = logp.detach()
        inputs["first_use"] = torch.zeros_like(inputs["first_use"])
        old_logp = inputs["old_logps"]
        per_row, ratio = clipped_policy_loss(
            logp, old_logp, advantages, self.epsilon_low, self.epsilon_high, self.loss_type, self.args.delta,
            self.args.sapo_temperature_pos, self.args.sapo_temperature_neg,
        )
        kl = None
        if self.beta != 0.0:
            kl = gaussian_kl(mu, inputs["ref_mu"], sigma)
            per_row = per_row + self.beta * kl
        loss = per_row.mean()
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps

        def global_mean(x: torch.Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if kl is not None:
            metrics["kl"].append(global_mean(kl.detach()))
        log_ratio = (logp - old_logp).detach().abs()
        metrics["policy/log_ratio_abs"].append(global_mean(log_ratio))
        if mode == "train":
            generate_every = self.args.steps_per_generation * self.num_iterations
            iteration = (self._step % generate_every) // self.args.steps_per_generation + 1
            metrics[f"policy/log_ratio_abs/iter{iteration}"].append(global_mean(log_ratio))
            # how far mu moved since the rollout, in units of sigma (PPO's clip range allows ~0.25)
            moved = (mu.detach() - inputs["mu"].float()).norm(dim=-1) / sigma
            metrics[f"policy/delta_mu_over_sigma/iter{iteration}"].append(global_mean(moved))
        if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
            low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
            high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
            metrics["clip_ratio/low_mean"].append(global_mean(low))
            metrics["clip_ratio/high_mean"].append(global_mean(high))
            metrics["clip_ratio/region_mean"].append(global_mean(low | high))
            metrics["clip_ratio/low_min"].append(self.accelerator.gather(low.float()).min().item())
            metrics["clip_ratio/high_max"].append(self.accelerator.gather(high.float()).max().item())
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean((ratio > self.epsilon_high) & (advantages > 0)))
        return loss

    # ---- evaluation: the frozen yardstick on held-out items --------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """With a yardstick: embed the catalogue with the current (noise-free) thought module and score the frozen
        yardstick of `crrl_yardstick` (held-out anchor rewards, validation pairs); logged to the `report_to` sinks.
        Without one: TRL's evaluation (rollouts and policy loss on `eval_dataset`)."""
        if self.yardstick is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        ids, table = self.catalogue_table()
        self.last_catalogue_table = (ids, table)  # the quickstart writes it as an item table (no second encoding)
        scores = self.yardstick.score(table.cpu(), ids)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in scores.items()}
        metrics["epoch"] = self.state.epoch
        Trainer.log(self, metrics)  # not GRPOTrainer.log: that would flush the pending training metrics here
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def create_model_card(self, *args, **kwargs) -> None:
        """No LM model card: the checkpoint is an embedding model (see its reaemb_config.json)."""
        return None
