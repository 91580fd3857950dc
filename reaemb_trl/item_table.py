"""Item-table files: one place that writes, reads, describes, projects and aligns them.

A table is a safetensors file with

- tensor `embeddings` (N, D) float32, one row per item;
- metadata `item_ids`: a JSON list of the N item ids, in row order (older files may hold an integer tensor
  `item_ids` instead; both are read);
- metadata describing how the vectors were made (`format`, `source`, `backbone`, `adapter`, `thought`, `pooling`,
  `prompt_format`, `dtype`, `dimension`, `raw_dimension`, `pca`, `fingerprint`); strings are stored as they are,
  everything else JSON-encoded;
- when the table was reduced by PCA: tensors `pca_components` (D, raw_dimension) and `pca_mean` (raw_dimension,),
  so that a new item's raw vector `v` maps into the table as `(v - pca_mean) @ pca_components.T`.

Rows are matched to a dataset by id, never by position. Files are written atomically (a temporary file in the
target folder, then `os.replace`): a reader sees the old file or the new one, never half of one.

The `fingerprint` names what made the vectors: a hash over the trained weights (thought module, LoRA adapter and
its configuration), the prompt format, the pooling and the backbone's name. It is computed from the tensors
themselves, so a checkpoint folder (`checkpoint_fingerprint`) and the embedder loaded from it
(`embedder_fingerprint`) give the same value; `reaemb encode` uses it to refuse adding rows made by another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from reaemb_trl.atomic import write_atomic

FORMAT = "reaemb-trl/table-2"  # table-1 files (no fingerprint, no dtype) are read too
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# Metadata values kept as plain strings; every other value is JSON-encoded.
STRING_KEYS = frozenset({"format", "source", "backbone", "pooling", "dtype", "fingerprint", "export_job"})
# The name under which the thought module's tensors enter a fingerprint. It is part of every fingerprint already
# written into table files, so it stays `thought.` (changing it would make `reaemb encode` refuse existing tables).
FINGERPRINT_THOUGHT_PREFIX = "thought."
# The adapter settings that change the vectors (the rest of peft's config is bookkeeping).
ADAPTER_SETTINGS = ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "rank_pattern", "alpha_pattern")


class TableError(ValueError):
    """A table file is missing or malformed; the message names the file, the problem and what to do."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = ""):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" + (f". {fix}" if fix else ""))


# ---- the table ---------------------------------------------------------------------------------------------------
@dataclass
class ItemTable:
    """Rows of item vectors with their ids, the metadata of how they were made and the stored PCA, if any."""

    embeddings: torch.Tensor  # (N, D) float32
    item_ids: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    pca_components: torch.Tensor | None = None  # (D, raw_dimension)
    pca_mean: torch.Tensor | None = None  # (raw_dimension,)
    path: Path | None = None  # the file it was read from, for error messages

    def __post_init__(self) -> None:
        where = self.path or "item table"
        self.item_ids = [str(i) for i in self.item_ids]
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.item_ids):
            shape = tuple(self.embeddings.shape)
            raise TableError(where, f"embeddings {shape} do not match {len(self.item_ids)} item ids")
        self.embeddings = self.embeddings.float()
        duplicates = _duplicates(self.item_ids)
        if duplicates:
            raise TableError(where, f"{len(duplicates)} item ids occur more than once, e.g. {duplicates[:5]}")
        if (self.pca_components is None) != (self.pca_mean is None):
            raise TableError(where, "a PCA projection needs both 'pca_components' and 'pca_mean'")
        if self.pca_components is not None:
            components, mean = self.pca_components, self.pca_mean
            if components.shape[0] != self.dimension or components.shape[1:] != mean.shape:
                raise TableError(
                    where, f"PCA components {tuple(components.shape)} and mean {tuple(mean.shape)} do not fit "
                    f"{self.dimension}-dimensional rows",
                )  # fmt: skip

    @property
    def dimension(self) -> int:
        return self.embeddings.shape[1]

    @property
    def raw_dimension(self) -> int:
        """The dimension of the vectors the model produces (before PCA)."""
        return self.dimension if self.pca_mean is None else self.pca_mean.shape[0]

    @cached_property
    def row_of(self) -> dict[str, int]:
        return {item_id: row for row, item_id in enumerate(self.item_ids)}

    def missing(self, item_ids: Sequence[str]) -> list[str]:
        """The ids (in the given order) that have no row here."""
        return [str(i) for i in item_ids if str(i) not in self.row_of]

    def aligned(self, item_ids: Sequence[str]) -> torch.Tensor:
        """Rows reordered to `item_ids` (float32, (len(item_ids), D)); extra rows are ignored, a missing id is a
        ValueError naming the file and a few of the missing ids."""
        missing = self.missing(item_ids)
        if missing:
            raise TableError(
                self.path or "item table",
                f"{len(missing)} of {len(item_ids)} items have no embedding in this table, e.g. {missing[:5]}",
                "Export a table for this catalogue (`reaemb export --data ...`), or add the new items with "
                "`reaemb encode --items ... --table ...`",
            )
        rows = torch.tensor([self.row_of[str(i)] for i in item_ids], dtype=torch.long)
        return self.embeddings[rows]

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """Map the model's raw vectors (M, raw_dimension) into this table's space with the stored PCA."""
        if raw.ndim != 2 or raw.shape[1] != self.raw_dimension:
            raise TableError(
                self.path or "item table",
                f"new vectors have shape {tuple(raw.shape)}, the table expects {self.raw_dimension} raw dimensions",
                "Encode with the model that made the table",
            )
        if self.pca_mean is None:
            return raw.float()
        return pca_apply(raw.float(), self.pca_components, self.pca_mean)

    def with_new_rows(self, item_ids: Sequence[str], raw: torch.Tensor) -> "ItemTable":
        """A copy with rows appended for `item_ids`, from the model's raw vectors through the stored PCA."""
        return ItemTable(
            torch.cat([self.embeddings, self.project(raw)]),
            self.item_ids + [str(i) for i in item_ids],
            dict(self.metadata),
            self.pca_components,
            self.pca_mean,
            self.path,
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically; `path` may be the file this table was read from."""
        extra = None
        if self.pca_components is not None:
            extra = {"pca_components": self.pca_components, "pca_mean": self.pca_mean}
        return write_table(path, self.embeddings, self.item_ids, self.metadata, extra)


def new_table(
    raw: torch.Tensor, item_ids: Sequence[str], metadata: Mapping[str, Any], pca: int | None = None
) -> ItemTable:
    """A table of the model's raw vectors, reduced to `pca` dimensions when asked (the projection is kept)."""
    metadata = {"format": FORMAT, **metadata, "raw_dimension": raw.shape[1]}
    if not pca:
        metadata.pop("pca", None)
        return ItemTable(raw.float(), list(item_ids), metadata)
    components, mean = pca_fit(raw.float(), pca)
    metadata["pca"] = pca
    return ItemTable(pca_apply(raw.float(), components, mean), list(item_ids), metadata, components, mean)


# ---- PCA ---------------------------------------------------------------------------------------------------------
def pca_fit(table: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(components (k, D), mean (D,)) of the centred table, by SVD."""
    if not 0 < k <= min(table.shape):
        raise ValueError(f"--pca {k} must be between 1 and min(num_items, dim) = {min(table.shape)}")
    mean = table.mean(0)
    _, _, vh = torch.linalg.svd(table.double() - mean.double(), full_matrices=False)
    return vh[:k].float(), mean


def pca_apply(raw: torch.Tensor, components: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return (raw - mean) @ components.T


# ---- files -------------------------------------------------------------------------------------------------------
def write_table(
    path: str | os.PathLike,
    embeddings: torch.Tensor,
    item_ids: Sequence[str],
    metadata: Mapping[str, Any],
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `embeddings` + metadata (`item_ids` as a JSON list, the rest JSON-encoded) atomically."""
    if embeddings.ndim != 2 or embeddings.shape[0] != len(item_ids):
        raise ValueError(f"{tuple(embeddings.shape)} embeddings for {len(item_ids)} item ids")
    duplicates = _duplicates([str(i) for i in item_ids])
    if duplicates:
        raise ValueError(f"{len(duplicates)} item ids occur more than once, e.g. {duplicates[:5]}")
    meta = encode_metadata(metadata)
    meta["item_ids"] = json.dumps([str(i) for i in item_ids])
    meta["dimension"] = str(embeddings.shape[1])
    return write_safetensors(path, {"embeddings": embeddings.float(), **(extra_tensors or {})}, meta)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """save_file through the project's own temporary file in the target folder (`reaemb_trl.atomic`): never a
    half-written table, and no temporary file left by an interrupted write."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the raw metadata of a safetensors file; TableError when it is missing or unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TableError(path, "file not found", "Export a table with `reaemb export --data ... --output FILE`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types (and OSError) for a damaged file
        raise TableError(path, f"not a readable safetensors file ({exc})", "Export the table again") from None


def read_table(path: str | os.PathLike) -> ItemTable:
    """Read a table file. Row ids come from metadata `item_ids` (a JSON list) or an integer tensor `item_ids`."""
    path = Path(path)
    tensors, raw_meta = read_safetensors(path)
    if "embeddings" not in tensors:
        raise TableError(path, f"no tensor named 'embeddings' (found {sorted(tensors)})", "Is this an item table?")
    item_ids = _item_ids(path, tensors, raw_meta)
    metadata = decode_metadata({k: v for k, v in raw_meta.items() if k != "item_ids"})
    return ItemTable(
        tensors["embeddings"], item_ids, metadata, tensors.get("pca_components"), tensors.get("pca_mean"), path
    )


def _item_ids(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> list[str]:
    if "item_ids" in metadata:
        try:
            ids = json.loads(metadata["item_ids"])
        except json.JSONDecodeError as exc:
            raise TableError(path, f"metadata 'item_ids' is not a JSON list ({exc})") from None
        if not isinstance(ids, list):
            raise TableError(path, f"metadata 'item_ids' is a JSON {type(ids).__name__}, not a list")
        return [str(i) for i in ids]
    if "item_ids" in tensors:
        ids = tensors["item_ids"]
        if ids.is_floating_point() or ids.ndim != 1:
            problem = f"tensor 'item_ids' must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}"
            raise TableError(path, problem)
        return [str(i) for i in ids.tolist()]
    raise TableError(
        path, "no item ids (metadata key 'item_ids' or tensor 'item_ids'); rows cannot be aligned to the dataset",
        "Write the ids with the table (reaemb_trl.item_table.write_table)",
    )  # fmt: skip


def encode_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def decode_metadata(raw: Mapping[str, str]) -> dict[str, Any]:
    """Inverse of `encode_metadata` for the known keys; other values are JSON-decoded when they parse."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in STRING_KEYS:
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _duplicates(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return [i for i in ids if i in seen or seen.add(i)]


# ---- what made a table -------------------------------------------------------------------------------------------
def table_metadata(
    embedder,
    source: str,
    *,
    without_thought: bool = False,
    thought_module: nn.Module | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """What a table file records about how its vectors were made (`thought_module` overrides the embedder's;
    `without_thought`: the vectors were made without a thought token). The metadata key `thought` records whether
    a thought vector was used."""
    module = None if without_thought else (thought_module or embedder.thought_module)
    return {
        "format": FORMAT,
        "source": str(source),
        "backbone": embedder.backbone or "",
        "adapter": embedder.has_adapter,
        "thought": not without_thought,
        "pooling": embedder.pooling,
        "prompt_format": embedder.formatter.to_dict(),
        "dtype": dtype_name(dtype),
        "fingerprint": embedder_fingerprint(embedder, module),
    }


def dtype_name(dtype: torch.dtype | None) -> str:
    """The compute dtype as written in table metadata (None: float32, no autocast)."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def embedder_fingerprint(embedder, thought_module: nn.Module | None) -> str:
    """The fingerprint of the vectors `embedder` gives with `thought_module` (None: without a thought token)."""
    tensors: dict[str, torch.Tensor] = {}
    if thought_module is not None:
        tensors.update({f"{FINGERPRINT_THOUGHT_PREFIX}{k}": v for k, v in thought_module.state_dict().items()})
    adapter_settings = None
    if embedder.has_adapter:
        from peft import get_peft_model_state_dict

        # The same state dict peft writes into the checkpoint's adapter file (the embedding rows are not saved).
        state = get_peft_model_state_dict(embedder.model, save_embedding_layers=False)
        tensors.update({f"adapter.{k}": v for k, v in state.items()})
        adapter_settings = _adapter_settings(embedder.model.peft_config["default"].to_dict())
    keys = getattr(thought_module, "keys", "all") if thought_module is not None else "all"
    return _fingerprint(embedder.backbone, embedder.pooling, embedder.formatter.to_dict(), adapter_settings, tensors,
                        keys)


def checkpoint_fingerprint(folder: str | os.PathLike, *, without_thought: bool = False) -> str:
    """The fingerprint of a checkpoint folder, read from its files without loading the model; equal to
    `embedder_fingerprint` of the embedder loaded from it (`without_thought`: of its vectors without a thought
    token)."""
    from safetensors.torch import load_file

    from reaemb_trl.checkpointing import ADAPTER_DIR, CONFIG_FILE, THOUGHT_FILE
    from reaemb_trl.prompt import ItemPromptFormatter

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    tensors: dict[str, torch.Tensor] = {}
    if not without_thought:
        tensors.update({f"{FINGERPRINT_THOUGHT_PREFIX}{k}": v for k, v in load_file(folder / THOUGHT_FILE).items()})
    adapter_settings = None
    if config.get("adapter"):
        tensors.update({f"adapter.{k}": v for k, v in load_file(folder / ADAPTER_DIR / ADAPTER_WEIGHTS_FILE).items()})
        adapter_settings = _adapter_settings(json.loads((folder / ADAPTER_DIR / ADAPTER_CONFIG_FILE).read_text()))
    backbone = None if config.get("backbone_in_folder") else config.get("backbone")
    formatter = ItemPromptFormatter.load(folder)
    keys = "all" if without_thought else config.get("thought_keys", "all")
    return _fingerprint(backbone, config["pooling"], formatter.to_dict(), adapter_settings, tensors, keys)


def backbone_fingerprint(backbone: str, pooling: str, prompt_format: Mapping[str, Any]) -> str:
    """The fingerprint of a bare-backbone table (no adapter, no thought)."""
    return _fingerprint(backbone, pooling, dict(prompt_format), None, {})


def _adapter_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    settings = {k: config.get(k) for k in ADAPTER_SETTINGS}
    if isinstance(settings["target_modules"], (list, set, tuple)):  # peft keeps a set in memory, a list on disk
        settings["target_modules"] = sorted(settings["target_modules"])
    return settings


def _fingerprint(
    backbone: str | None,
    pooling: str,
    prompt_format: Mapping[str, Any],
    adapter_settings: Mapping[str, Any] | None,
    tensors: Mapping[str, torch.Tensor],
    thought_keys: str = "all",
) -> str:
    """sha256 over the settings (canonical JSON) and each tensor's name, shape and float32 bytes, in name order.

    Tensor contents, not file bytes: the same weights give the same fingerprint however they were serialised.
    `thought_keys` shapes the vectors without being a tensor; it enters only when not the default, so tables
    written before the option keep their fingerprints."""
    digest = hashlib.sha256()
    settings = {"backbone": backbone or None, "pooling": pooling, "prompt_format": dict(prompt_format),
                "adapter": adapter_settings}  # fmt: skip
    if thought_keys != "all":
        settings["thought_keys"] = thought_keys
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"\n{name}{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()
