"""The `auto` precision rule (reaemb_trl.hardware): bf16 only where the hardware runs it fast, fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from reaemb_trl import hardware
from reaemb_trl.export import resolve_dtype

AVX2_ONLY = "fpu sse sse2 avx fma avx2"  # an AMD EPYC / older Intel: bf16 is emulated, slower than fp32


def _cpuinfo(tmp_path, monkeypatch, flags: str) -> None:
    """This machine's /proc/cpuinfo, as if it had `flags`."""
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(hardware, "CPUINFO", path)


def test_cpu_flags_and_model_come_from_cpuinfo(tmp_path, monkeypatch):
    _cpuinfo(tmp_path, monkeypatch, AVX2_ONLY)
    assert hardware.cpu_flags() == set(AVX2_ONLY.split()) and hardware.cpu_model() == "Test CPU"
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")
    assert hardware.cpu_flags() == set() and hardware.cpu_model() is None


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(AVX2_ONLY, None), (AVX2_ONLY + " avx512f", None), (AVX2_ONLY + " avx512f avx512_bf16", torch.bfloat16),
     (AVX2_ONLY + " amx_tile amx_bf16", torch.bfloat16)],
)  # fmt: skip
def test_auto_on_cpu_is_bf16_only_with_avx512_bf16_or_amx(tmp_path, monkeypatch, flags, expected):
    _cpuinfo(tmp_path, monkeypatch, flags)
    assert resolve_dtype("auto", torch.device("cpu")) is expected  # None: fp32, no autocast
    assert hardware.fast_bf16_available("cpu", flags=set(flags.split())) is (expected is not None)


def test_auto_on_cuda_follows_the_cards_bf16_support(tmp_path, monkeypatch):
    _cpuinfo(tmp_path, monkeypatch, AVX2_ONLY)  # the host CPU does not matter on CUDA
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert hardware.fast_bf16_available("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # e.g. a V100
    assert resolve_dtype("auto", torch.device("cuda")) is None


def test_auto_elsewhere_is_fp32_and_named_dtypes_are_kept():
    assert resolve_dtype("auto", torch.device("meta")) is None
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("float32", torch.device("cuda")) is None
    with pytest.raises(ValueError, match="--dtype must be auto"):
        resolve_dtype("int8", torch.device("cpu"))
