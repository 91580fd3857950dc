"""Every shipped YAML config loads and validates; the tiny recipes run end to end under accelerate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ITEMS

REPO = Path(__file__).resolve().parents[1]
# YAML files in recipes/configs that are not recipe arguments, and the test that loads each of them.
OTHER_LOADERS = {"quickstart.yaml": "tests/test_quickstart.py::test_shipped_settings_load (QuickstartSettings)"}
CONFIGS = sorted(p for p in (REPO / "recipes" / "configs").glob("*.yaml") if p.name not in OTHER_LOADERS)


def _parser_for(config: Path):
    from trl import TrlParser

    from reaemb_trl.builders import DataArguments

    if config.name.startswith("lrcl_"):
        from reaemb_trl import LRCLConfig

        return TrlParser((DataArguments, LRCLConfig))
    if config.name.startswith("crrl_"):
        from reaemb_trl.crrl_config import CRRLConfig

        return TrlParser((DataArguments, CRRLConfig))
    raise AssertionError(f"{config.name}: configs are named lrcl_*.yaml or crrl_*.yaml so a test can load them")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(config, tmp_path):
    # GPU configs ask for bf16; `--use_cpu` lets them validate on a CPU-only machine.
    args = ["--config", str(config), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    parsed = _parser_for(config).parse_args_and_config(args=args)
    training = parsed[-1]
    assert training.max_steps != 0 and training.learning_rate > 0


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
}


@pytest.mark.parametrize("processes", [1, 2])
def test_lrcl_recipe_end_to_end(tmp_path, processes):
    from reaemb_trl import ThoughtEmbedder

    out = tmp_path / "lrcl"
    proc = launch("lrcl.py", "lrcl_tiny.yaml", out, processes)
    written = {p.name for p in out.iterdir()}
    assert written == LRCL_FILES | {"checkpoint-4", "checkpoint-8"}, written
    assert {p.name for p in (out / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    # each process draws 8 of the 48 items per step: two processes go through twice the epochs
    assert state["epoch"] == pytest.approx(8 * 8 * processes / 48, abs=1e-3), proc.stdout[-500:]
    vectors = ThoughtEmbedder.from_pretrained(out).encode(ITEMS)
    assert vectors.shape == (len(ITEMS), 32) and torch.isfinite(vectors).all()
