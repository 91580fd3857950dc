"""ModelArguments: one set of backbone / prompt / pooling / LoRA fields shared by LRCLConfig and CRRLConfig, with the
same defaults as before, parsed by TrlParser, and the backbone embedder they describe."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from reaemb_trl.builders import DataArguments
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.lrcl_config import LRCLConfig
from reaemb_trl.model_args import ModelArguments

# The defaults LRCLConfig had before the fields moved into ModelArguments (CRRL: model_name_or_path None).
DEFAULTS = dict(
    model_name_or_path="smollm2", model_dtype=None, attn_implementation=None, quantization=None, pooling="mean",
    thought_rope_base=1000.0, thought_keys="all", thought_scale="none", max_item_tokens=256, max_value_chars=100, share_template=None, use_lora=True, lora_r=8,
    lora_alpha=32, lora_dropout=0.1, lora_layers=None,
    lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)  # fmt: skip


def test_both_configs_share_the_model_fields_with_unchanged_defaults():
    from transformers import TrainingArguments
    from trl import GRPOConfig

    names = {f.name for f in fields(ModelArguments)}
    assert names == set(DEFAULTS)
    assert all(f.metadata.get("help") for f in fields(ModelArguments))  # help text on every field
    # nothing of TrainingArguments / GRPOConfig is shadowed with another meaning
    assert not names & {f.name for f in fields(GRPOConfig)}
    assert not names & {f.name for f in fields(TrainingArguments)}
    assert issubclass(LRCLConfig, ModelArguments) and issubclass(CRRLConfig, ModelArguments)
    lrcl = LRCLConfig(output_dir="unused", use_cpu=True)
    crrl = CRRLConfig(output_dir="unused", use_cpu=True)
    assert {k: getattr(lrcl, k) for k in DEFAULTS} == DEFAULTS
    assert {k: getattr(crrl, k) for k in DEFAULTS} == {**DEFAULTS, "model_name_or_path": None}
    assert not hasattr(lrcl, "max_prompt_length") and not hasattr(crrl, "max_prompt_length")
    formatter = LRCLConfig(output_dir="unused", use_cpu=True, max_item_tokens=96, max_value_chars=20).prompt_formatter()
    assert (formatter.max_length, formatter.max_value_chars) == (96, 20)


@pytest.mark.parametrize("config_class", [LRCLConfig, CRRLConfig])
def test_model_fields_are_validated_in_both_configs(config_class):
    for bad in (dict(pooling="max"), dict(quantization="8bit"), dict(lora_layers=0)):
        with pytest.raises(ValueError, match=rf"{config_class.__name__}\.{next(iter(bad))}"):
            config_class(output_dir="unused", use_cpu=True, **bad)


@pytest.mark.parametrize("config_class", [LRCLConfig, CRRLConfig])
def test_trl_parser_reads_the_model_fields(config_class, tmp_path):
    from trl import TrlParser

    config = tmp_path / "c.yaml"
    config.write_text("max_item_tokens: 96\npooling: last\nlora_r: 4\nuse_cpu: true\n")
    data, parsed = TrlParser((DataArguments, config_class)).parse_args_and_config(
        ["--config", str(config), "--output_dir", str(tmp_path), "--max_value_chars", "20"]
    )
    assert (parsed.max_item_tokens, parsed.pooling, parsed.lora_r, parsed.max_value_chars) == (96, "last", 4, 20)
    assert data.dataset == "ml-100k"


@pytest.mark.parametrize("config_class", [LRCLConfig, CRRLConfig])
def test_backbone_embedder_is_the_named_backbone_with_these_fields_and_no_lora(config_class):
    from conftest import ASSETS
    from reaemb_trl.lrcl_trainer import build_embedder

    args = config_class(output_dir="unused", use_cpu=True, model_name_or_path=str(ASSETS / "tiny-llama"),
                        pooling="item_mean", max_item_tokens=96, max_value_chars=20, thought_rope_base=500.0,
                        model_dtype="float64")  # fmt: skip
    embedder = args.backbone_embedder()
    assert embedder.backbone == str((ASSETS / "tiny-llama").resolve()) and not embedder.has_adapter
    assert (embedder.pooling, embedder.formatter) == ("item_mean", args.prompt_formatter())
    assert embedder.thought_module.rope_base == 500.0 and embedder.model.dtype == torch.float64
    if config_class is LRCLConfig:  # LRCL's start: the same backbone, then LoRA
        lrcl = build_embedder(args)
        assert lrcl.has_adapter and lrcl.formatter == embedder.formatter
