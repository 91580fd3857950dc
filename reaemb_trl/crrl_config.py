"""CRRLConfig: stage-2 training arguments (docs/method.md, "CRRL"), a `trl.GRPOConfig` with the latent-action
fields. The backbone, prompt and pooling fields come from `ModelArguments` (reaemb_trl/model_args.py), shared with
LRCLConfig: CRRL always reads `model_dtype` and `share_template`, the others only when it starts from a bare
backbone (no `lrcl_checkpoint`), and never the LoRA creation fields (an LRCL checkpoint brings its adapter;
`train_lora` trains it).

TRL's own semantics hold: `per_device_train_batch_size` counts rows (noisy copies), `num_generations` (G) copies
of an item form a group, `generation_batch_size` / `steps_per_generation` set how many rows are generated at once.
Defaults are the paper's setting unless noted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import GRPOConfig

from reaemb_trl.model_args import ModelArguments
from reaemb_trl.rewards import resolve_reward
from reaemb_trl.similarity import SIMILARITIES
BASELINES = ("group", "anchor", "noisy")
NOISE_SCALE_MODES = ("absolute", "relative", "spread")
THOUGHT_TRAINABLE = ("all", "value", "lowrank")
FORWARD_METHODS = ("fast", "literal")
# With one "token" (the latent action) per row, grpo/bnpo/dr_grpo/dapo all reduce to the mean over rows.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


@dataclass
class CRRLConfig(ModelArguments, GRPOConfig):
    """Arguments for `CRRLTrainer`: everything `trl.GRPOConfig` has, the model fields of `ModelArguments`, plus the
    method's own."""

    # ---- model ------------------------------------------------------------------------------------------------
    lrcl_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder of the LRCL stage (ThoughtEmbedder.save_pretrained). If None, "
                  "`model_name_or_path` is loaded with a fresh thought module (only sensible for smoke tests)."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Backbone to start from when there is no `lrcl_checkpoint` (`smollm2`, hub id or folder)."},
    )
    train_lora: bool = field(
        default=False,
        metadata={"help": "Also train the LoRA adapter of the LRCL checkpoint (the policy mean then needs an LLM "
                  "pass with gradient over the prefix). Default: only the thought module trains, the LLM is frozen."},
    )
    # ---- data (the dataset itself comes from the recipe's DataArguments) ----------------------------------------
    holdout: int = field(
        default=2,
        metadata={"help": "Each user's last `holdout` items (validation and test targets) are left out of the "
                  "co-occurrence counts."},
    )
    eval_item_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of the items held out of CRRL training, seeded by `eval_item_seed`; the evaluation "
                  "loop (eval_strategy / eval_steps) scores the frozen yardstick of reaemb_trl.crrl_yardstick on them. "
                  "0 trains on every item (the paper's)."},
    )
    eval_item_seed: int = field(
        default=0, metadata={"help": "Seed of the held-out item choice (fixed across training seeds by default)."}
    )
    # ---- latent action ----------------------------------------------------------------------------------------
    noise_scale: float = field(
        default=0.1,
        metadata={"help": "sigma: z_g = mu(x) + sigma * eps_g, eps_g ~ N(0, I). With noise_scale_mode=relative, "
                  "a multiple of the RMS of mu's coordinates, per row; with `spread`, a multiple of each "
                  "coordinate's standard deviation across items."},
    )
    noise_scale_mode: str = field(
        default="absolute",
        metadata={"help": "`absolute`: sigma = noise_scale (the paper's); `relative`: sigma_row = noise_scale x "
                  "||mu_row|| / sqrt(d), fixed at the rollout, so exploration follows the scale of mu (SmolLM2's "
                  "||mu|| ~ 30: noise_scale 0.3 is ~0.4 absolute); `spread`: sigma_j = noise_scale x the standard "
                  "deviation of coordinate j of mu over the training items (at most 4,096 of them, chosen by a "
                  "stable hash; floored at 1e-3 x the RMS spread), measured under the current thought module at the "
                  "first rollout and again whenever the reference table is refreshed (every `reference_refresh_steps` "
                  "steps; once with 0): exploration follows how items differ, not the vector they share. The "
                  "Gaussian log-prob then uses the same per-coordinate sigma."},
    )
    antithetic: bool = field(
        default=False,
        metadata={"help": "Noisy copies come in pairs (eps, -eps): the pair's reward difference is the "
                  "finite-difference signal, with no noise-direction bias."},
    )
    anchor_copy: bool = field(
        default=True, metadata={"help": "Copy 0 of each group is noise-free (z_0 = mu), the anchor."}
    )
    thought_trainable: str = field(
        default="all",
        metadata={"help": "What CRRL trains in the thought module: `all` (q, k, v projections), `value` (only the "
                  "value projection: the attention pattern of LRCL is kept) or `lowrank` (LRCL's weights frozen, a "
                  "trainable rank-`thought_delta_rank` delta on the value projection that starts at zero, so step 0 "
                  "is LRCL exactly; `weight_decay` (AdamW, decoupled) decays its two factors; checkpoints store the "
                  "folded value projection)."},
    )
    thought_delta_rank: int = field(
        default=8, metadata={"help": "Rank of the value-projection delta with thought_trainable=lowrank."}
    )
    noise_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the action noise (default: `seed`). eps depends only on (noise_seed, step, "
                  "group, copy, item id), never on the number of processes."},
    )
    # ---- candidates -------------------------------------------------------------------------------------------
    candidate_num: int = field(default=10, metadata={"help": "N: candidates per item (positives + negatives)."})
    pos_num: int = field(default=1, metadata={"help": "m: top co-occurring items used as positives, weighted by score."})
    positive_score: str = field(
        default="count",
        metadata={"help": "How positives are ranked: `count` (raw co-occurrence, the paper's), `cosine` (count / "
                  "sqrt(n_a n_b)) or `lift` (count U / (n_a n_b)); the last two are popularity-normalised."},
    )
    min_support: int = field(
        default=1, metadata={"help": "A positive needs at least this many co-occurrences (use 2+ with cosine/lift)."}
    )
    negative_sampling: str = field(
        default="uniform",
        metadata={"help": "`uniform` never-co-occurring negatives (the paper's, and the yardstick's), `popularity`: "
                  "matched to the positive's popularity, so the reward cannot be won by popularity alone, or "
                  "`popularity_proportional`: never-co-occurring items drawn with probability proportional to their "
                  "training popularity."},
    )
    negative_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the negative draws (default: `seed`); negatives are redrawn every epoch and "
                  "depend only on (negative_seed, epoch, item id)."},
    )
    # ---- reward -----------------------------------------------------------------------------------------------
    reward_funcs: list[str] = field(
        default_factory=lambda: ["rank"],
        metadata={"help": "Reward functions: built-in names (`rank`, `multi_positive_rank`, `softmax`, "
                  "`log_softmax`, `collaborative_agreement`) or dotted paths (`my_pkg.module:fn`). Combine with `reward_weights`."},
    )
    similarity: str = field(
        default="dot",
        metadata={"help": "Similarity between embeddings: `dot` (paper), `cosine`, or `centered_cosine` (cosine "
                  "after subtracting the catalogue's mean embedding: LLM embeddings share one large direction, so "
                  "every pair sits at cosine ~0.99 otherwise)."},
    )
    reference_refresh_steps: int = field(
        default=0,
        metadata={"help": "0: candidates are embedded afresh in every rollout (the paper's). K > 0: candidate "
                  "embeddings (and the catalogue mean of centered_cosine) come from a table of the whole catalogue "
                  "under the current thought module, recomputed every K optimizer steps; rollouts then encode only "
                  "the items, so more items fit the same time. noise_scale_mode=spread re-measures its spread on "
                  "the same schedule."},
    )
    reward_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the `softmax` reward (passed to every reward function)."}
    )
    collaborative_table: str | None = field(
        default=None,
        metadata={"help": "safetensors item table (tensor `embeddings`, metadata `item_ids` JSON list) for the "
                  "`collaborative_agreement` reward."},
    )
    advantage_baseline: str = field(
        default="group",
        metadata={"help": "`group`: TRL's group mean with `scale_rewards` (the paper's); `noisy`: mean (and std) of "
                  "the noisy copies only, the anchor gets advantage 0 (its action carries no gradient, and inside "
                  "the baseline it turns groups where only it differs into pure-noise updates); `anchor`: "
                  "A_g = R_g - R_0 (needs anchor_copy)."},
    )
    # ---- compute ----------------------------------------------------------------------------------------------
    forward_method: str = field(
        default="fast",
        metadata={"help": "`fast`: one prefix pass per unique item, 2-token suffixes on the cached keys/values, "
                  "policy loss without LLM pass; `literal`: full passes per copy (reference oracle, same numbers)."},
    )
    prefix_cache_gb: float = field(
        default=4.0,
        metadata={"help": "With the LLM frozen, keep each item's prefix states (keys/values of every layer) across "
                  "rollouts, up to this many GiB: a prefix is then encoded once per run, and rollouts and the "
                  "reference table run only the 2-token suffix (~1.3 MB per 58-token item for SmolLM2 in bf16). "
                  "0 encodes prefixes in every rollout."},
    )
    embed_batch_size: int = field(
        default=64, metadata={"help": "Rows per LLM call when encoding prefixes and suffixes."}
    )
    # ---- GRPOConfig / TrainingArguments defaults that differ (paper setting) ----------------------------------
    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "AdamW learning rate (paper: 1e-4). Rule: pick it so the logged "
                  "policy/log_ratio_abs/iter2 stays within ~0.05-0.2 (mu moves a fifth of sigma or less per update); "
                  "on SmolLM2 with relative sigma 0.3 that is ~1e-5."},
    )
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Rows (noisy copies) per device per step, TRL semantics (paper: 32)."}
    )
    global_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per optimizer step over all processes; when set, per_device_train_batch_size = "
                  "global / (processes x gradient_accumulation_steps), so the paper's 32 holds on any process count."},
    )
    num_generations: int | None = field(default=8, metadata={"help": "G: noisy copies per item (paper: 8)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping epsilon (paper: 0.2)."})
    epsilon_high: float | None = field(default=0.28, metadata={"help": "Upper clipping epsilon (paper: 0.28)."})
    beta: float = field(
        default=0.0,
        metadata={"help": "KL coefficient; the KL to the starting thought module is ||mu - mu_ref||^2 / (2 sigma^2)."},
    )
    num_iterations: int = field(default=2, metadata={"help": "Policy updates per generation batch (paper: 2)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the items (paper: 1)."})
    loss_type: str = field(
        default="grpo", metadata={"help": f"Policy loss aggregation, one of {LOSS_TYPES} (one action per row)."}
    )
    # TRL defaults this deprecated alias of `activation_checkpointing` to True, which makes transformers warn on
    # every config; None leaves activation checkpointing off (the LLM is frozen, the fast path needs its cache).
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (off by default: the LLM is "
                                "frozen and the fast path needs its key/value cache)."}
    )
    bf16: bool | None = field(
        default=False, metadata={"help": "Mixed precision for the trainer; the policy maths always runs in float32."}
    )
    max_completion_length: int | None = field(
        default=1, metadata={"help": "Unused by CRRL (the action is one latent vector); kept for TRL."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Logging sinks (`tensorboard`, `wandb`, ...)."})

    def __post_init__(self):
        if self.global_train_batch_size is not None:
            # WORLD_SIZE is what accelerate / torchrun set for every process; 1 when run directly.
            share = int(os.environ.get("WORLD_SIZE", "1")) * self.gradient_accumulation_steps
            if self.global_train_batch_size % share:
                raise ValueError(
                    f"CRRLConfig.global_train_batch_size={self.global_train_batch_size} is not divisible by "
                    f"processes x gradient_accumulation_steps = {share}"
                )
            self.per_device_train_batch_size = self.global_train_batch_size // share
        super().__post_init__()
        from reaemb_trl.candidates import NEGATIVE_SAMPLING, POSITIVE_SCORES

        choices = {
            "similarity": SIMILARITIES,
            "advantage_baseline": BASELINES,
            "forward_method": FORWARD_METHODS,
            "loss_type": LOSS_TYPES,
            "noise_scale_mode": NOISE_SCALE_MODES,
            "thought_trainable": THOUGHT_TRAINABLE,
            "positive_score": POSITIVE_SCORES,
            "negative_sampling": NEGATIVE_SAMPLING,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"CRRLConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.noise_scale > 0:
            raise ValueError(f"CRRLConfig.noise_scale (sigma) must be > 0, got {self.noise_scale}")
        if self.candidate_num < 2:
            raise ValueError(f"CRRLConfig.candidate_num must be >= 2, got {self.candidate_num}")
        if not 1 <= self.pos_num < self.candidate_num:
            raise ValueError(
                f"CRRLConfig.pos_num must be in [1, candidate_num), got pos_num={self.pos_num}, "
                f"candidate_num={self.candidate_num}"
            )
        if self.holdout < 0:
            raise ValueError(f"CRRLConfig.holdout must be >= 0, got {self.holdout}")
        if self.advantage_baseline == "anchor" and not self.anchor_copy:
            raise ValueError("CRRLConfig.advantage_baseline='anchor' needs anchor_copy=True (copy 0 is the baseline)")
        noisy_copies = (self.num_generations or 0) - int(self.anchor_copy)
        if self.advantage_baseline == "noisy" and noisy_copies < 2:
            raise ValueError("CRRLConfig.advantage_baseline='noisy' needs at least 2 noisy copies per group")
        if not 0.0 <= self.eval_item_fraction < 1.0:
            raise ValueError(f"CRRLConfig.eval_item_fraction must be in [0, 1), got {self.eval_item_fraction}")
        if self.reference_refresh_steps < 0:
            raise ValueError(f"CRRLConfig.reference_refresh_steps must be >= 0, got {self.reference_refresh_steps}")
        if self.thought_delta_rank < 1:
            raise ValueError(f"CRRLConfig.thought_delta_rank must be >= 1, got {self.thought_delta_rank}")
        if self.min_support < 1:
            raise ValueError(f"CRRLConfig.min_support must be >= 1, got {self.min_support}")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if not self.reward_funcs:
            raise ValueError("CRRLConfig.reward_funcs needs at least one reward function")
        for spec in self.reward_funcs:  # a bad name fails here, before any model loads
            try:
                resolve_reward(spec)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"CRRLConfig.reward_funcs: {exc}") from None
        if self.reward_temperature <= 0:
            raise ValueError(f"CRRLConfig.reward_temperature must be > 0, got {self.reward_temperature}")
        if self.beta < 0:
            raise ValueError(f"CRRLConfig.beta must be >= 0, got {self.beta}")
        if self.prefix_cache_gb < 0:
            raise ValueError(f"CRRLConfig.prefix_cache_gb must be >= 0, got {self.prefix_cache_gb}")
        if self.embed_batch_size < 1:
            raise ValueError(f"CRRLConfig.embed_batch_size must be >= 1, got {self.embed_batch_size}")
        if self.use_vllm:
            raise ValueError("CRRL generates latent actions, not text: use_vllm is not supported")
        if self.activation_checkpointing and not self.train_lora:
            raise ValueError("CRRLConfig.activation_checkpointing (gradient_checkpointing) is useless with a frozen LLM "
                             "and disables the fast path; turn it off")
        # A checkpoint inside a rollout cycle cannot resume exactly: the buffered rollout is not saved with it.
        rollout_steps = self.steps_per_generation * self.num_iterations / self.gradient_accumulation_steps
        if (
            self.save_strategy == "steps"
            and self.save_steps >= 1
            and rollout_steps == int(rollout_steps)
            and self.save_steps % rollout_steps
        ):
            raise ValueError(
                f"CRRLConfig.save_steps={self.save_steps} must be a multiple of {int(rollout_steps)} "
                "(steps_per_generation x num_iterations / gradient_accumulation_steps): checkpoints are taken at "
                "rollout boundaries so that resuming continues exactly"
            )
        if self.noise_seed is None:
            self.noise_seed = self.seed
        if self.negative_seed is None:
            self.negative_seed = self.seed
