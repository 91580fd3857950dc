"""Exact resume: a run restarted from checkpoint-4 of an 8-step run continues as if it had never stopped.

Same step count, same data order (the sampler's epoch seed; batches cross an epoch boundary here: 48 items, 8 per
step), same attribute-dropout views (keyed by seed, global step, micro-batch, process), same optimizer, scheduler
and temperature state: the logged loss components are equal step by step and the final weights are equal.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ASSETS

COMPONENTS = ("loss", "loss_x_to_y", "loss_y_to_x", "temperature", "positive_cosine", "accuracy")


def _lrcl_args(out: Path, **overrides):
    from reaemb_trl import LRCLConfig

    values = dict(
        output_dir=str(out), model_name_or_path=str(ASSETS / "tiny-llama"), max_steps=8, save_steps=4,
        per_device_train_batch_size=8, learning_rate=5e-3, lora_r=4, lora_alpha=8, lora_dropout=0.0,
        max_item_tokens=192, logging_steps=1, seed=0, use_cpu=True, disable_tqdm=True, report_to="none",
    )  # fmt: skip
    values.update(overrides)
    return LRCLConfig(**values)


def _history(trainer) -> dict[int, dict[str, float]]:
    return {h["step"]: {k: h[k] for k in COMPONENTS if k in h} for h in trainer.state.log_history if "loss" in h}


def test_lrcl_resume_from_a_mid_run_checkpoint_is_exact(tmp_path):
    from reaemb_trl import LRCLTrainer
    from reaemb_trl.data.canonical import load_items

    items = load_items(ASSETS / "tiny_catalog")
    straight = LRCLTrainer(args=_lrcl_args(tmp_path / "straight"), train_dataset=items)
    straight.train()
    full = _history(straight)
    assert sorted(full) == list(range(1, 9))
    checkpoint = tmp_path / "straight" / "checkpoint-4"
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "optimizer.pt").exists()

    # A fresh trainer (fresh random LoRA / thought init, as a new process would build) resumes from checkpoint-4.
    resumed = LRCLTrainer(args=_lrcl_args(tmp_path / "resumed"), train_dataset=items)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 8
    history = _history(resumed)  # steps 1-4 come back from checkpoint-4's trainer_state.json
    assert sorted(history) == list(range(1, 9))
    tail = {step: logs for step, logs in history.items() if step > 4}
    for step in tail:
        assert tail[step].keys() == full[step].keys()
        for name, value in tail[step].items():
            assert value == pytest.approx(full[step][name], rel=1e-6, abs=1e-7), (step, name, value, full[step][name])

    for name in ("thought_module.safetensors", "lrcl_temperature.safetensors", "adapter/adapter_model.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoint-8" / name)
        b = load_file(tmp_path / "resumed" / "checkpoint-8" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=f"{name}:{key}")


CRRL_COMPONENTS = ("loss", "reward", "reward_std", "frac_reward_zero_std", "kl")


def test_crrl_resume_from_a_mid_run_checkpoint_is_exact(tmp_path):
    """The same for CRRL. The checkpoint is taken at a generation boundary (num_iterations 2: a rollout every 2
    steps; saving at step 2, mid-way through the 6-step run)."""
    crrl = pytest.importorskip("reaemb_trl.crrl_trainer")
    from test_crrl_trainer import candidates, config, dataset

    from conftest import tiny_embedder

    def run(name: str, resume: str | None = None):
        args = config(tmp_path, output_dir=str(tmp_path / name), max_steps=6, save_strategy="steps", save_steps=2,
                      num_iterations=2, seed=0, reward_funcs=["rank", "softmax"], reward_weights=[1.0, 1.0],
                      similarity="cosine", reward_temperature=0.05)  # fmt: skip
        trainer = crrl.CRRLTrainer(tiny_embedder(lora=True), args, train_dataset=dataset(), candidates=candidates())
        trainer.train(resume_from_checkpoint=resume)
        history = {h["step"]: {k: h[k] for k in CRRL_COMPONENTS if k in h} for h in trainer.state.log_history
                   if "loss" in h}  # fmt: skip
        return trainer, history

    _, full = run("straight")
    assert sorted(full) == list(range(1, 7))
    resumed, history = run("resumed", resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert resumed.state.global_step == 6 and sorted(history) == list(range(1, 7))
    for step in range(3, 7):
        for name, value in history[step].items():
            assert value == pytest.approx(full[step][name], rel=1e-5, abs=1e-6), (step, name, value, full[step][name])
    a = load_file(tmp_path / "straight" / "checkpoint-6" / "thought_module.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint-6" / "thought_module.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
