"""What the machine runs fast: the one place that decides whether `auto` precision means bf16 or fp32.

bf16 matmuls are fast on CUDA cards that support them and on CPUs with AMX or AVX512-BF16; elsewhere (an AVX2-only
CPU, Apple MPS, ...) bf16 is emulated and slower than fp32, so `auto` keeps fp32 there.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo (None where the file or the field is missing)."""
    try:
        for line in CPUINFO.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (avx2, avx512_bf16, amx_bf16, ...); empty where /proc/cpuinfo is unavailable."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo, or None."""
    return _cpuinfo_field("model name")


def fast_bf16_available(device, flags: set[str] | None = None) -> bool:
    """True where bf16 matmuls on `device` are fast: CUDA with bf16 support, or a CPU whose `flags` (default: this
    machine's) include AMX or AVX512-BF16."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in (cpu_flags() if flags is None else flags) for flag in BF16_CPU_FLAGS)
    return False
