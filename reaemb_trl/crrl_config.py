"""CRRLConfig: stage-2 training arguments (SPEC 4), a `trl.GRPOConfig` with the latent-action fields.

TRL's own semantics hold: `per_device_train_batch_size` counts rows (noisy copies), `num_generations` (G) copies
of an item form a group, `generation_batch_size` / `steps_per_generation` set how many rows are generated at once.
Defaults are the paper's setting unless noted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

SIMILARITIES = ("dot", "cosine")
BASELINES = ("group", "anchor")
FORWARD_METHODS = ("fast", "literal")
# With one "token" (the latent action) per row, grpo/bnpo/dr_grpo/dapo all reduce to the mean over rows.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


@dataclass
class CRRLConfig(GRPOConfig):
    """Arguments for `CRRLTrainer`: everything `trl.GRPOConfig` has, plus the method's own."""

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
    model_dtype: str | None = field(
        default=None, metadata={"help": "dtype to load the backbone in (`float32`, `bfloat16`); None keeps the checkpoint's."}
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
    # ---- latent action ----------------------------------------------------------------------------------------
    noise_scale: float = field(default=0.1, metadata={"help": "sigma: z_g = mu(x) + sigma * eps_g, eps_g ~ N(0, I)."})
    anchor_copy: bool = field(
        default=True, metadata={"help": "Copy 0 of each group is noise-free (z_0 = mu), the anchor."}
    )
    noise_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the action noise (default: `seed`). eps depends only on (noise_seed, step, "
                  "group, copy, item id), never on the number of processes."},
    )
    # ---- candidates -------------------------------------------------------------------------------------------
    candidate_num: int = field(default=10, metadata={"help": "N: candidates per item (positives + negatives)."})
    pos_num: int = field(default=1, metadata={"help": "m: top co-occurring items used as positives."})
    negative_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the negative draws (default: `seed`); negatives are redrawn every epoch and "
                  "depend only on (negative_seed, epoch, item id)."},
    )
    # ---- reward -----------------------------------------------------------------------------------------------
    reward_funcs: list[str] = field(
        default_factory=lambda: ["rank"],
        metadata={"help": "Reward functions: built-in names (`rank`, `multi_positive_rank`, `softmax`, "
                  "`collaborative_agreement`) or dotted paths (`my_pkg.module:fn`). Combine with `reward_weights`."},
    )
    similarity: str = field(
        default="dot", metadata={"help": "Similarity between embeddings: `dot` (paper) or `cosine`."}
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
        metadata={"help": "`group`: TRL's group mean with `scale_rewards`; `anchor`: A_g = R_g - R_0 (the "
                  "noise-free copy's reward; needs anchor_copy)."},
    )
    # ---- compute ----------------------------------------------------------------------------------------------
    forward_method: str = field(
        default="fast",
        metadata={"help": "`fast`: one prefix pass per unique item, 2-token suffixes on the cached keys/values, "
                  "policy loss without LLM pass; `literal`: full passes per copy (reference oracle, same numbers)."},
    )
    embed_batch_size: int = field(
        default=64, metadata={"help": "Rows per LLM call when encoding prefixes and suffixes."}
    )
    max_prompt_length: int = field(
        default=256, metadata={"help": "Token budget per item prompt when there is no LRCL checkpoint."}
    )
    # ---- GRPOConfig / TrainingArguments defaults that differ (paper setting) ----------------------------------
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (paper: 1e-4)."})
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Rows (noisy copies) per device per step, TRL semantics (paper: 32)."}
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
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Off: the LLM is frozen and the fast path needs its key/value cache."}
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
        super().__post_init__()
        choices = {
            "similarity": SIMILARITIES,
            "advantage_baseline": BASELINES,
            "forward_method": FORWARD_METHODS,
            "loss_type": LOSS_TYPES,
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
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if not self.reward_funcs:
            raise ValueError("CRRLConfig.reward_funcs needs at least one reward function")
        if self.reward_temperature <= 0:
            raise ValueError(f"CRRLConfig.reward_temperature must be > 0, got {self.reward_temperature}")
        if self.beta < 0:
            raise ValueError(f"CRRLConfig.beta must be >= 0, got {self.beta}")
        if self.embed_batch_size < 1:
            raise ValueError(f"CRRLConfig.embed_batch_size must be >= 1, got {self.embed_batch_size}")
        if self.use_vllm:
            raise ValueError("CRRL generates latent actions, not text: use_vllm is not supported")
        if self.gradient_checkpointing and not self.train_lora:
            raise ValueError("gradient_checkpointing is useless with a frozen LLM and disables the fast path; turn it off")
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
