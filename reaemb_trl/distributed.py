"""Processes that share one job: launching them (`reaemb export --num-processes N`), joining their torch.distributed
group, asking where this process stands in it, and gathering across it (LRCL's negatives from every process).

The Trainers launch and join through accelerate; the launch and join here are for the library's own multi-process
paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import torch

# Waiting processes sit at a barrier while the slowest one encodes its share, which can take hours on big catalogues.
BARRIER_TIMEOUT = timedelta(hours=6)


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for alone)."""
    if process_group()[1] > 1:
        torch.distributed.barrier()


def launched_rank() -> int:
    """This process's rank as set by the launcher (0 when not launched as one of several)."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """The number of processes the launcher started (1 when not launched by one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def joined_process_group(device: str) -> Iterator[str]:
    """Join the torch.distributed group when launched as one of several processes; yields this process's device."""
    import torch.distributed as dist

    if launched_world_size() == 1 or dist.is_initialized():
        yield device
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield device
    finally:
        dist.destroy_process_group()  # a clean end, so the launcher does not report a failure


def launch_processes(num_processes: int, module_arguments: list[str], device: str) -> int:
    """Run `python -m <module_arguments>` under `accelerate launch` in `num_processes` processes; returns their exit
    code.

    `--multi_gpu` on CPU too: accelerate's `--cpu` would silently run a single process."""
    env = dict(os.environ)
    if not device.startswith("cuda") and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_processes))  # the cores, shared out
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", "-m", *module_arguments]  # fmt: skip
    return subprocess.run(command, env=env).returncode


def gather_with_grad(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All rows from all processes (rows may differ in number); the local rows keep their autograd graph. Returns
    (global, local offset)."""
    import torch.distributed as dist

    rank, world = process_group()
    if world == 1:
        return local, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local.detach()
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    parts = [local if r == rank else chunk[: int(sizes[r].item())] for r, chunk in enumerate(chunks)]
    return torch.cat(parts), int(sum(int(s.item()) for s in sizes[:rank]))


def gather_objects(values: list) -> list:
    """Concatenate a Python list across processes (rank order)."""
    import torch.distributed as dist

    _, world = process_group()
    if world == 1:
        return list(values)
    out: list = [None] * world
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]
