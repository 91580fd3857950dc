"""Where a number was made: commit, package versions, CPU/GPU and their flags, dtype, threads.

Which precision the hardware runs fast is decided in `reaemb_trl.hardware`.

Results move between machines (bf16 numerics and speed differ between an Intel CPU with AMX and an AMD EPYC), so
every results file and benchmark records this next to its numbers.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from reaemb_trl.hardware import cpu_flags, cpu_model

PACKAGES = ("reaemb-trl", "torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "numpy", "scipy")
CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the repository holding `path` (default: this package), with `+dirty` when it has changes."""
    folder = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_description() -> dict:
    """Model name and the flags that decide bf16 speed on CPU."""
    flags = cpu_flags()
    return {"model": cpu_model() or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags]}  # fmt: skip


def gpu_description() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(dtype: str | None = None) -> dict:
    """Everything a reader needs to know about the machine and code that produced a result."""
    import torch

    return {
        "commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "cpu": cpu_description(),
        "gpu": gpu_description(),
        "torch_threads": torch.get_num_threads(),
        "dtype": dtype or str(torch.get_default_dtype()).removeprefix("torch."),
    }
