"""What `reaemb export` and `reaemb encode` are given, loaded and checked before any encoding: the catalogue, the
checkpoint folder or bare backbone, the output path, `--pca`, and (for encode) that the model is the one that made
the table. Every problem is an `ExportError` whose message says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence


class ExportError(ValueError):
    """An export or encode cannot run as asked (bad checkpoint, mismatched model, ...); the message says what to do."""


def dataset_path(data: str) -> Path:
    """The path of a canonical dataset folder (or its items.jsonl), or of `ml-100k`; ExportError saying what to run."""
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.data.canonical import ITEMS_FILE

    try:
        path = resolve_dataset(data)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from None
    if path.is_dir() and not (path / ITEMS_FILE).is_file():
        raise ExportError(
            f"{path} is not a canonical dataset folder (no {ITEMS_FILE}): convert your data with "
            "`reaemb data convert --format ... --input ... --output DIR` and pass DIR"
        )
    return path


def load_catalogue(data: str) -> list[dict]:
    """Items of a canonical dataset folder, its items.jsonl, or `ml-100k`; ExportError saying what to run."""
    from reaemb_trl.data.canonical import read_items

    return read_items(dataset_path(data))


def load_dataset(data: str):
    """Items and interactions (a `RecDataset`) of a canonical dataset folder or `ml-100k`; ExportError saying what
    to pass when there are no interactions."""
    from reaemb_trl.data.canonical import INTERACTIONS_FILE, RecDataset

    path = dataset_path(data)
    folder = path if path.is_dir() else path.parent  # given its items.jsonl
    if not (folder / INTERACTIONS_FILE).is_file():
        raise ExportError(
            f"{folder} has no {INTERACTIONS_FILE}: the co-occurrence projection trains on interactions; pass the "
            "canonical folder that `reaemb data convert` wrote (items.jsonl and interactions.csv)"
        )
    return RecDataset.load(folder)


def check_output(output: Path) -> None:
    """Fail before any encoding when the table cannot be written there."""
    if output.is_dir():
        raise ExportError(f"{output} is a folder: --output takes the path of a .safetensors file to write")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ExportError(f"--batch-size must be at least 1 (items per forward pass), got {batch_size}")


def check_pca(pca: int | None, num_items: int, dimension: int) -> None:
    """Fail before encoding (and before launching processes), not after."""
    if pca is not None and not 0 < pca <= min(num_items, dimension):
        raise ExportError(
            f"--pca {pca} must be between 1 and min(number of items, embedding size) = {min(num_items, dimension)}"
        )


def check_checkpoint(folder: str | os.PathLike) -> Path:
    """`folder` as a Path when it is a complete reaemb-trl checkpoint; ExportError saying what to do otherwise."""
    from reaemb_trl.checkpointing import CONFIG_FILE, THOUGHT_FILE, CheckpointError, read_config

    folder = Path(folder)
    train = "train one with `accelerate launch recipes/lrcl.py --config recipes/configs/lrcl_tiny.yaml`"
    if not folder.exists():
        raise ExportError(f"{folder} does not exist: pass a checkpoint folder ({train}) or --backbone")
    if not (folder / CONFIG_FILE).is_file():
        raise ExportError(f"{folder} is not a reaemb-trl checkpoint (no {CONFIG_FILE}): {train} or pass --backbone")
    try:
        read_config(folder)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    if not (folder / THOUGHT_FILE).is_file():
        raise ExportError(f"{folder} is an incomplete checkpoint (no {THOUGHT_FILE}): save or train it again")
    return folder


def load_backbone(backbone: str, pooling: str, formatter=None):
    """A bare-backbone embedder; ExportError when the backbone cannot be loaded."""
    from reaemb_trl.embedder import ThoughtEmbedder

    try:
        return ThoughtEmbedder.from_backbone(backbone, pooling=pooling, formatter=formatter)
    except OSError as exc:
        raise _backbone_error(backbone, exc) from None


def embedding_width(checkpoint: Path | None, backbone: str | None) -> int:
    """The model's hidden size from its config files alone (no weights), to check --pca before any work."""
    from reaemb_trl.checkpointing import read_config

    if checkpoint is not None:
        return int(read_config(checkpoint)["hidden_size"])
    from transformers import AutoConfig

    from reaemb_trl.assets import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(backbone)).get_text_config().hidden_size
    except OSError as exc:
        raise _backbone_error(backbone, exc) from None


def _backbone_error(backbone: str, exc: OSError) -> ExportError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ExportError(f"cannot load backbone {backbone!r} ({first_line}): pass `smollm2`, a hub id or a model folder")


def check_same_model(table, fingerprint: str, prompt_format: Mapping[str, Any], model: str) -> None:
    """Refuse to add rows to `table` (an ItemTable) from a model other than the one that made it."""
    recorded = table.metadata.get("fingerprint")
    if not recorded:
        raise ExportError(
            f"{table.path} records no model fingerprint (written by an older reaemb-trl), so new rows cannot be "
            "checked against it: re-export the whole catalogue with `reaemb export`"
        )
    table_format = table.metadata.get("prompt_format") or {}
    differing = sorted(k for k in set(table_format) | set(prompt_format) if table_format.get(k) != prompt_format.get(k))
    if differing:
        raise ExportError(
            f"{table.path} was made with prompt format {{{_fields(table_format, differing)}}} but {model} uses "
            f"{{{_fields(prompt_format, differing)}}}: encode with the model and prompt format that made the table, "
            "or re-export the whole catalogue with `reaemb export`"
        )
    if recorded != fingerprint:
        made_by = table.metadata.get("source") or "another model"
        raise ExportError(
            f"{table.path} was made by {made_by} (fingerprint {recorded}) but {model} has fingerprint {fingerprint}: "
            "its vectors would not match the table's rows. Encode with the checkpoint that made the table, or "
            "re-export the whole catalogue with `reaemb export`"
        )


def _fields(values: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}: {values.get(k)!r}" for k in keys)
