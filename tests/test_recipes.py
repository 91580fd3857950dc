"""Every shipped YAML config loads and validates; the config loader's one-line errors, `bf16: auto` and SIGTERM
handling; the tiny recipes run end to end under accelerate."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ITEMS
from reaemb_trl.builders import DataArguments
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.lrcl_config import LRCLConfig
from reaemb_trl.preflight import parse_recipe_args

REPO = Path(__file__).resolve().parents[1]
# every file here is a recipe config (the quickstart's settings ship inside the package: tests/test_quickstart.py)
CONFIGS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
TINY = str(REPO / "recipes" / "configs" / "lrcl_tiny.yaml")


@pytest.fixture(autouse=True)
def keep_sigterm_handler():
    """parse_recipe_args installs a SIGTERM handler: give the test process its own back."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def _config_class(config: Path):
    if config.name.startswith("lrcl_"):
        return LRCLConfig
    if config.name.startswith("crrl_"):
        return CRRLConfig
    raise AssertionError(f"{config.name}: configs are named lrcl_*.yaml or crrl_*.yaml so a test can load them")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(config, tmp_path):
    # through the recipes' own loader (`bf16: auto` is resolved there); `--use_cpu` lets GPU configs validate here
    args = ["--config", str(config), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    training = parse_recipe_args(DataArguments, _config_class(config), args=args)[-1]
    assert training.max_steps != 0 and training.learning_rate > 0 and isinstance(training.bf16, bool)


def _error(args: list[str], capsys) -> str:
    """The one line a recipe's config loader ends with: `error: ...` alone on stderr, exit code 1."""
    with pytest.raises(SystemExit) as exc:
        parse_recipe_args(DataArguments, LRCLConfig, args=args)
    assert exc.value.code == 1
    message = capsys.readouterr().err.rstrip("\n")
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_broken_yaml_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\nlearning_rate: 0.1\n  max_steps: [3\n")
    message = _error(["--config", str(bad)], capsys)
    assert f"{bad}, line 3: broken YAML" in message


@pytest.mark.parametrize("size", ["0", "-4"])
def test_batch_size_below_one_fails_before_anything_loads(size, tmp_path, capsys):
    message = _error(["--config", TINY, "--output_dir", str(tmp_path), "--per_device_train_batch_size", size], capsys)
    assert message == f"error: per_device_train_batch_size must be >= 1, got {size}"


def test_no_prefix_matching_of_flags(tmp_path, capsys):
    message = _error(["--config", TINY, "--output_dir", str(tmp_path), "--max_step", "3"], capsys)
    assert "--max_step" in message


def test_help_shows_config(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_recipe_args(DataArguments, LRCLConfig, args=["--help"])
    assert exc.value.code == 0
    head = capsys.readouterr().out[:400]
    assert head.startswith("usage: ") and "--config YAML" in head


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_auto_follows_the_hardware_rule(fast, tmp_path, monkeypatch, capsys):
    import reaemb_trl.hardware

    monkeypatch.setattr(reaemb_trl.hardware, "fast_bf16_available", lambda device, flags=None: fast)
    config = tmp_path / "auto.yaml"
    config.write_text(f"model_name_or_path: x\noutput_dir: {tmp_path}\nuse_cpu: true\nbf16: auto\n")
    assert parse_recipe_args(DataArguments, LRCLConfig, args=["--config", str(config)])[1].bf16 is fast
    assert f"precision: {'bf16' if fast else 'fp32'} (bf16: auto" in capsys.readouterr().err
    # an explicit value is kept whatever the hardware, from the command line (over the YAML) or the YAML
    given = ["--config", str(config), "--bf16", str(not fast).lower()]
    assert parse_recipe_args(DataArguments, LRCLConfig, args=given)[1].bf16 is (not fast)
    config.write_text(f"model_name_or_path: x\noutput_dir: {tmp_path}\nuse_cpu: true\nbf16: {not fast}\n")
    assert parse_recipe_args(DataArguments, LRCLConfig, args=["--config", str(config)])[1].bf16 is (not fast)
    given = ["--config", str(config), "--bf16", "auto"]
    assert parse_recipe_args(DataArguments, LRCLConfig, args=given)[1].bf16 is fast


def test_recipe_loader_turns_sigterm_into_keyboard_interrupt(tmp_path):
    parse_recipe_args(DataArguments, LRCLConfig, args=["--config", TINY, "--output_dir", str(tmp_path)])
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; without one the process would be gone


def launch(recipe: str, config: str, out: Path, processes: int = 1, *extra: str) -> subprocess.CompletedProcess:
    """`accelerate launch` a recipe; two CPU processes need --multi_gpu (gloo): --cpu would run only one."""
    topology = ["--num_processes", "1", "--cpu"] if processes == 1 else ["--multi_gpu", "--num_processes", "2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *topology, "--main_process_port", "0",
           str(REPO / "recipes" / recipe), "--config", str(REPO / "recipes" / "configs" / config),
           "--output_dir", str(out), *extra]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


LRCL_FILES = {
    "adapter",
    "chat_template.jinja",
    "lrcl_temperature.safetensors",
    "prompt_format.json",
    "reaemb_config.json",
    "thought_module.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "training_args.bin",
    "training_config.json",
}


@pytest.mark.parametrize("processes", [1, 2])
def test_lrcl_recipe_end_to_end(tmp_path, processes):
    from reaemb_trl import ThoughtEmbedder

    out = tmp_path / "lrcl"
    proc = launch("lrcl.py", "lrcl_tiny.yaml", out, processes)
    assert proc.stderr.count("precision: fp32 (bf16: false)") == 1  # said once, by the main process
    written = {p.name for p in out.iterdir()}
    assert written == LRCL_FILES | {"checkpoint-4", "checkpoint-8"}, written
    assert {p.name for p in (out / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    # the training arguments as JSON (what `reaemb push` reads instead of unpickling training_args.bin)
    training = json.loads((out / "training_config.json").read_text())
    assert training["max_steps"] == 8 and training["bf16"] is False and training["output_dir"] == str(out)
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    # each process draws 8 of the 48 items per step: two processes go through twice the epochs
    assert state["epoch"] == pytest.approx(8 * 8 * processes / 48, abs=1e-3), proc.stdout[-500:]
    vectors = ThoughtEmbedder.from_pretrained(out).encode(ITEMS)
    assert vectors.shape == (len(ITEMS), 32) and torch.isfinite(vectors).all()
