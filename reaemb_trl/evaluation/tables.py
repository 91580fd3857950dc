"""Item tables for the downstream models: learned ids, or a frozen embedding file plus a trained adapter.

Index convention: 0 is padding (always the zero vector), items are 1..N in the dataset's catalogue order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


def load_embedding_file(path: str | Path, item_ids: Sequence[str]) -> torch.Tensor:
    """Read `embeddings` (num_items, D) from a .safetensors file and reorder its rows to `item_ids`.

    Row ids come from the metadata key ``item_ids`` (a JSON list of strings) or, failing that, from an
    integer tensor ``item_ids``. Rows are matched by id, never by position, so a table written in a
    different order (or with extra items) still lines up; a missing id is an error.
    """
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        if "embeddings" not in keys:
            raise ValueError(f"{path}: no tensor named 'embeddings' (found {sorted(keys)})")
        table = handle.get_tensor("embeddings")
        meta = handle.metadata() or {}
        if "item_ids" in meta:
            try:
                file_ids = [str(i) for i in json.loads(meta["item_ids"])]
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: metadata 'item_ids' is not a JSON list ({exc})") from None
        elif "item_ids" in keys:
            file_ids = [str(i) for i in handle.get_tensor("item_ids").tolist()]
        else:
            raise ValueError(f"{path}: no item ids (metadata key 'item_ids' or tensor 'item_ids'); "
                             "rows cannot be aligned to the dataset")
    if table.ndim != 2 or table.shape[0] != len(file_ids):
        raise ValueError(f"{path}: embeddings {tuple(table.shape)} do not match {len(file_ids)} item ids")
    row = {item_id: n for n, item_id in enumerate(file_ids)}
    missing = [i for i in item_ids if i not in row]
    if missing:
        raise ValueError(f"{path}: {len(missing)} dataset items have no embedding, e.g. {missing[:5]}")
    return table[torch.tensor([row[i] for i in item_ids])].float()


class IDTable(nn.Module):
    """Learned item-id embeddings (the baseline)."""

    def __init__(self, num_items: int, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.02)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def all_items(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embedding(idx)


class AdapterTable(nn.Module):
    """A frozen (N, D) table passed through a trained MLP D -> 256 -> hidden; padding stays zero."""

    def __init__(self, frozen: torch.Tensor, hidden: int, adapter_hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        padded = torch.cat([torch.zeros(1, frozen.shape[1]), frozen.float()], dim=0)
        self.register_buffer("frozen", padded)  # a buffer: saved and moved with the model, never trained
        self.adapter = nn.Sequential(nn.Linear(frozen.shape[1], adapter_hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(adapter_hidden, hidden))

    def all_items(self) -> torch.Tensor:
        out = self.adapter(self.frozen)
        return torch.cat([torch.zeros_like(out[:1]), out[1:]], dim=0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = self.adapter(self.frozen[idx])
        return out * (idx != 0).unsqueeze(-1).to(out.dtype)


def build_table(spec: str, item_ids: Sequence[str], hidden: int, adapter_hidden: int = 256) -> nn.Module:
    """`spec` is "id" or a path to a .safetensors embedding file."""
    if spec == "id":
        return IDTable(len(item_ids), hidden)
    return AdapterTable(load_embedding_file(spec, item_ids), hidden, adapter_hidden)
