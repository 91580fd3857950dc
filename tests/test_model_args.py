"""ModelArguments: one set of backbone / prompt / pooling / LoRA fields shared by LRCLConfig and CRRLConfig, with the
same defaults as before, parsed by TrlParser, and a clear error for the renamed `max_prompt_length`."""

from __future__ import annotations

import sys
from dataclasses import fields

import pytest

from reaemb_trl.builders import DataArguments
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.lrcl_config import LRCLConfig
from reaemb_trl.model_args import ModelArguments

# The defaults LRCLConfig had before the fields moved into ModelArguments (CRRL: model_name_or_path None).
DEFAULTS = dict(
    model_name_or_path="smollm2", model_dtype=None, attn_implementation=None, quantization=None, pooling="mean",
    thought_rope_base=1000.0, max_item_tokens=256, max_value_chars=100, share_template=None, use_lora=True, lora_r=8,
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
def test_the_old_max_prompt_length_key_fails_naming_the_new_one(config_class, tmp_path, monkeypatch):
    from reaemb_trl.preflight import parse_recipe_args

    config = tmp_path / "old.yaml"
    config.write_text("max_prompt_length: 96\nuse_cpu: true\n")
    for argv in (["--config", str(config)], ["--max_prompt_length", "96"], ["--max_prompt_length=96"]):
        monkeypatch.setattr(sys, "argv", ["recipe.py", *argv, "--output_dir", str(tmp_path)])
        with pytest.raises(SystemExit) as exc:
            parse_recipe_args(DataArguments, config_class)
        message = str(exc.value.code)
        assert message.startswith("error: ") and "`max_prompt_length` was renamed to `max_item_tokens`" in message
    monkeypatch.setattr(sys, "argv", ["recipe.py", "--max_item_tokens", "96", "--output_dir", str(tmp_path),
                                      "--use_cpu", "true"])  # fmt: skip
    assert parse_recipe_args(DataArguments, config_class)[1].max_item_tokens == 96


def test_quickstart_settings_with_the_old_key_fail_naming_the_new_one(tmp_path):
    from reaemb_trl.quickstart import QuickstartSettings

    settings = tmp_path / "q.yaml"
    settings.write_text("lrcl:\n  max_prompt_length: 96\n")
    with pytest.raises(ValueError, match=r"lrcl: `max_prompt_length` was renamed to `max_item_tokens`"):
        QuickstartSettings.from_yaml(settings)
