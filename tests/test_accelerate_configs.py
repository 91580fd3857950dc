"""The shipped accelerate configs load and validate; training knobs from YAML / CLI (activation checkpointing,
TensorBoard) behave."""

from pathlib import Path

import pytest
import torch

from conftest import ASSETS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
EXPECTED = {
    "single_gpu.yaml": ("NO", None),
    "multi_gpu.yaml": ("MULTI_GPU", None),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 2),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 3),
    "deepspeed_zero3_offload.yaml": ("DEEPSPEED", 3),
    "fsdp2.yaml": ("FSDP", None),
}


def test_every_expected_config_is_shipped():
    assert {p.name for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates_like_accelerate_launch(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = load_config_from_file(str(path))  # yaml parse + accelerate's config class (enums checked)
    assert isinstance(config, ClusterConfig)
    distributed, stage = EXPECTED[path.name]
    assert config.distributed_type.value == distributed and config.compute_environment.value == "LOCAL_MACHINE"
    assert config.mixed_precision in ("no", "bf16")
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    # every nested key must be one `accelerate launch` knows, else accelerate silently ignores it
    for key in {**(config.deepspeed_config or {}), **(config.fsdp_config or {})}:
        assert key in known, f"{path.name}: accelerate does not know {key!r}"
    args = parser.parse_args(["--config_file", str(path), "train.py"])
    _validate_launch_command(args)  # fills args from the file exactly as `accelerate launch` does
    assert args.use_deepspeed == (distributed == "DEEPSPEED") and args.use_fsdp == (distributed == "FSDP")
    if stage is not None:
        assert int(args.zero_stage) == stage
    if path.name.startswith("deepspeed_zero3"):
        assert args.zero3_save_16bit_model in (True, "true")  # gathers 16-bit weights on save: loadable folders
    if path.name == "deepspeed_zero3_offload.yaml":
        assert args.offload_optimizer_device == "cpu" and args.offload_param_device == "cpu"
    if path.name == "fsdp2.yaml":
        assert str(args.fsdp_version) == "2" and args.fsdp_state_dict_type == "FULL_STATE_DICT"


def _train(tmp_path, name: str, **overrides):
    from reaemb_trl import LRCLConfig, LRCLTrainer
    from reaemb_trl.data.canonical import load_items

    values = dict(
        output_dir=str(tmp_path / name), model_name_or_path=str(ASSETS / "tiny-llama"), max_steps=3,
        per_device_train_batch_size=4, learning_rate=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
        max_item_tokens=192, logging_steps=1, save_strategy="no", seed=3, use_cpu=True, disable_tqdm=True,
        report_to="none",
    )  # fmt: skip
    values.update(overrides)
    trainer = LRCLTrainer(args=LRCLConfig(**values), train_dataset=load_items(ASSETS / "tiny_catalog").select(range(8)))
    trainer.train()
    return trainer


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    plain = _train(tmp_path, "plain")
    checkpointed = _train(tmp_path, "ckpt", activation_checkpointing=True)  # docs/scaling.md's name for it
    # with checkpointing the KV cache is off, so the embedder takes the literal two-pass path
    assert checkpointed.embedder.model.get_base_model().is_activation_checkpointing
    checkpointed.embedder.train()
    assert not checkpointed.embedder.uses_fast_path()
    a = [h for h in plain.state.log_history if "loss" in h]
    b = [h for h in checkpointed.state.log_history if "loss" in h]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "loss_x_to_y", "loss_y_to_x", "temperature", "positive_cosine"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x, y)


def test_tensorboard_event_files_hold_the_loss_components(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, "tb", report_to="tensorboard")
    events = list((tmp_path / "tb").rglob("events.out.tfevents*"))
    assert events, list((tmp_path / "tb").rglob("*"))
    scalars = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    for component in ("loss", "loss_x_to_y", "loss_y_to_x", "temperature"):
        assert f"train/{component}" in scalars, sorted(scalars)
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    if "train/loss_x_to_y" in accumulator.Tags()["scalars"]:
        values = [e.value for e in accumulator.Scalars("train/loss_x_to_y")]
        assert len(values) == 3 and all(torch.isfinite(torch.tensor(values)))


def test_bf16_from_the_config_trains(tmp_path):
    trainer = _train(tmp_path, "bf16", bf16=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.args.bf16 and len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
