"""`reaemb encode`: add new items to an existing table with the model that made it and the table's stored PCA."""

from __future__ import annotations

from pathlib import Path

import typer

from reaemb_trl.cli.errors import expected_errors, fail


def encode_command(
    items: str = typer.Option(..., "--items", help="items.jsonl, a canonical dataset folder, or `ml-100k`."),
    table: Path = typer.Option(..., "--table", help="The table to extend (.safetensors, written by `reaemb export`)."),
    output: Path = typer.Option(..., "--output", help="Table to write; may be --table itself (written atomically)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="The checkpoint folder that made the table."),
    backbone: str = typer.Option(None, "--backbone", help="For a bare-backbone table: its backbone (pooling and prompt format come from the table)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Items per forward pass."),
    dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: the dtype the table was made with)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
) -> None:
    """Encode only the items TABLE lacks and append them (through TABLE's PCA, if it has one) into OUTPUT.

    The model must be the one that made the table: its fingerprint and prompt format are checked against the
    table's metadata before anything is encoded."""
    if (checkpoint is None) == (backbone is None):
        raise typer.BadParameter("give exactly one of --checkpoint (the model that made the table) or --backbone")
    try:
        from reaemb_trl.export import encode_new_items
        from reaemb_trl.export_inputs import check_batch_size, check_output, load_catalogue
        from reaemb_trl.item_table import read_table

        check_batch_size(batch_size)
        check_output(output)
        catalogue = load_catalogue(items)
        model = str(checkpoint) if checkpoint is not None else _backbone_embedder(backbone, read_table(table), device)
        path, added = encode_new_items(
            model, catalogue, table, output, batch_size=batch_size, dtype=dtype, device=device
        )
    except expected_errors() as exc:
        fail(exc)
    if added:
        typer.echo(f"added {len(added)} new items to {path} (e.g. {added[:3]})")
    else:
        typer.echo(f"{table} already holds all {len(catalogue)} items; {path} is unchanged")


def _backbone_embedder(backbone: str, table, device: str):
    """The bare backbone with the table's pooling and prompt format, refused before loading when its fingerprint
    cannot match the table's."""
    from reaemb_trl.export_inputs import ExportError, check_same_model, load_backbone
    from reaemb_trl.item_table import backbone_fingerprint
    from reaemb_trl.prompt import ItemPromptFormatter

    if table.metadata.get("thought") or table.metadata.get("adapter"):
        raise ExportError(
            f"{table.path} was made by a trained checkpoint ({table.metadata.get('source')}), not a bare backbone: "
            "pass that folder with --checkpoint"
        )
    pooling = table.metadata.get("pooling", "mean")
    prompt_format = table.metadata.get("prompt_format") or {}
    # A local folder is recorded by its absolute path (as ThoughtEmbedder.from_backbone does).
    name = str(Path(backbone).resolve()) if Path(backbone).is_dir() else backbone
    check_same_model(table, backbone_fingerprint(name, pooling, prompt_format), prompt_format, f"backbone {backbone!r}")
    formatter = ItemPromptFormatter.from_dict(prompt_format)
    return load_backbone(backbone, pooling, formatter).to(device)
