"""LRCL under DeepSpeed ZeRO-2 and ZeRO-3 on CPU (DeepSpeed's CPU accelerator, `DS_ACCELERATOR=cpu`).

Each case launches a small driver under `accelerate launch` with a shipped config
(`accelerate_configs/deepspeed_zero*.yaml`, one process) or a DeepSpeed JSON config that really partitions every
parameter (one and two processes). The driver trains the tiny backbone for a few steps, records what the *trained, live* model gives (embeddings of
the test items, with ZeRO-3 partitions gathered) and how the parameters are held, then saves the final checkpoint
through the recipes' `finish()`. The test then checks that the saved folder loads with
`ThoughtEmbedder.from_pretrained` into the same embeddings.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ITEMS

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)

DRIVER = textwrap.dedent(
    """
    import contextlib, json, sys
    import torch
    sys.path.insert(0, "tests")
    from conftest import ITEMS
    from reaemb_trl import LRCLConfig, LRCLTrainer
    from reaemb_trl.data.canonical import load_items
    from reaemb_trl.recipe_utils import finish

    out = sys.argv[1]
    args = LRCLConfig(
        output_dir=out, model_name_or_path="tests/assets/tiny-llama", max_steps=4, per_device_train_batch_size=8,
        learning_rate=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_prompt_length=192, logging_steps=1,
        save_strategy="no", seed=0, report_to="none", disable_tqdm=True, use_cpu=True,
    )
    trainer = LRCLTrainer(args=args, train_dataset=load_items("tests/assets/tiny_catalog"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    engine = trainer.model_wrapped
    stage = engine.zero_optimization_stage()
    model = trainer.model
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # How parameters are held between steps: under ZeRO-3 every one is a partition with an empty local tensor.
    held = {n: [p.numel(), int(getattr(p, "ds_numel", p.numel())), hasattr(p, "ds_id")] for n, p in trainable}
    if stage == 3:
        import deepspeed
        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    else:
        gather = contextlib.nullcontext()
    with gather:
        after = {n: p.detach().clone() for n, p in trainable}
    # ZeRO-3's module hooks gather each layer's weights for its forward (and release them afterwards)
    vectors = trainer.embedder.encode(ITEMS)
    changed = [n for n in after if not torch.equal(after[n].reshape(-1), before[n].reshape(-1))]
    if trainer.accelerator.is_main_process:
        torch.save({"vectors": vectors, "trainable": after}, out + "/live.pt")
        report = {"stage": stage, "optimizer": type(engine.optimizer).__name__, "held": held, "changed": changed,
                  "n_trainable": len(trainable), "world": trainer.accelerator.num_processes,
                  "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
        json.dump(report, open(out + "/report.json", "w"))
    finish(trainer, out)
    """
)


# ZeRO-3 keeps parameters below `stage3_param_persistence_threshold` whole on every rank; every tensor of the tiny
# model is that small, so this DeepSpeed JSON config (accelerate --deepspeed_config_file) sets it to 0 to make every
# parameter a real partition with an empty local tensor, as big models have.
ZERO3_NO_PERSISTENCE = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
}  # fmt: skip


def _launch(config: str, out: Path, processes: int) -> subprocess.CompletedProcess:
    driver = out.parent / "driver.py"
    driver.write_text(DRIVER)
    if config.endswith(".yaml"):  # a shipped accelerate config
        topology = ["--config_file", str(REPO / "accelerate_configs" / config)]
    else:  # a DeepSpeed JSON config through accelerate's DeepSpeed plugin
        ds_config = out.parent / "ds_config.json"
        ds_config.write_text(json.dumps(ZERO3_NO_PERSISTENCE))
        topology = ["--use_deepspeed", "--deepspeed_config_file", str(ds_config)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *topology, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", "0", str(driver), str(out)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ninja" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("DeepSpeed's CPU accelerator compiles its shm comm op on first use: needs ninja + a C++ compiler")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.parametrize(
    "config,stage,processes",
    [("deepspeed_zero2.yaml", 2, 1), ("deepspeed_zero3.yaml", 3, 1), ("zero3_no_persistence", 3, 1),
     ("zero3_no_persistence", 3, 2)],
)  # fmt: skip
def test_lrcl_under_deepspeed_zero_saves_a_checkpoint_that_exports_the_same_embeddings(
    tmp_path, config, stage, processes
):
    from safetensors.torch import load_file

    from reaemb_trl import ThoughtEmbedder

    out = tmp_path / "run"
    out.mkdir()
    _launch(config, out, processes)
    report = json.loads((out / "report.json").read_text())
    assert report["stage"] == stage and report["world"] == processes
    assert report["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
    assert all(torch.isfinite(torch.tensor(report["losses"]))) and len(report["losses"]) == 4
    # every trainable tensor (LoRA A/B, thought module, tau) was updated through DeepSpeed's optimizer
    assert len(report["changed"]) == report["n_trainable"], report["changed"]
    names = list(report["held"])
    assert any("lora_A" in n for n in names) and any("embedder.thought." in n for n in names)
    if stage == 3:  # every parameter (LoRA, thought module, tau) is a ZeRO-3 parameter
        assert all(is_zero3 and full > 0 for _, full, is_zero3 in report["held"].values()), report["held"]
    else:
        assert all(local == full > 0 and not is_zero3 for local, full, is_zero3 in report["held"].values())
    if config == "zero3_no_persistence":  # ... and a real partition: the local tensor is empty between steps
        assert all(local == 0 for local, _, _ in report["held"].values()), report["held"]

    live = torch.load(out / "live.pt")
    saved_thought = load_file(out / "thought_module.safetensors")
    for key, value in saved_thought.items():
        torch.testing.assert_close(value, live["trainable"][f"embedder.thought.{key}"].reshape(value.shape))
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_live = {n: v for n, v in live["trainable"].items() if "lora_" in n}
    lora_saved = {k: v for k, v in adapter.items() if "lora_" in k}
    assert len(lora_saved) == len(lora_live) > 0
    assert all(v.numel() > 0 and torch.isfinite(v).all() for v in adapter.values())
    # the embedding table is never resized (the tokenizer fits the tiny backbone's 512 rows)
    assert all(v.shape[0] == 512 for k, v in adapter.items() if "embed_tokens" in k or "lm_head" in k)

    exported = ThoughtEmbedder.from_pretrained(out).encode(ITEMS)
    assert torch.isfinite(exported).all()
    torch.testing.assert_close(exported, live["vectors"], rtol=1e-4, atol=1e-5)
