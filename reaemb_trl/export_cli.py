"""`reaemb export`: write an item-embedding table from a checkpoint or a bare backbone.

`--num-processes N` launches N processes with accelerate and shares the items between them; the same module runs
under `accelerate launch [--multi_gpu] --num_processes N -m reaemb_trl.export_cli ...` directly. Expected failures
(a folder that is not a checkpoint, a dataset that is not one, ...) end in one `error:` line and exit code 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import typer

# Waiting processes sit at a barrier while the slowest one encodes its share, which can take hours on big catalogues.
BARRIER_TIMEOUT = timedelta(hours=6)


def expected_errors() -> tuple[type[Exception], ...]:
    """The errors a user can fix from their message alone (no traceback needed)."""
    from reaemb_trl.assets import AssetFetchError
    from reaemb_trl.data.errors import DataFormatError
    from reaemb_trl.export import ExportError
    from reaemb_trl.item_table import TableError

    return ExportError, TableError, DataFormatError, AssetFetchError


def fail(message: object) -> None:
    """One `error:` line on stderr (from process 0 only when several run the same command), exit code 1."""
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def load_catalogue(data: str) -> list[dict]:
    """Items of a canonical dataset folder, its items.jsonl, or `ml-100k`; ExportError saying what to run."""
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.data.canonical import ITEMS_FILE, read_items
    from reaemb_trl.export import ExportError

    try:
        path = resolve_dataset(data)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from None
    if path.is_dir() and not (path / ITEMS_FILE).is_file():
        raise ExportError(
            f"{path} is not a canonical dataset folder (no {ITEMS_FILE}): convert your data with "
            "`reaemb data convert --format ... --input ... --output DIR` and pass DIR"
        )
    return read_items(path)


def check_output(output: Path) -> None:
    """Fail before any encoding when the table cannot be written there."""
    from reaemb_trl.export import ExportError

    if output.is_dir():
        raise ExportError(f"{output} is a folder: --output takes the path of a .safetensors file to write")


def load_backbone(backbone: str, pooling: str, formatter=None):
    """A bare-backbone embedder; ExportError when the backbone cannot be loaded."""
    from reaemb_trl.embedder import ThoughtEmbedder

    try:
        return ThoughtEmbedder.from_backbone(backbone, pooling=pooling, formatter=formatter)
    except OSError as exc:
        raise _backbone_error(backbone, exc) from None


def embedding_width(checkpoint: Path | None, backbone: str | None) -> int:
    """The model's hidden size from its config files alone (no weights), to check --pca before any work."""
    import json

    from reaemb_trl.embedder import CONFIG_FILE

    if checkpoint is not None:
        return int(json.loads((checkpoint / CONFIG_FILE).read_text())["hidden_size"])
    from transformers import AutoConfig

    from reaemb_trl.assets import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(backbone)).get_text_config().hidden_size
    except OSError as exc:
        raise _backbone_error(backbone, exc) from None


def _backbone_error(backbone: str, exc: OSError) -> Exception:
    from reaemb_trl.export import ExportError

    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ExportError(f"cannot load backbone {backbone!r} ({first_line}): pass `smollm2`, a hub id or a model folder")


@contextmanager
def process_group_for(device: str) -> Iterator[str]:
    """Join the torch.distributed group when launched as one of several processes; yields this process's device."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or dist.is_initialized():
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


def launch_processes(num_processes: int, arguments: list[str], device: str) -> int:
    """Run this module under `accelerate launch` with `num_processes` processes; returns their exit code.

    `--multi_gpu` on CPU too: accelerate's `--cpu` would silently run a single process."""
    env = dict(os.environ)
    if not device.startswith("cuda") and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_processes))  # the cores, shared out
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", "-m", "reaemb_trl.export_cli", *arguments]  # fmt: skip
    return subprocess.run(command, env=env).returncode


def export_command(
    data: str = typer.Option(..., "--data", help="Canonical dataset folder, or `ml-100k`."),
    output: Path = typer.Option(..., "--output", help="Table to write (.safetensors)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="An LRCL or CRRL checkpoint folder."),
    backbone: str = typer.Option(None, "--backbone", help="A bare backbone (`smollm2`, hub id, folder): the no-fine-tuning baseline."),
    pooling: str = typer.Option("mean", "--pooling", help="Pooling for --backbone (`mean`, `last` or `item_mean`); checkpoints keep theirs."),
    pca: int = typer.Option(None, "--pca", help="Reduce to K dimensions with PCA (the projection is stored)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Items per forward pass (items are batched by length)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 where fast), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ... (with several processes: cpu or cuda)."),
    num_processes: int = typer.Option(1, "--num-processes", help="Processes sharing the items (launched with accelerate); a rerun reuses finished parts."),
) -> None:
    """Encode every item once and write `embeddings` + item ids + metadata as safetensors."""
    if (checkpoint is None) == (backbone is None):
        raise typer.BadParameter("give exactly one of --checkpoint (a trained model) or --backbone (the baseline)")
    from reaemb_trl.embedder import POOLINGS

    if pooling not in POOLINGS:
        raise typer.BadParameter(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    try:
        from reaemb_trl.export import check_checkpoint, check_pca

        check_output(output)
        if checkpoint is not None:
            check_checkpoint(checkpoint)
        items = load_catalogue(data)
        if pca is not None:
            check_pca(pca, len(items), embedding_width(checkpoint, backbone))
        if num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # this is the launcher
            arguments = ["--data", data, "--output", str(output), "--batch-size", str(batch_size), "--dtype", dtype,
                         "--device", device, "--pooling", pooling]  # fmt: skip
            arguments += ["--checkpoint", str(checkpoint)] if checkpoint is not None else ["--backbone", backbone]
            arguments += ["--pca", str(pca)] if pca is not None else []
            code = launch_processes(num_processes, arguments, device)
            if code != 0:  # the processes printed their own errors; this line says how to go on
                fail(f"the {num_processes} export processes stopped with exit code {code} (their output is above); "
                     "run the same command again to reuse the parts they finished")  # fmt: skip
            return
        with process_group_for(device) as process_device:
            path = run_export(items, output, checkpoint, backbone, pooling, pca, batch_size, dtype, process_device)
    except expected_errors() as exc:
        fail(exc)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"wrote {len(items)} item embeddings to {path}")


def run_export(
    items: list[dict],
    output: Path,
    checkpoint: Path | None,
    backbone: str | None,
    pooling: str,
    pca: int | None,
    batch_size: int,
    dtype: str,
    device: str,
) -> Path:
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.export import export_table
    from reaemb_trl.prompt import ItemPromptFormatter

    if checkpoint is not None:
        embedder = ThoughtEmbedder.from_pretrained(checkpoint, device=device)
        source, without_thought = str(checkpoint), False
    else:  # the bare backbone: the same prompt and pooling, no thought token
        embedder = load_backbone(backbone, pooling, ItemPromptFormatter()).to(device)
        source, without_thought = backbone, True
    return export_table(embedder, items, output, source=source, without_thought=without_thought,
                        batch_size=batch_size, pca=pca, dtype=dtype)  # fmt: skip


def main() -> None:
    """`python -m reaemb_trl.export_cli ...` (what each launched process runs): the `reaemb export` options."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.command()(export_command)
    app()


if __name__ == "__main__":
    main()
