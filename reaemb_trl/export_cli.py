"""`reaemb export`: write an item-embedding table from a checkpoint or a bare backbone."""

from __future__ import annotations

from pathlib import Path

import typer


def export_command(
    data: str = typer.Option(..., "--data", help="Canonical dataset folder, or `ml-100k`."),
    output: Path = typer.Option(..., "--output", help="Table to write (.safetensors)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="An LRCL or CRRL checkpoint folder."),
    backbone: str = typer.Option(None, "--backbone", help="A bare backbone (`smollm2`, hub id, folder): the no-fine-tuning baseline."),
    pooling: str = typer.Option("mean", "--pooling", help="Pooling for --backbone (`mean` or `last`); checkpoints keep theirs."),
    pca: int = typer.Option(None, "--pca", help="Reduce to K dimensions with PCA (the projection is stored)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Items per forward pass (items are batched by length)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 where fast), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
) -> None:
    """Encode every item once and write `embeddings` + item ids + metadata as safetensors."""
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.data.canonical import read_items
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.export import export_table
    from reaemb_trl.prompt import ItemPromptFormatter

    if (checkpoint is None) == (backbone is None):
        raise typer.BadParameter("give exactly one of --checkpoint (a trained model) or --backbone (the baseline)")
    items = read_items(resolve_dataset(data))
    if checkpoint is not None:
        embedder = ThoughtEmbedder.from_pretrained(checkpoint, device=device)
        source, use_thought = str(checkpoint), True
    else:
        embedder = ThoughtEmbedder.from_backbone(backbone, pooling=pooling, formatter=ItemPromptFormatter()).to(device)
        source, use_thought = backbone, False
    path = export_table(
        embedder, items, output, source=source, use_thought=use_thought, batch_size=batch_size, pca=pca, dtype=dtype
    )
    typer.echo(f"wrote {len(items)} item embeddings to {path}")
