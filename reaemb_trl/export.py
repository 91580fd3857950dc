"""Export an item-embedding table (docs/method.md, "Export"): encode every item once and write it with ids and
metadata.

The file format (reading, writing, metadata, PCA, alignment by id) lives in `reaemb_trl.item_table`; the checks of
what an export is given, in `reaemb_trl.export_inputs`.

Several processes (`reaemb export --num-processes N`, or `accelerate launch -m reaemb_trl.cli export ...`, or
any caller inside an initialised `torch.distributed` group) share one export: the items, in the 1-process order (by
token length), are cut into the 1-process batches and batch j goes to process j mod N, so every vector is computed
in exactly the batch it would be in alone (the same bits, given the same kernels). Each process writes its part
atomically to `<output>.parts/part-<rank>-of-<N>.safetensors` with its item ids and the fingerprint of the job
(model, items, dtype, batch size, N); process 0 merges the parts into one table in catalogue order (PCA, if asked,
is fitted on the merged table) and removes them. A rerun of a killed export reuses every part whose fingerprint
matches and recomputes the others.

`encode_new_items` adds the items a table lacks, with the model that made it (checked by fingerprint) and the
table's stored PCA projection.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from reaemb_trl.distributed import barrier, process_group
from reaemb_trl.export_inputs import ExportError, check_checkpoint, check_pca, check_same_model
from reaemb_trl.hardware import fast_bf16_available
from reaemb_trl.item_table import (
    TableError,
    checkpoint_fingerprint,
    dtype_name,
    embedder_fingerprint,
    new_table,
    read_safetensors,
    read_table,
    table_metadata,
    write_safetensors,
)

# An encoder of a list of item attributes: (attributes, sort_by_length, progress) -> {table name: (M, D) float32}.
EncodeFn = Callable[[list, bool, bool], dict[str, torch.Tensor]]


# ---- dtype -------------------------------------------------------------------------------------------------------
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
    raise ExportError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}")


# ---- processes and parts -----------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[reaemb] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ExportJob:
    """What the processes of one export compute; a part that carries the job's fingerprint is reused on a rerun."""

    models: tuple[tuple[str, str], ...]  # (table name, model fingerprint) per table
    items: str  # digest of the catalogue (ids and attributes, in order)
    dtype: str
    batch_size: int
    world_size: int

    def fingerprint(self) -> str:
        return "sha256:" + hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def catalogue_digest(items: Sequence[Mapping[str, Any]]) -> str:
    payload = [[str(item["item_id"]), item["attributes"]] for item in items]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def shard_rows(lengths: Sequence[int], batch_size: int, world_size: int) -> list[list[int]]:
    """Item rows per process: the 1-process order (stable sort by token length) cut into batches of `batch_size`,
    batch j to process j mod world_size, each process's rows in that order. Round robin over length-sorted batches
    also gives every process a similar mix of short and long items."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for batch, start in enumerate(range(0, len(order), batch_size)):
        shards[batch % world_size].extend(order[start : start + batch_size])
    return shards


def parts_dir(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parts")


def part_path(output: str | os.PathLike, rank: int, world_size: int) -> Path:
    return parts_dir(output) / f"part-{rank}-of-{world_size}.safetensors"


def part_is_current(path: Path, job: ExportJob) -> bool:
    """A finished part of this very job (a damaged or foreign file is recomputed, not trusted)."""
    if not path.is_file():
        return False
    try:
        _, metadata = read_safetensors(path)
    except TableError:
        return False
    return metadata.get("export_job") == job.fingerprint()


def encode_part(
    embedder,
    items: Sequence[Mapping[str, Any]],
    encode: EncodeFn,
    *,
    output: str | os.PathLike,
    job: ExportJob,
    rank: int,
    progress: bool = True,
) -> Path:
    """Encode process `rank`'s share of `items` and write it as a part, unless a finished part of `job` exists."""
    path = part_path(output, rank, job.world_size)
    if part_is_current(path, job):
        _log(f"process {rank}: reusing the finished part {path}")
        return path
    attributes = [item["attributes"] for item in items]
    lengths = [len(ids) for ids in embedder.prefix_ids(attributes)]
    rows = shard_rows(lengths, job.batch_size, job.world_size)[rank]
    # Pre-sorted, so unsorted encoding cuts exactly the 1-process batches.
    tables = encode([attributes[i] for i in rows], False, progress) if rows else {}
    tensors = {f"embeddings.{name}": table for name, table in tables.items()}
    metadata = {"item_ids": json.dumps([str(items[i]["item_id"]) for i in rows]), "export_job": job.fingerprint(),
                "rank": str(rank), "world_size": str(job.world_size)}  # fmt: skip
    return write_safetensors(path, tensors, metadata)


def merge_parts(
    output: str | os.PathLike, items: Sequence[Mapping[str, Any]], job: ExportJob
) -> dict[str, torch.Tensor]:
    """The parts of `job` assembled into one raw table per name, rows in catalogue order."""
    names = [name for name, _ in job.models]
    rows_of = {str(item["item_id"]): row for row, item in enumerate(items)}
    merged: dict[str, torch.Tensor] = {}
    filled = torch.zeros(len(items), dtype=torch.bool)
    for rank in range(job.world_size):
        path = part_path(output, rank, job.world_size)
        tensors, metadata = read_safetensors(path)
        if metadata.get("export_job") != job.fingerprint():
            raise ExportError(f"{path} belongs to another export (its job fingerprint differs); run the export again")
        rows = torch.tensor([rows_of[i] for i in json.loads(metadata["item_ids"])], dtype=torch.long)
        if len(rows) == 0:
            continue
        for name in names:
            table = tensors[f"embeddings.{name}"]
            if name not in merged:
                merged[name] = torch.empty(len(items), table.shape[1], dtype=torch.float32)
            merged[name][rows] = table.float()
        filled[rows] = True
    if not filled.all():
        missing = [str(items[i]["item_id"]) for i in (~filled).nonzero().flatten()[:5].tolist()]
        raise ExportError(f"the parts in {parts_dir(output)} lack {int((~filled).sum())} items, e.g. {missing}")
    return merged


def encode_catalogue(
    embedder,
    items: Sequence[Mapping[str, Any]],
    encode: EncodeFn,
    *,
    output: str | os.PathLike,
    job: ExportJob,
    progress: bool = True,
) -> dict[str, torch.Tensor] | None:
    """Raw tables of every item in catalogue order, on process 0; None on the others. With one process, no parts."""
    rank, world = process_group()
    if world == 1:
        return encode([item["attributes"] for item in items], True, progress)
    encode_part(embedder, items, encode, output=output, job=job, rank=rank, progress=progress and rank == 0)
    barrier()
    return merge_parts(output, items, job) if rank == 0 else None


def _write_tables(
    outputs: Mapping[str, tuple[Path, dict[str, Any]]],
    raw: Mapping[str, torch.Tensor] | None,
    item_ids: Sequence[str],
    pca: int | None,
) -> dict[str, Path]:
    """Process 0 writes each table and removes the parts (of the first output); every process returns the paths
    once they exist."""
    paths = {name: Path(path) for name, (path, _) in outputs.items()}
    if raw is not None:
        for name, (path, metadata) in outputs.items():
            new_table(raw[name], item_ids, metadata, pca).write(path)
        shutil.rmtree(parts_dir(next(iter(paths.values()))), ignore_errors=True)
    barrier()
    return paths


# ---- export ------------------------------------------------------------------------------------------------------
def table_encoder(embedder, *, without_thought: bool, batch_size: int, dtype: torch.dtype | None) -> EncodeFn:
    """The encoder of `export_table`: one table named `table`."""
    method = "no_thought" if without_thought else "fast"

    def encode(attributes: list, sort_by_length: bool, progress: bool) -> dict[str, torch.Tensor]:
        vectors = embedder.encode(attributes, batch_size=batch_size, method=method, sort_by_length=sort_by_length,
                                  progress=progress, dtype=dtype)  # fmt: skip
        return {"table": vectors}

    return encode


def table_export_job(
    embedder, items: Sequence[Mapping[str, Any]], *, without_thought: bool, batch_size: int,
    dtype: torch.dtype | None, world_size: int,
) -> ExportJob:  # fmt: skip
    """The job `export_table` runs with these settings in a group of `world_size` processes."""
    fingerprint = embedder_fingerprint(embedder, None if without_thought else embedder.thought_module)
    return ExportJob((("table", fingerprint),), catalogue_digest(items), dtype_name(dtype), batch_size, world_size)


def export_table(
    embedder,
    items: Sequence[dict],
    output: str | os.PathLike,
    *,
    source: str,
    without_thought: bool = False,
    batch_size: int = 64,
    pca: int | None = None,
    dtype: str = "auto",
    progress: bool = True,
) -> Path:
    """Encode `items` (dicts with `item_id` and `attributes`) and write the table to `output`.

    `without_thought=True` writes no thought token (the prompt ends with EOS): with a bare backbone, the
    no-fine-tuning baseline, with the same prompt and pooling. Inside a torch.distributed group every process must
    call it; they share the work (see the module doc)."""
    check_pca(pca, len(items), embedder.thought_module.hidden_size)
    compute_dtype = resolve_dtype(dtype, embedder.device)
    metadata = table_metadata(embedder, source, without_thought=without_thought, dtype=compute_dtype)
    job = table_export_job(embedder, items, without_thought=without_thought, batch_size=batch_size,
                           dtype=compute_dtype, world_size=process_group()[1])  # fmt: skip
    encode = table_encoder(embedder, without_thought=without_thought, batch_size=batch_size, dtype=compute_dtype)
    raw = encode_catalogue(embedder, items, encode, output=output, job=job, progress=progress)
    ids = [str(item["item_id"]) for item in items]
    return _write_tables({"table": (Path(output), metadata)}, raw, ids, pca)["table"]


def write_encoded_table(
    embedder,
    item_ids: Sequence[str],
    embeddings: torch.Tensor,
    output: str | os.PathLike,
    *,
    source: str,
    pca: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a table that was encoded elsewhere with `embedder` as it is now (e.g. the CRRL trainer's noise-free
    catalogue table at an evaluation), with the metadata `export_table` would give it."""
    check_pca(pca, len(item_ids), embeddings.shape[1])
    metadata = table_metadata(embedder, source, dtype=dtype)
    ids = [str(i) for i in item_ids]
    return _write_tables({"table": (Path(output), metadata)}, {"table": embeddings.detach().float().cpu()}, ids,
                         pca)["table"]


def export_thought_variants(
    embedder,
    items: Sequence[dict],
    outputs: dict[str, tuple[str | os.PathLike, torch.nn.Module, str]],
    *,
    batch_size: int = 64,
    pca: int | None = None,
    dtype: str = "auto",
    progress: bool = True,
) -> dict[str, Path]:
    """Several tables of one LLM under different thought modules ({name: (output path, thought module, source)}),
    e.g. LRCL and LRCL+CRRL: the prefix pass is shared, each thought module adds only its 2-token suffix."""
    check_pca(pca, len(items), embedder.thought_module.hidden_size)
    compute_dtype = resolve_dtype(dtype, embedder.device)
    thought_modules = {name: module for name, (_, module, _) in outputs.items()}
    metadata = {
        name: table_metadata(embedder, source, thought_module=module, dtype=compute_dtype)
        for name, (_, module, source) in outputs.items()
    }

    def encode(attributes: list, sort_by_length: bool, show: bool) -> dict[str, torch.Tensor]:
        # encode_with_thought_modules always sorts by length; a shard arrives sorted already, so its batches stay
        # the same
        return embedder.encode_with_thought_modules(attributes, thought_modules, batch_size=batch_size,
                                                    progress=show, dtype=compute_dtype)  # fmt: skip

    models = tuple((name, meta["fingerprint"]) for name, meta in metadata.items())
    job = ExportJob(models, catalogue_digest(items), dtype_name(compute_dtype), batch_size, process_group()[1])
    first_output = next(iter(outputs.values()))[0]
    raw = encode_catalogue(embedder, items, encode, output=first_output, job=job, progress=progress)
    ids = [str(item["item_id"]) for item in items]
    targets = {name: (Path(path), metadata[name]) for name, (path, _, _) in outputs.items()}
    return _write_tables(targets, raw, ids, pca)


# ---- new items into an existing table ----------------------------------------------------------------------------
def encode_new_items(
    checkpoint_or_embedder,
    items: Sequence[Mapping[str, Any]],
    table_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    batch_size: int = 64,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[Path, list[str]]:
    """Add to the table at `table_path` the `items` it lacks, encoded by the model that made it (a checkpoint
    folder or a ThoughtEmbedder, checked against the table's fingerprint and prompt format) and mapped through the
    table's stored PCA mean and projection; write the result atomically to `output_path` (which may be
    `table_path`). `dtype` defaults to the one the table was made with. Returns (output path, ids added)."""
    table = read_table(table_path)
    without_thought = not table.metadata.get("thought", True)
    new_ids = table.missing([str(item["item_id"]) for item in items])
    embedder = checkpoint_or_embedder
    if isinstance(checkpoint_or_embedder, (str, os.PathLike)):
        from reaemb_trl.prompt import ItemPromptFormatter

        folder = check_checkpoint(checkpoint_or_embedder)
        fingerprint = checkpoint_fingerprint(folder, without_thought=without_thought)
        check_same_model(table, fingerprint, ItemPromptFormatter.load(folder).to_dict(), str(folder))
        embedder = None
        if new_ids:  # the model is loaded only when there is something to encode
            from reaemb_trl.embedder import ThoughtEmbedder

            embedder = ThoughtEmbedder.from_pretrained(folder, device=device)
    else:
        fingerprint = embedder_fingerprint(embedder, None if without_thought else embedder.thought_module)
        check_same_model(table, fingerprint, embedder.formatter.to_dict(), "the given embedder")
    output_path = Path(output_path)
    if not new_ids:
        if output_path.resolve() != Path(table_path).resolve():
            table.write(output_path)
        return output_path, []
    by_id = {str(item["item_id"]): item for item in items}
    compute_dtype = resolve_dtype(dtype or table.metadata.get("dtype") or "auto", embedder.device)
    raw = embedder.encode(
        [by_id[i]["attributes"] for i in new_ids],
        batch_size=batch_size,
        method="no_thought" if without_thought else "fast",
        progress=progress,
        dtype=compute_dtype,
    )
    table.with_new_rows(new_ids, raw).write(output_path)
    return output_path, new_ids
