"""Advantages (and the update) do not depend on the number of processes: 1 process x 8 rows == 2 processes x 4 rows.

The 1-process step runs in this process; the 2-process one under `accelerate launch --multi_gpu` (gloo):
`accelerate launch --cpu --num_processes 2` silently runs one process. Both run tests/crrl_step_driver.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from conftest import single_threaded
from crrl_step_driver import crrl_step

TESTS = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_advantages_and_update_for_one_and_two_processes(tmp_path):
    one = single_threaded(lambda: crrl_step(8, str(tmp_path / "one")))
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(launcher + [str(TESTS / "crrl_step_driver.py"), "4", str(two_dir)], capture_output=True,
                          text=True, env=env, timeout=240, cwd=TESTS.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(two_dir / "result.pt", weights_only=False)
    assert (one["world"], two["world"]) == (1, 2)
    assert one["items"] == two["items"]  # the same global batch, groups in the same order
    torch.testing.assert_close(one["actions"], two["actions"])  # the same noise
    torch.testing.assert_close(one["rewards"], two["rewards"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one["advantages"], two["advantages"], atol=1e-5, rtol=1e-4)
    assert one["advantages"].abs().sum() > 0
    for name, value in one["thought_module"].items():
        torch.testing.assert_close(value, two["thought_module"][name], atol=1e-6, rtol=1e-5, msg=name)
