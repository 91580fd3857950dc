"""ModelArguments: the backbone, prompt, pooling, LoRA and quantisation fields that LRCL and CRRL share (as TRL keeps
its `ModelConfig`). `LRCLConfig(ModelArguments, TrainingArguments)` and `CRRLConfig(ModelArguments, GRPOConfig)`
inherit them, so a field has one name and one meaning in both recipes (and one default: CRRLConfig only sets
`model_name_or_path` to None, since CRRL normally starts from `lrcl_checkpoint`).

LRCL builds its embedder from these fields (`backbone_embedder`, then LoRA). CRRL always reads `model_dtype` and
`share_template`; the other backbone, prompt and pooling fields only when it starts from a bare backbone (no
`lrcl_checkpoint`): an LRCL checkpoint keeps its own prompt format, pooling and adapter. The fields marked "LRCL:" in their help (LoRA creation) are unused by
CRRL.

No heavy imports here: `TrlParser((DataArguments, ModelArguments, ...))` and `--help` stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field

QUANTIZATIONS = (None, "4bit")


@dataclass
class ModelArguments:
    """The backbone, the item prompt, pooling, the thought module's RoPE base, LoRA and quantisation."""

    # ---- backbone ---------------------------------------------------------------------------------------------
    model_name_or_path: str = field(
        default="smollm2",
        metadata={"help": "Backbone: `smollm2` (the embedded SmolLM2-135M-Instruct), a hub id or a local folder."},
    )
    model_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype to load the backbone weights in (`float32`, `bfloat16`); None keeps the "
                  "checkpoint's."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel for the backbone (`sdpa`, `eager`, `flash_attention_2`). CRRL: only "
                  "without lrcl_checkpoint."},
    )
    quantization: str | None = field(
        default=None,
        metadata={"help": "`4bit` loads the backbone in bitsandbytes nf4 for QLoRA; None for none. CRRL: only "
                  "without lrcl_checkpoint."},
    )
    # ---- embedding --------------------------------------------------------------------------------------------
    pooling: str = field(
        default="mean",
        metadata={"help": "How the last hidden layer becomes the embedding: `mean` (all tokens), `last` (EOS), "
                  "`item_mean` (the item's own tokens, thought and EOS: not the prompt template), `thought` (the state "
                  "at the thought position) or `thought_eos` (the mean of the thought and EOS states: the thought "
                  "then decides most of the embedding). CRRL: only without lrcl_checkpoint (a checkpoint keeps its "
                  "pooling)."},
    )
    thought_rope_base: float = field(
        default=1000.0,
        metadata={"help": "RoPE base of the thought module's attention. CRRL: only without lrcl_checkpoint."},
    )
    thought_keys: str = field(
        default="all",
        metadata={"help": "What the thought module's attention reads: `all` (every token before the thought, prompt "
                  "template included: the paper's) or `item` (the item's own tokens only; the query stays the last "
                  "token before the thought). CRRL: only without lrcl_checkpoint (a checkpoint keeps its own)."},
    )
    thought_scale: str = field(
        default="none",
        metadata={"help": "The thought vector's scale: `none` (as the attention writes it: the paper's) or `token` "
                  "(normalised to a learnable norm that starts at the backbone's median token-embedding norm, so "
                  "the thought enters the sequence at a token's scale). CRRL: only without lrcl_checkpoint."},
    )
    # ---- item prompt ------------------------------------------------------------------------------------------
    max_item_tokens: int = field(
        default=256,
        metadata={"help": "Token budget of one item prompt (template, attributes, thought token and EOS); "
                  "attributes are dropped or cut to fit. CRRL: only without lrcl_checkpoint (a checkpoint keeps its "
                  "prompt format)."},
    )
    max_value_chars: int = field(
        default=100,
        metadata={"help": "Each attribute value is cut to this many characters. CRRL: only without lrcl_checkpoint."},
    )
    share_template: bool | None = field(
        default=None,
        metadata={"help": "Run the prompt template (the batch's common token prefix) once per step instead of once per "
                  "row (same numbers). None: wherever exact, i.e. not while LoRA dropout > 0 trains; true: also then, "
                  "the template tokens of all rows of a step then share one dropout mask (correlated dropout noise "
                  "across the batch, weaker regularisation on the template); false: never."},
    )
    # ---- LoRA (LRCL creates the adapter; CRRL keeps the checkpoint's, see its train_lora) -----------------------
    use_lora: bool = field(
        default=True,
        metadata={"help": "LRCL: train a LoRA adapter on the backbone (else only the thought module and tau)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LRCL: LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LRCL: LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LRCL: LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "LRCL: names of the linear layers that get LoRA adapters."},
    )
    lora_layers: int | None = field(
        default=None,
        metadata={"help": "LRCL: LoRA on the top k decoder layers only (the layers below then run without gradient "
                  "in the prefix pass); None: every layer (the paper's)."},
    )

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)  # TrainingArguments / GRPOConfig when mixed in
        if parent is not None:
            parent()
        from reaemb_trl.embedder import POOLINGS
        from reaemb_trl.thought_module import THOUGHT_KEYS, THOUGHT_SCALES

        name = type(self).__name__
        if self.pooling not in POOLINGS:
            raise ValueError(f"{name}.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.thought_keys not in THOUGHT_KEYS:
            raise ValueError(f"{name}.thought_keys must be one of {THOUGHT_KEYS}, got {self.thought_keys!r}")
        if self.thought_scale not in THOUGHT_SCALES:
            raise ValueError(f"{name}.thought_scale must be one of {THOUGHT_SCALES}, got {self.thought_scale!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"{name}.quantization must be None or '4bit', got {self.quantization!r}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ValueError(f"{name}.lora_layers must be None or >= 1, got {self.lora_layers}")

    def prompt_formatter(self):
        """The `ItemPromptFormatter` these arguments describe (budget and value limit; the rest at its defaults)."""
        from reaemb_trl.prompt import ItemPromptFormatter

        return ItemPromptFormatter(max_length=self.max_item_tokens, max_value_chars=self.max_value_chars)

    def backbone_embedder(self):
        """The `ThoughtEmbedder` these fields name (backbone, prompt format, pooling, dtype, quantisation, attention
        kernel, thought RoPE base, keys and scale) with a fresh thought module and no LoRA: LRCL's start, and CRRL's without an LRCL
        checkpoint."""
        from reaemb_trl.embedder import ThoughtEmbedder

        return ThoughtEmbedder.from_backbone(
            self.model_name_or_path,
            formatter=self.prompt_formatter(),
            pooling=self.pooling,
            dtype=self.model_dtype,
            quantization=self.quantization,
            attn_implementation=self.attn_implementation,
            rope_base=self.thought_rope_base,
            thought_keys=self.thought_keys,
            thought_scale=self.thought_scale,
        )

