"""LRCLConfig: stage-1 training arguments (docs/method.md, "LRCL"). Defaults are the paper's setting unless
noted. The backbone, prompt, pooling, LoRA and quantisation fields come from `ModelArguments`
(reaemb_trl/model_args.py), shared with CRRLConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from reaemb_trl.model_args import ModelArguments


@dataclass
class LRCLConfig(ModelArguments, TrainingArguments):
    """Arguments for `LRCLTrainer`: everything `transformers.TrainingArguments` has, the model fields of
    `ModelArguments`, plus the method's own."""

    # ---- views and loss ---------------------------------------------------------------------------------------
    view_drop_ratio: float = field(
        default=0.4, metadata={"help": "rho: each view shuffles an item's attributes and drops floor(rho * n)."}
    )
    loss_type: str = field(
        default="soft", metadata={"help": "`soft` (soft-target symmetric loss of ReaEmb/LLMEmb) or `infonce` (hard targets)."}
    )
    init_temperature: float = field(default=1.0, metadata={"help": "Initial value of the learnable temperature tau."})
    min_temperature: float = field(default=1e-3, metadata={"help": "tau is clamped at or above this value."})
    learn_temperature: bool = field(default=True, metadata={"help": "Train tau (else keep it fixed)."})
    normalize_embeddings: bool = field(
        default=False,
        metadata={"help": "Cosine-normalise embeddings before the loss (pair with a low init_temperature, e.g. 0.05)."},
    )
    center_embeddings: bool = field(
        default=False,
        metadata={"help": "Subtract the batch mean of both views' embeddings before the similarity (and before "
                  "normalising)."},
    )
    gather_negatives: bool = field(
        default=False, metadata={"help": "Use the other processes' rows as extra negatives (local rows keep their gradient)."}
    )
    forward_method: str = field(
        default="fast",
        metadata={"help": "`fast`: prefix pass + 2-token suffix on cached keys/values; `literal`: two full passes (same numbers)."},
    )
    # ---- TrainingArguments defaults that differ --------------------------------------------------------------
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate (paper: 2e-4)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Items per device per step (2 views each)."})
    max_steps: int = field(default=2000, metadata={"help": "Training steps (paper: 2000)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the item columns: views are drawn from raw attributes in the trainer."}
    )
    report_to: str | list[str] = field(default="none", metadata={"help": "Logging sinks (`tensorboard`, `wandb`, ...)."})

    def __post_init__(self):
        super().__post_init__()  # ModelArguments (pooling, quantization, lora_layers), then TrainingArguments
        choices = {"loss_type": ("soft", "infonce"), "forward_method": ("fast", "literal")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"LRCLConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.view_drop_ratio < 1.0:
            raise ValueError(f"LRCLConfig.view_drop_ratio must be in [0, 1), got {self.view_drop_ratio}")
