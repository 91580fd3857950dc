"""`reaemb data convert|stats`: a thin layer over reaemb_trl.data."""

from __future__ import annotations

from pathlib import Path

import typer

from reaemb_trl.cli.errors import fail

data_app = typer.Typer(help="Convert public datasets into the canonical folder and show statistics.",
                       no_args_is_help=True, pretty_exceptions_enable=False)

FORMATS = ["handled", "lcrec", "recbole", "movielens", "amazon2014", "amazon2018", "amazon2023", "yelp"]


@data_app.command("convert")
def convert_command(
    format: str = typer.Option(..., "--format", help=f"Input format: {', '.join(FORMATS)}."),
    input: Path = typer.Option(..., "--input", help="Input folder (or file, for recbole/lcrec)."),
    output: Path = typer.Option(..., "--output", help="Canonical dataset folder to write (atomically)."),
    kcore: int = typer.Option(0, "--kcore", help="Iterative k-core on users and items (0: none)."),
    remap_ids: bool = typer.Option(False, "--remap-ids", help="Rename items and users to consecutive strings."),
    lenient: bool = typer.Option(False, "--lenient", help="Drop interactions with unknown or text-less items."),
    tail_user: int = typer.Option(10, help="Tail-user threshold (history length below it)."),
    tail_item: int = typer.Option(20, help="Tail-item threshold (distinct users below it)."),
) -> None:
    """Convert FORMAT at INPUT into the canonical folder OUTPUT and print its statistics."""
    from reaemb_trl.data.canonical import render_stats_table
    from reaemb_trl.data.errors import DataFormatError
    from reaemb_trl.data.readers import convert

    if format not in FORMATS:
        fail(f"unknown --format {format!r}: choose one of {', '.join(FORMATS)}", code=2)
    if not input.exists():
        fail(f"{input} does not exist: pass the folder (or file) holding the raw {format} data as --input")
    try:
        dataset = convert(format, input, output, kcore=kcore, remap_ids=remap_ids, strict=not lenient, progress=True)
    except (DataFormatError, FileExistsError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:  # unreadable input, no room or no permission for the output
        fail(f"{exc.filename or output}: {exc.strerror or exc}")
    typer.echo(render_stats_table(dataset.stats(tail_user, tail_item), title=f"{output} (from {format})"))


@data_app.command("stats")
def stats_command(
    folder: Path = typer.Argument(..., help="Canonical dataset folder."),
    tail_user: int = typer.Option(10, help="Tail-user threshold (history length below it)."),
    tail_item: int = typer.Option(20, help="Tail-item threshold (distinct users below it)."),
) -> None:
    """Print the statistics table of a canonical dataset folder."""
    from reaemb_trl.data.canonical import INTERACTIONS_FILE, ITEMS_FILE, RecDataset, render_stats_table
    from reaemb_trl.data.errors import DataFormatError

    convert_hint = "make one with `reaemb data convert --format FORMAT --input RAW --output DIR`"
    if not folder.exists():
        fail(f"{folder} does not exist: pass a canonical dataset folder ({convert_hint})")
    missing = [name for name in (ITEMS_FILE, INTERACTIONS_FILE) if not (folder / name).is_file()]
    if missing:
        fail(f"{folder} is not a canonical dataset folder (no {' or '.join(missing)}): {convert_hint}")
    try:
        dataset = RecDataset.load(folder)
    except DataFormatError as exc:
        fail(str(exc))
    typer.echo(render_stats_table(dataset.stats(tail_user, tail_item), title=str(folder)))
