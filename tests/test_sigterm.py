"""SIGTERM (what SLURM, Kubernetes and `kill` send) stops `reaemb` as cleanly as Ctrl-C: every temporary file is
removed and a target file is either absent or complete, never half-written."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ASSETS, save_tiny_backbone

REPO = Path(__file__).resolve().parents[1]

# `reaemb ...` whose table write stops inside safetensors' save_file once the temporary file is complete on disk,
# says so on stdout, and waits there for the test's SIGTERM.
BLOCKED_WRITE = r"""
import sys, time
import safetensors.torch

real_save_file = safetensors.torch.save_file

def save_file_then_wait(tensors, filename, metadata=None):
    real_save_file(tensors, filename, metadata=metadata)
    print("WRITING", filename, flush=True)
    time.sleep(300)

safetensors.torch.save_file = save_file_then_wait
from reaemb_trl.cli import app
app(sys.argv[1:], prog_name="reaemb")
"""


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:  # the process ended without reaching the write
            break
        if line.startswith(prefix):
            return line
    proc.kill()
    pytest.fail(f"no {prefix!r} line from the process; its stderr:\n{proc.communicate()[1][-3000:]}")


def test_sigterm_during_a_table_write_leaves_no_temporary_file(tmp_path):
    backbone = save_tiny_backbone(tmp_path / "backbone")
    out = tmp_path / "tables" / "raw.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-c", BLOCKED_WRITE, "export", "--data", str(ASSETS / "tiny_catalog"), "--backbone",
               str(backbone), "--output", str(out), "--dtype", "float32"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        temporary = Path(_wait_for_line(proc, "WRITING ", timeout=240).split(" ", 1)[1].strip())
        assert temporary.parent == out.parent and temporary.name.startswith(f".{out.name}.")
        assert temporary.name.endswith(".tmp") and temporary.is_file() and not out.exists()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode > 0, (proc.returncode, stderr[-2000:])  # handled and ended, not killed by the signal
    assert "Traceback" not in stderr, stderr[-2000:]
    assert sorted(p.name for p in out.parent.iterdir()) == [], "left behind: temporary files or a partial table"


def test_sigterm_raises_keyboard_interrupt_in_the_main_thread():
    from reaemb_trl.signals import sigterm_as_interrupt

    previous = signal.getsignal(signal.SIGTERM)
    try:
        sigterm_as_interrupt()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs here, at the latest
    finally:
        signal.signal(signal.SIGTERM, previous)
