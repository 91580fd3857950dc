"""QLoRA: LRCL on a bitsandbytes nf4 (4-bit) backbone, on CPU, selected by `quantization: 4bit` (YAML / CLI)."""

import importlib.util

import pytest
import torch

from conftest import ASSETS, save_tiny_backbone

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes missing")


def test_lrcl_trains_lora_on_a_4bit_backbone(tmp_path):
    from trl import TrlParser

    from reaemb_trl import LRCLConfig, LRCLTrainer
    from reaemb_trl.data.canonical import load_items
    from reaemb_trl.builders import DataArguments

    # hidden 64: bnb 4-bit quantises in blocks of 64 values
    backbone = save_tiny_backbone(tmp_path / "tiny64", hidden=64)
    config = tmp_path / "qlora.yaml"
    config.write_text(f"model_name_or_path: {backbone}\nquantization: 4bit\n")
    _, args = TrlParser((DataArguments, LRCLConfig)).parse_args_and_config(
        args=["--config", str(config), "--output_dir", str(tmp_path / "run"), "--max_steps", "3",
              "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--lora_r", "4", "--lora_alpha", "8",
              "--lora_dropout", "0", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "true",
              "--report_to", "none", "--max_item_tokens", "192", "--disable_tqdm", "true"]  # fmt: skip
    )
    assert args.quantization == "4bit"
    trainer = LRCLTrainer(args=args, train_dataset=load_items(ASSETS / "tiny_catalog").select(range(8)))

    import bitsandbytes as bnb

    base = trainer.embedder.model.get_base_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    assert getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_quantized", False)
    quantized = {n: p for n, p in base.named_parameters() if p.dtype == torch.uint8}
    assert quantized and not any(p.requires_grad for p in quantized.values())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in before)
    frozen_4bit = {n: p.detach().clone() for n, p in quantized.items()}

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(trainer.model.named_parameters())
    lora_changed = [n for n in before if "lora_" in n and not torch.equal(after[n], before[n])]
    assert len(lora_changed) == sum("lora_" in n for n in before), "every LoRA tensor should move"
    assert all(torch.equal(p, frozen_4bit[n]) for n, p in quantized.items())  # 4-bit weights stay frozen
