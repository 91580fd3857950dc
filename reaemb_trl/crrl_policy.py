"""CRRL's policy (docs/method.md, "CRRL"): a Gaussian over the thought vector, `z ~ N(mu_theta(x), sigma^2 I)`, and
TRL's GRPO objective for one latent action per row. The maths are plain functions, tested against hand computations;
`CRRLPolicy` is the module `Trainer` optimises.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn
from trl.trainer.utils import disable_dropout_in_model, nanstd

from reaemb_trl.candidates import stable_hash
from reaemb_trl.checkpointing import save_wrapped_embedder
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.embedder import ThoughtEmbedder
from reaemb_trl.thought_delta import (
    add_lowrank_delta,
    folded_state,
    folded_thought_module,
    load_delta,
    lowrank_delta,
    save_delta,
)


# ---- the maths ------------------------------------------------------------------------------------------------------
def _squared_distance(a: torch.Tensor, b: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """sum_j (a_j - b_j)^2 / sigma_j^2 per row: sigma a float, one per row (R,), or one per coordinate (R, d)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=a.device)
    if sigma.dim() == a.dim():  # diagonal covariance
        return (((a.float() - b.float()) / sigma) ** 2).sum(-1)
    return ((a.float() - b.float()) ** 2).sum(-1) / sigma**2


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """log pi(z | x) = -sum_j (z_j - mu_j)^2 / (2 sigma_j^2), per row, up to a constant (sigma: a float, one per row
    or one per coordinate, fixed at the rollout, so -sum_j log sigma_j is a constant too)."""
    return -_squared_distance(z, mu, sigma) / 2.0


def gaussian_kl(mu: torch.Tensor, mu_ref: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag sigma^2) || N(mu_ref, diag sigma^2)) = sum_j (mu_j - mu_ref_j)^2 / (2 sigma_j^2), per row."""
    return _squared_distance(mu, mu_ref, sigma) / 2.0


def sigma_rms(sigma: torch.Tensor) -> torch.Tensor:
    """One sigma per row: itself, or the RMS over coordinates of a per-coordinate sigma (R, d)."""
    return sigma if sigma.dim() == 1 else sigma.pow(2).mean(-1).sqrt()


def sigma_units(delta: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """||delta|| in units of sigma per row (whitened by a per-coordinate sigma)."""
    return delta.norm(dim=-1) / sigma if sigma.dim() == 1 else (delta / sigma).norm(dim=-1)


def action_scale(mu: torch.Tensor, noise_scale: float, mode: str, spread: torch.Tensor | None = None) -> torch.Tensor:
    """sigma: per row (R,) `noise_scale` (absolute) or `noise_scale` x RMS of the row's coordinates (relative); per
    coordinate (R, d) `noise_scale` x `spread`, each coordinate's standard deviation across items (spread)."""
    if mode == "absolute":
        return torch.full((mu.shape[0],), float(noise_scale), device=mu.device)
    if mode == "relative":
        return noise_scale * mu.detach().float().norm(dim=-1) / mu.shape[-1] ** 0.5
    if mode == "spread":
        if spread is None:
            raise ValueError("noise_scale_mode='spread' needs the spread of mu across items")
        return (noise_scale * spread.float().to(mu.device)).expand(mu.shape[0], -1)
    raise ValueError(f"noise_scale_mode must be 'absolute', 'relative' or 'spread', got {mode!r}")


def thought_spread(mu: torch.Tensor) -> torch.Tensor:
    """Each coordinate's standard deviation across the rows of `mu` (items, d), floored at 1e-3 x its RMS over the
    coordinates: a coordinate that never varies still explores a little, and 1 / sigma^2 stays finite."""
    spread = mu.detach().float().std(dim=0)
    return spread.clamp(min=1e-3 * float(spread.pow(2).mean().sqrt()) + 1e-12)


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


# ---- the policy module ----------------------------------------------------------------------------------------------
@contextmanager
def swapped_thought_module(embedder: ThoughtEmbedder, module: nn.Module):
    """`embedder` with `module` as its thought module inside the block."""
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

    def forward(self, hidden=None, mask=None, item_mask=None, prefix_ids=None, literal: bool = False) -> torch.Tensor:
        """mu_theta(x): from cached prefix states (fast; `item_mask` marks the item's own tokens), or re-encoding
        `prefix_ids` (LoRA training: with gradient through the LLM; literal: pass 1 of the literal method)."""
        if literal:
            return self.embedder.literal_thought_vector(prefix_ids)
        if prefix_ids is not None:
            prefix = self.embedder.encode_prefix(prefix_ids, use_cache=False)
            return self.embedder.thought_module(prefix.hidden, prefix.mask, prefix.pool_mask)
        return self.embedder.thought_module(hidden, mask, item_mask)

    def save_pretrained(self, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
        """A ThoughtEmbedder checkpoint; with a low-rank delta, its thought module has the delta folded into
        `v_proj.weight` (the format every loader reads) and the factors go to their own file for resuming."""
        module = self.embedder.thought_module
        if lowrank_delta(module) is None:
            save_wrapped_embedder(self, folder, state_dict)
            return
        # Trainer's state dict under ZeRO-3 / FSDP (the live weights are partitions then), else the live one
        state = {k.removeprefix("module."): v for k, v in (state_dict or self.state_dict()).items()}
        prefix = "embedder.thought_module."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state.update({prefix + k: v for k, v in folded_state(own).items()})
        with swapped_thought_module(self.embedder, folded_thought_module(module)):  # the plain module's keys
            save_wrapped_embedder(self, folder, state)
        save_delta(own, folder)

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Resume: the trained weights of `folder`; with a low-rank delta only its factors (and LoRA with
        `train_lora`), the frozen base being the LRCL thought module the run started from."""
        if lowrank_delta(self.embedder.thought_module) is None:
            self.embedder.load_trained_state(folder, adapter=self.train_lora)
            return
        load_delta(self.embedder.thought_module, folder)
        if self.train_lora:
            with swapped_thought_module(self.embedder, folded_thought_module(self.embedder.thought_module)):
                self.embedder.load_trained_state(folder, adapter=True)

    @classmethod
    def for_training(cls, model: ThoughtEmbedder | str | os.PathLike | None, args: CRRLConfig) -> "CRRLPolicy":
        """The policy of a CRRL run: the embedder of `load_crrl_embedder` with what trains set: the thought module
        (only its value projection with `thought_trainable="value"`), and the LoRA adapter with `train_lora`; the
        LLM is frozen otherwise."""
        embedder = load_crrl_embedder(model, args)
        if args.share_template is not None:
            embedder.share_template = args.share_template
        if args.train_lora and not embedder.has_adapter:
            raise ValueError("train_lora=True but the embedder has no LoRA adapter (LRCL checkpoints trained with LoRA have one)")
        for name, param in embedder.model.named_parameters():
            param.requires_grad_(bool(args.train_lora and "lora_" in name))
        embedder.thought_module.requires_grad_(True)
        if args.thought_trainable == "value":  # keep LRCL's attention pattern, move only what it reads out
            embedder.thought_module.q_proj.requires_grad_(False)
            embedder.thought_module.k_proj.requires_grad_(False)
        if args.thought_trainable == "lowrank":  # LRCL frozen, a zero-initialised low-rank delta trains
            add_lowrank_delta(embedder.thought_module, args.thought_delta_rank)
        if args.disable_dropout:
            disable_dropout_in_model(embedder.model)
        return cls(embedder, train_lora=args.train_lora, llm_eval=not args.train_lora or args.disable_dropout)


def load_crrl_embedder(model: ThoughtEmbedder | str | os.PathLike | None, args: CRRLConfig) -> ThoughtEmbedder:
    """A ThoughtEmbedder from an instance, a checkpoint folder, `args.lrcl_checkpoint`, or `args.model_name_or_path`
    (fresh thought module, `ModelArguments.backbone_embedder`: as LRCL builds it, without LoRA)."""
    if isinstance(model, ThoughtEmbedder):
        return model
    path = model if model is not None else args.lrcl_checkpoint
    if path is not None:
        return ThoughtEmbedder.from_pretrained(path, is_trainable=args.train_lora, dtype=args.model_dtype)
    if args.model_name_or_path is None:
        raise ValueError("CRRLTrainer needs a ThoughtEmbedder, a checkpoint path, args.lrcl_checkpoint or args.model_name_or_path")
    warnings.warn("CRRL from a bare backbone: the thought module starts untrained (no LRCL checkpoint given)")
    return args.backbone_embedder()
