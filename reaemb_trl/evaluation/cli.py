"""`reaemb evaluate`: a thin layer over reaemb_trl.evaluation.compare_tables + write_report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def evaluate_command(
    data: Path = typer.Option(..., "--data", help="Canonical dataset folder."),
    model: str = typer.Option("sasrec", "--model", help="sasrec, gru4rec or bert4rec."),
    tables: List[str] = typer.Option(["id"], "--tables", help="'id' and/or .safetensors files. Several may "
                                     "follow one --tables (--tables id a.safetensors) or repeat the option."),
    more_tables: Optional[List[str]] = typer.Argument(None, help="Further tables listed after --tables.",
                                                      show_default=False),
    seeds: int = typer.Option(1, "--seeds", help="Number of seeds (0..N-1) per table."),
    output: Path = typer.Option(..., "--output", help="Folder for results.json, results.md, ndcg10.png."),
    protocol: str = typer.Option("full", "--protocol", help="full (whole catalogue) or sampled (100 negatives)."),
    max_epochs: int = typer.Option(200, "--max-epochs"),
    patience: int = typer.Option(20, "--patience", help="Epochs without validation NDCG@10 gain before stopping."),
    batch_size: int = typer.Option(1024, "--batch-size"),
    hidden: int = typer.Option(128, "--hidden"),
    max_len: int = typer.Option(200, "--max-len"),
    tail_user: int = typer.Option(10, "--tail-user", help="Tail user: history shorter than this."),
    tail_item: int = typer.Option(20, "--tail-item", help="Tail item: fewer distinct training users than this."),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Compare item tables on a downstream sequential recommender over several seeds."""
    from reaemb_trl.data.errors import DataFormatError
    from reaemb_trl.evaluation.report import render_markdown, write_report
    from reaemb_trl.evaluation.trainer import EvalConfig, compare_tables

    if model not in ("sasrec", "gru4rec", "bert4rec"):
        raise typer.BadParameter(f"unknown model {model!r}; choose sasrec, gru4rec or bert4rec")
    if protocol not in ("full", "sampled"):
        raise typer.BadParameter("--protocol must be full or sampled")
    specs = [t for t in list(tables) + list(more_tables or []) for t in t.split(",") if t]
    for spec in specs:
        if spec != "id" and not Path(spec).is_file():
            raise typer.BadParameter(f"table {spec!r} is neither 'id' nor an existing .safetensors file")
    config = EvalConfig(model=model, protocol=protocol, max_epochs=max_epochs, patience=patience,
                        batch_size=batch_size, hidden=hidden, max_len=max_len, tail_user_threshold=tail_user,
                        tail_item_threshold=tail_item, device=device)
    try:
        results = compare_tables(data, specs, seeds, config)
    except (DataFormatError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    paths = write_report(results, output)
    typer.echo(render_markdown(results))
    typer.echo(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
