"""Export an item-embedding table (SPEC 5): encode every item once and write safetensors with ids and metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from reaemb_trl.embedder import ThoughtEmbedder


def fast_bf16_available(device: torch.device) -> bool:
    """bf16 matmuls are fast on CUDA cards that support them and on CPUs with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """`auto` -> bf16 where the hardware runs it fast, else fp32; `float32`/`bfloat16`/`float16` as named."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16_available(device) else None
    if name in ("float32", "fp32"):
        return None
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    if name in ("float16", "fp16"):
        return torch.float16
    raise ValueError(f"dtype must be auto, float32, bfloat16 or float16; got {name!r}")


def pca_fit(table: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(components (k, D), mean (D,)) of the centred table, by SVD."""
    if not 0 < k <= min(table.shape):
        raise ValueError(f"--pca {k} must be between 1 and min(num_items, dim) = {min(table.shape)}")
    mean = table.mean(0)
    _, _, vh = torch.linalg.svd(table.double() - mean.double(), full_matrices=False)
    return vh[:k].float(), mean


def write_table(
    path: str | os.PathLike,
    embeddings: torch.Tensor,
    item_ids: Sequence[str],
    metadata: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `embeddings` + metadata (`item_ids` as a JSON list, the rest JSON-encoded) atomically."""
    path = Path(path)
    if embeddings.shape[0] != len(item_ids):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(item_ids)} item ids")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"embeddings": embeddings.float().contiguous(), **(extra_tensors or {})}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["item_ids"] = json.dumps([str(i) for i in item_ids])
    meta["dimension"] = str(embeddings.shape[1])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def table_metadata(embedder: ThoughtEmbedder, source: str, use_thought: bool = True) -> dict[str, Any]:
    """What a table file records about how its vectors were made."""
    return {
        "format": "reaemb-trl/table-1",
        "source": source,
        "backbone": embedder.backbone or "",
        "adapter": hasattr(embedder.model, "peft_config"),
        "thought": use_thought,
        "pooling": embedder.pooling,
        "prompt_format": embedder.formatter.to_dict(),
    }


def write_embedding_table(
    path: str | os.PathLike, table: torch.Tensor, item_ids: Sequence[str], metadata: dict, pca: int | None = None
) -> Path:
    """Write a table, optionally reduced to `pca` dimensions (the projection and mean are stored with it)."""
    metadata = {**metadata, "raw_dimension": table.shape[1]}
    extra = None
    if pca:
        components, mean = pca_fit(table, pca)
        table = (table - mean) @ components.T
        extra = {"pca_components": components, "pca_mean": mean}
        metadata["pca"] = pca
    return write_table(path, table, item_ids, metadata, extra)


def export_table(
    embedder: ThoughtEmbedder,
    items: Sequence[dict],
    output: str | os.PathLike,
    *,
    source: str,
    use_thought: bool = True,
    batch_size: int = 64,
    pca: int | None = None,
    dtype: str = "auto",
    progress: bool = True,
) -> Path:
    """Encode `items` (dicts with `item_id` and `attributes`) and write the table to `output`.

    `use_thought=False` is the no-fine-tuning baseline: the same prompt and pooling, without a thought vector."""
    table = embedder.encode(
        [item["attributes"] for item in items],
        batch_size=batch_size,
        method="fast" if use_thought else "no_thought",
        progress=progress,
        dtype=resolve_dtype(dtype, embedder.device),
    )
    ids = [str(item["item_id"]) for item in items]
    return write_embedding_table(output, table, ids, table_metadata(embedder, source, use_thought), pca)


def export_thought_variants(
    embedder: ThoughtEmbedder,
    items: Sequence[dict],
    outputs: dict[str, tuple[str | os.PathLike, torch.nn.Module, str]],
    *,
    batch_size: int = 64,
    pca: int | None = None,
    dtype: str = "auto",
    progress: bool = True,
) -> dict[str, Path]:
    """Several tables of one LLM under different thought modules ({name: (output, module, source)}), e.g. LRCL
    and LRCL+CRRL: the prefix pass is shared, each module adds only its 2-token suffix."""
    tables = embedder.encode_with_thoughts(
        [item["attributes"] for item in items],
        {name: module for name, (_, module, _) in outputs.items()},
        batch_size=batch_size,
        progress=progress,
        dtype=resolve_dtype(dtype, embedder.device),
    )
    ids = [str(item["item_id"]) for item in items]
    return {
        name: write_embedding_table(path, tables[name], ids, table_metadata(embedder, source), pca)
        for name, (path, _, source) in outputs.items()
    }
