"""`reaemb export`: write an item-embedding table from a checkpoint or a bare backbone.

`--cooccurrence-projection` (with `--backbone`) writes the text reference table instead (see
`reaemb_trl.cooccurrence_projection`): a linear map of the item text's input token embeddings, trained on the
training co-occurrence of `--data`.

`--num-processes N` launches N processes with accelerate that run this same command and share the items between
them; `accelerate launch [--multi_gpu] --num_processes N -m reaemb_trl.cli export ...` does the same directly.
Expected failures (a folder that is not a checkpoint, a dataset that is not one, ...) end in one `error:` line and
exit code 1.
"""

from __future__ import annotations

from pathlib import Path

import typer

from reaemb_trl.cli.errors import expected_errors, fail


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
    cooccurrence_projection: bool = typer.Option(False, "--cooccurrence-projection", help="With --backbone: the text reference table instead (the mean of the backbone's input token embeddings of each item's text, no transformer pass, through a linear map trained on --data's training co-occurrence; seconds on a CPU)."),
    projection_dim: int = typer.Option(64, "--projection-dim", help="Dimension of the --cooccurrence-projection table."),
    projection_steps: int = typer.Option(300, "--projection-steps", help="Training steps of the --cooccurrence-projection map."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --cooccurrence-projection map."),
    cold_items: float = typer.Option(0.0, "--cold-items", help="With --cooccurrence-projection: share of the catalogue drawn as cold items (as `reaemb evaluate --cold-items`), whose interactions the map never sees; they still get a row."),
    cold_item_seed: int = typer.Option(0, "--cold-item-seed", help="Seed of the cold-item draw."),
) -> None:
    """Encode every item once and write `embeddings` + item ids + metadata as safetensors."""
    if (checkpoint is None) == (backbone is None):
        raise typer.BadParameter("give exactly one of --checkpoint (a trained model) or --backbone (the baseline)")
    if not cooccurrence_projection and cold_items:
        fail("--cold-items applies to --cooccurrence-projection only (a plain export reads no interactions)")
    if cooccurrence_projection:
        export_reference(data, output, backbone, pca, num_processes, projection_dim, projection_steps, seed,
                         cold_items, cold_item_seed)
        return
    from reaemb_trl.embedder import POOLINGS

    if pooling not in POOLINGS:
        raise typer.BadParameter(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    try:
        from reaemb_trl.distributed import joined_process_group, launch_processes, launched_rank, launched_world_size
        from reaemb_trl.export_inputs import (
            check_batch_size,
            check_checkpoint,
            check_output,
            check_pca,
            embedding_width,
            load_catalogue,
        )

        check_batch_size(batch_size)
        check_output(output)
        if checkpoint is not None:
            check_checkpoint(checkpoint)
        items = load_catalogue(data)
        if pca is not None:
            check_pca(pca, len(items), embedding_width(checkpoint, backbone))
        if num_processes > 1 and launched_world_size() == 1:  # this is the launcher
            arguments = ["--data", data, "--output", str(output), "--batch-size", str(batch_size), "--dtype", dtype,
                         "--device", device, "--pooling", pooling]  # fmt: skip
            arguments += ["--checkpoint", str(checkpoint)] if checkpoint is not None else ["--backbone", backbone]
            arguments += ["--pca", str(pca)] if pca is not None else []
            code = launch_processes(num_processes, ["reaemb_trl.cli", "export", *arguments], device)
            if code != 0:  # the processes printed their own errors; this line says how to go on
                fail(f"the {num_processes} export processes stopped with exit code {code} (their output is above); "
                     "run the same command again to reuse the parts they finished")  # fmt: skip
            return
        with joined_process_group(device) as process_device:
            path = run_export(items, output, checkpoint, backbone, pooling, pca, batch_size, dtype, process_device)
    except expected_errors() as exc:
        fail(exc)
    if launched_rank() == 0:
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
    from reaemb_trl.export_inputs import load_backbone
    from reaemb_trl.prompt import ItemPromptFormatter

    if checkpoint is not None:
        embedder = ThoughtEmbedder.from_pretrained(checkpoint, device=device)
        source, without_thought = str(checkpoint), False
    else:  # the bare backbone: the same prompt and pooling, no thought token
        embedder = load_backbone(backbone, pooling, ItemPromptFormatter()).to(device)
        source, without_thought = backbone, True
    return export_table(embedder, items, output, source=source, without_thought=without_thought,
                        batch_size=batch_size, pca=pca, dtype=dtype)  # fmt: skip


def export_reference(data: str, output: Path, backbone: str | None, pca: int | None, num_processes: int, dim: int,
                     steps: int, seed: int, cold_items: float, cold_item_seed: int) -> None:
    """`--cooccurrence-projection`: the text reference table (reaemb_trl.cooccurrence_projection), one process."""
    if backbone is None:
        fail("--cooccurrence-projection reads a bare backbone's input embeddings: pass --backbone, not --checkpoint")
    if pca is not None or num_processes != 1:
        fail("--cooccurrence-projection takes neither --pca (choose --projection-dim) nor --num-processes (it runs "
             "in seconds in one process)")  # fmt: skip
    if dim < 1 or steps < 1:
        fail(f"--projection-dim and --projection-steps must be at least 1, got {dim} and {steps}")
    if not 0.0 <= cold_items < 1.0:
        fail(f"--cold-items is a share of the catalogue in [0, 1), got {cold_items}")
    try:
        from reaemb_trl.cooccurrence_projection import build_reference_table
        from reaemb_trl.data.cold import cold_item_ids
        from reaemb_trl.export_inputs import check_output, load_dataset

        check_output(output)
        dataset = load_dataset(data)
        cold = cold_item_ids(dataset.item_ids, cold_items, cold_item_seed)
        path = build_reference_table(backbone, dataset, cold, output, seed=seed, dim=dim, steps=steps)
    except expected_errors() as exc:
        fail(exc)
    typer.echo(f"wrote {len(dataset.items)} item embeddings (co-occurrence projection, {len(cold)} cold items "
               f"excluded from its training) to {path}")  # fmt: skip
