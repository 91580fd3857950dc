"""Item tables for the downstream models: learned ids, or a frozen embedding file plus a trained adapter.

Index convention: 0 is padding (always the zero vector), items are 1..N in the dataset's catalogue order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from reaemb_trl.evaluation.config import NORMALIZATIONS, TABLE_MODES


def load_embedding_file(path: str | Path, item_ids: Sequence[str]) -> torch.Tensor:
    """The rows of a table file (reaemb_trl.item_table) for `item_ids`, matched by id, never by position: a table
    written in another order (or with extra items) still lines up; a missing id is an error naming the file."""
    from reaemb_trl.item_table import read_table

    return read_table(path).aligned(list(item_ids)).float()


ID_INIT_STD = 0.02  # the ID table's initialisation (SASRec/RecBole use 0.02)


def normalize_table(table: torch.Tensor, kind: str = "center_scale") -> torch.Tensor:
    """What the adapter reads: the table centred on its mean and scaled to unit mean row norm (`center_scale`),
    additionally PCA-whitened (`whiten`: every principal direction gets unit variance), or as is (`none`).

    Computed in float64, so a table and its copy shifted by one shared vector give the same input (LLM tables share
    a large common direction; without centring it drowns the item signal)."""
    if kind not in NORMALIZATIONS:
        raise ValueError(f"table normalization must be one of {NORMALIZATIONS}, got {kind!r}")
    if kind == "none":
        return table.float()
    x = table.double()
    x = x - x.mean(0)
    if kind == "whiten":
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        keep = s > s[0] * 1e-6  # drop directions the table does not span
        x = u[:, keep] * (x.shape[0] - 1) ** 0.5
    return (x / x.norm(dim=1).mean().clamp_min(1e-12)).float()


def pca_init(table: torch.Tensor, hidden: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An ID table initialised from an LLM table: its centred PCA to `hidden` dimensions, rescaled to the mean row
    norm of the ID table's own random initialisation (so learning rates and dynamics stay those of `id`). A table
    with fewer than `hidden` directions is padded with that random initialisation."""
    x = normalize_table(table, "center_scale").double()
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(hidden, vh.shape[0])
    projected = x @ vh[:k].T
    projected = projected / projected.norm(dim=1).mean().clamp_min(1e-12)
    if k < hidden:
        noise = torch.randn(x.shape[0], hidden - k, generator=generator, dtype=torch.float64) * hidden**-0.5
        projected = torch.cat([projected, noise], dim=1)
    target_norm = ID_INIT_STD * hidden**0.5  # E||row|| of N(0, 0.02^2 I_hidden), to first order
    return (projected * (target_norm / projected.norm(dim=1).mean())).float()


class IDTable(nn.Module):
    """Learned item-id embeddings (the baseline); `init` (N, hidden) replaces the random initialisation."""

    def __init__(self, num_items: int, hidden: int, init: torch.Tensor | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=ID_INIT_STD)
        with torch.no_grad():
            if init is not None:
                if tuple(init.shape) != (num_items, hidden):
                    raise ValueError(f"init table has shape {tuple(init.shape)}, expected {(num_items, hidden)}")
                self.embedding.weight[1:] = init
            self.embedding.weight[0].zero_()

    def all_items(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embedding(idx)


class AdapterTable(nn.Module):
    """A frozen (N, D) table, normalised (see `normalize_table`), passed through a trained MLP D -> 256 -> hidden;
    padding stays zero. The paper's table mode."""

    def __init__(self, frozen: torch.Tensor, hidden: int, adapter_hidden: int = 256, dropout: float = 0.0,
                 normalization: str = "center_scale"):
        super().__init__()
        normalized = normalize_table(frozen, normalization)
        padded = torch.cat([torch.zeros(1, normalized.shape[1]), normalized], dim=0)
        self.register_buffer("frozen", padded)  # a buffer: saved and moved with the model, never trained
        self.adapter = nn.Sequential(nn.Linear(padded.shape[1], adapter_hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(adapter_hidden, hidden))

    def all_items(self) -> torch.Tensor:
        out = self.adapter(self.frozen)
        return torch.cat([torch.zeros_like(out[:1]), out[1:]], dim=0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = self.adapter(self.frozen[idx])
        return out * (idx != 0).unsqueeze(-1).to(out.dtype)


class HybridTable(nn.Module):
    """Learned ID embeddings plus the adapter's view of a frozen LLM table (LLM-ESR-style).

    `id_dropout` > 0: in training mode each call leaves out every item's ID row with that probability (the item is
    then its adapter row alone), so the model learns to place an item from its text alone; the `unseen` items
    (cold: no training interaction, so no learned ID) get a zero ID row, the convention a left-out ID was trained
    with, instead of their untrained random one."""

    def __init__(self, frozen: torch.Tensor, num_items: int, hidden: int, adapter_hidden: int = 256,
                 normalization: str = "center_scale", id_dropout: float = 0.0, unseen: Sequence[int] = ()):
        super().__init__()
        self.ids = IDTable(num_items, hidden)
        self.llm = AdapterTable(frozen, hidden, adapter_hidden, normalization=normalization)
        self.id_dropout = id_dropout
        if id_dropout and len(unseen):
            with torch.no_grad():  # never a training input or candidate, so no gradient ever moves these rows
                self.ids.embedding.weight[torch.as_tensor(list(unseen))] = 0.0

    def _id_kept(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """(rows, 1) 0/1 mask of the ID rows kept in this call (None: all of them)."""
        if not (self.training and self.id_dropout):
            return None
        return (torch.rand(rows, 1, device=device) >= self.id_dropout).float()

    def all_items(self) -> torch.Tensor:
        ids = self.ids.all_items()
        kept = self._id_kept(ids.shape[0], ids.device)
        return (ids if kept is None else ids * kept) + self.llm.all_items()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        ids = self.ids(idx)
        kept = self._id_kept(self.ids.embedding.num_embeddings, ids.device)
        if kept is not None:
            ids = ids * kept[idx]
        return ids + self.llm(idx)


def build_table(spec: str, item_ids: Sequence[str], hidden: int, adapter_hidden: int = 256, mode: str = "frozen",
                normalization: str = "center_scale", id_dropout: float = 0.0, unseen: Sequence[int] = ()) -> nn.Module:
    """`spec` is "id" or a path to a .safetensors embedding file, used in table `mode`:
    frozen (adapter over the frozen table), init (trainable IDs initialised from its PCA) or hybrid (IDs + adapter;
    `id_dropout` and the `unseen` item indices: see HybridTable)."""
    if spec == "id":
        return IDTable(len(item_ids), hidden)
    if mode not in TABLE_MODES:
        raise ValueError(f"table mode must be one of {TABLE_MODES}, got {mode!r}")
    table = load_embedding_file(spec, item_ids)
    if mode == "init":
        return IDTable(len(item_ids), hidden, init=pca_init(table, hidden))
    if mode == "hybrid":
        return HybridTable(table, len(item_ids), hidden, adapter_hidden, normalization, id_dropout, unseen)
    return AdapterTable(table, hidden, adapter_hidden, normalization=normalization)
