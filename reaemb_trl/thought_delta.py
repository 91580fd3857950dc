"""A low-rank trainable delta on the thought module's value projection (CRRL's `thought_trainable: lowrank`).

    W_v = W_v^LRCL + up @ down      (up: d x r, zeros at the start; down: r x d, LoRA's random init)

LRCL's weights stay frozen; only `up` and `down` train, so CRRL starts exactly at LRCL's thought (up = 0) and can
move it only along r directions of what the head reads. The delta is a `torch.nn.utils.parametrize` parametrization
of `v_proj.weight`: the module stays a `LatentThoughtModule` (every caller of the thought module sees the delta), and
the checkpoint folds it into a plain `v_proj.weight` (`folded_thought_module`), so CRRL checkpoints keep the format
every loader reads. The factors are also kept in their own file (`DELTA_FILE`) for an exact resume: the frozen base
is the LRCL checkpoint the run starts from.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from reaemb_trl.atomic import write_atomic

DELTA_FILE = "thought_delta.safetensors"


class LowRankDelta(nn.Module):
    """weight -> weight + up @ down (a parametrization of a (d_out, d_in) weight)."""

    def __init__(self, d_out: int, d_in: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, d_in))
        self.up = nn.Parameter(torch.zeros(d_out, rank))  # zero: the delta starts at exactly nothing
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # LoRA's init of its down projection

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).to(weight.dtype)


def add_lowrank_delta(module: nn.Module, rank: int) -> LowRankDelta:
    """Freeze `module` and give its `v_proj.weight` a trainable rank-`rank` delta; returns the delta."""
    module.requires_grad_(False)
    v_proj = module.v_proj
    delta = LowRankDelta(*v_proj.weight.shape, rank).to(v_proj.weight.device)
    parametrize.register_parametrization(v_proj, "weight", delta)
    return delta


def lowrank_delta(module: nn.Module) -> LowRankDelta | None:
    """The delta `add_lowrank_delta` put on `module`, or None."""
    v_proj = getattr(module, "v_proj", None)
    if v_proj is None or not parametrize.is_parametrized(v_proj, "weight"):
        return None
    return next(p for p in v_proj.parametrizations.weight if isinstance(p, LowRankDelta))


def folded_thought_module(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` whose `v_proj` is a plain Linear with the delta folded in (what a checkpoint
    stores). Not `remove_parametrizations` on a deep copy: the copy shares its parametrized class with `module`,
    and removing the parametrization from that class would break `module` too."""
    folded = copy.deepcopy(module).requires_grad_(False)
    v_proj = module.v_proj
    plain = nn.Linear(v_proj.in_features, v_proj.out_features, bias=v_proj.bias is not None)
    plain.weight = nn.Parameter(v_proj.weight.detach().clone(), requires_grad=False)
    if v_proj.bias is not None:
        plain.bias = nn.Parameter(v_proj.bias.detach().clone(), requires_grad=False)
    folded.v_proj = plain
    return folded


FACTORS = "v_proj.parametrizations.weight."  # where a thought module's state dict holds the delta


def folded_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A parametrized thought module's state dict as a plain one: `v_proj.weight` = original + up @ down."""
    plain = {k: v for k, v in state.items() if not k.startswith(FACTORS)}
    original = state[FACTORS + "original"]
    plain["v_proj.weight"] = original + (state[FACTORS + "0.up"] @ state[FACTORS + "0.down"]).to(original.dtype)
    return plain


def save_delta(state: dict[str, torch.Tensor], folder: str | os.PathLike) -> None:
    """Write the factors of a parametrized thought module's state dict to `folder`/DELTA_FILE."""
    factors = {k.removeprefix(FACTORS + "0."): v.detach().cpu().contiguous() for k, v in state.items()
               if k.startswith(FACTORS + "0.")}
    write_atomic(Path(folder) / DELTA_FILE, lambda tmp: save_file(factors, tmp))


def load_delta(module: nn.Module, folder: str | os.PathLike) -> None:
    """Load the factors saved by `save_delta` into the delta of `module` (the frozen base is left as it is)."""
    delta = lowrank_delta(module)
    state = load_file(Path(folder) / DELTA_FILE)
    with torch.no_grad():
        for name, p in delta.named_parameters():
            p.copy_(state[name].to(p.device, p.dtype))
