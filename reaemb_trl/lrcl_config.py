"""LRCLConfig: stage-1 training arguments (docs/method.md, "LRCL"). Defaults are the paper's setting unless
noted."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from reaemb_trl.embedder import POOLINGS


@dataclass
class LRCLConfig(TrainingArguments):
    """Arguments for `LRCLTrainer`: everything `transformers.TrainingArguments` has, plus the method's own."""

    # ---- model ------------------------------------------------------------------------------------------------
    model_name_or_path: str = field(
        default="smollm2",
        metadata={"help": "Backbone: `smollm2` (the embedded SmolLM2-135M-Instruct), a hub id or a local folder."},
    )
    model_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype to load the backbone weights in (`float32`, `bfloat16`); None keeps the checkpoint's."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel for the backbone (`sdpa`, `eager`, `flash_attention_2`)."}
    )
    quantization: str | None = field(
        default=None, metadata={"help": "`4bit` loads the backbone in bitsandbytes nf4 for QLoRA; None for none."}
    )
    pooling: str = field(
        default="mean",
        metadata={"help": "How the last hidden layer becomes the embedding: `mean` (all tokens), `last` (EOS) or "
                  "`item_mean` (the item's own tokens, thought and EOS: not the prompt template)."},
    )
    thought_rope_base: float = field(default=1000.0, metadata={"help": "RoPE base of the thought module's attention."})
    # ---- LoRA -------------------------------------------------------------------------------------------------
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter on the backbone (else only the thought module and tau)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Names of the linear layers that get LoRA adapters."},
    )
    lora_layers: int | None = field(
        default=None,
        metadata={"help": "LoRA on the top k decoder layers only (the layers below then run without gradient in the "
                  "prefix pass); None: every layer (the paper's)."},
    )
    # ---- prompt -----------------------------------------------------------------------------------------------
    max_prompt_length: int = field(
        default=256, metadata={"help": "Token budget per item prompt; attributes are dropped or cut to fit."}
    )
    max_value_chars: int = field(default=100, metadata={"help": "Each attribute value is cut to this many characters."})
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
    share_template: bool | None = field(
        default=None,
        metadata={"help": "Run the prompt template (the batch's common token prefix) once per step instead of once per "
                  "row (same numbers). None: wherever exact, i.e. not while LoRA dropout > 0 trains; true: also then, "
                  "the template tokens of all rows of a step then share one dropout mask (correlated dropout noise "
                  "across the batch, weaker regularisation on the template); false: never."},
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
        super().__post_init__()
        choices = {"pooling": POOLINGS, "loss_type": ("soft", "infonce"), "forward_method": ("fast", "literal")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"LRCLConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.view_drop_ratio < 1.0:
            raise ValueError(f"LRCLConfig.view_drop_ratio must be in [0, 1), got {self.view_drop_ratio}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ValueError(f"LRCLConfig.lora_layers must be None or >= 1, got {self.lora_layers}")
        if self.quantization not in (None, "4bit"):
            raise ValueError(f"LRCLConfig.quantization must be None or '4bit', got {self.quantization!r}")
