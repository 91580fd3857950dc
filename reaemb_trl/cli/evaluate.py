"""`reaemb evaluate`: a thin layer over reaemb_trl.evaluation.compare_tables + write_report.

Finished runs are kept in OUTPUT/runs as they end; rerunning the same command resumes from them."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from reaemb_trl.cli.errors import fail


def evaluate_command(
    data: Path = typer.Option(..., "--data", help="Canonical dataset folder (items.jsonl + interactions.csv)."),
    model: str = typer.Option("sasrec", "--model", help="sasrec, gru4rec or bert4rec."),
    tables: List[str] = typer.Option(["mostpop", "id"], "--tables", help="'mostpop', 'id' and/or .safetensors "
                                     "files. Several may follow one --tables (--tables id a.safetensors) or repeat "
                                     "the option."),
    more_tables: Optional[List[str]] = typer.Argument(None, help="Further tables listed after --tables.",
                                                      show_default=False),
    seeds: int = typer.Option(1, "--seeds", help="Number of seeds (0..N-1) per table."),
    output: Path = typer.Option(..., "--output", help="Folder for results.json, results.md, ndcg10.png, "
                                "test_ranks.npz and runs/ (each finished run; the same command resumes from it)."),
    loss: str = typer.Option("ce", "--loss", help="ce (softmax over the catalogue; sampled softmax past "
                             "--sampled-softmax-above items) or bce (the papers': one sampled negative)."),
    history: str = typer.Option("auto", "--history", help="exclude / keep the user's earlier items as candidates "
                                "(training and ranking alike); auto = exclude unless some sequence repeats items."),
    table_mode: List[str] = typer.Option(["frozen"], "--table-mode", help="For table files: frozen (+ adapter, the "
                                         "paper's), init (trainable IDs from the table's PCA), hybrid (IDs + "
                                         "adapter). Repeat to run each file in several modes."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Also report id+<table> for every table file: the score "
                                  "ensemble of the id model and the file's frozen model of the same seed (z-scored "
                                  "scores, the table's weight chosen on validation from 0, 0.1, ..., 1); needs id "
                                  "and --table-mode frozen."),
    cold_items: float = typer.Option(0.0, "--cold-items", help="Share of the catalogue held out of training as "
                                     "cold items (e.g. 0.1): their interactions leave every training signal and "
                                     "users whose target is one form the 'cold items' group. 0 = none."),
    cold_item_seed: int = typer.Option(0, "--cold-item-seed", help="Seed of the cold-item draw."),
    id_dropout: float = typer.Option(0.0, "--id-dropout", help="Hybrid tables: while training, leave out each "
                                     "item's ID row with this probability so items are also placed from their "
                                     "table row alone (what an item without an ID row needs); cold items then get "
                                     "a zero ID row. 0 = the plain hybrid."),
    normalization: str = typer.Option("center_scale", "--normalization", help="What the adapter reads: "
                                      "center_scale, whiten or none."),
    compare: Optional[List[str]] = typer.Option(None, "--compare", help="Extra paired test A:B (table names, e.g. "
                                                "crrl:lrcl); every table is always tested against id, LLM tables "
                                                "against raw."),
    protocol: str = typer.Option("full", "--protocol", help="full (whole catalogue) or sampled (100 negatives)."),
    max_epochs: int = typer.Option(200, "--max-epochs"),
    patience: int = typer.Option(20, "--patience", help="Validations without NDCG@10 gain before stopping."),
    eval_every: int = typer.Option(1, "--eval-every", help="Validate every this many epochs."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Training windows per update."),
    hidden: int = typer.Option(128, "--hidden"),
    max_len: int = typer.Option(200, "--max-len"),
    lr: float = typer.Option(1e-3, "--lr"),
    sampled_softmax_above: int = typer.Option(100_000, "--sampled-softmax-above", help="Catalogues larger than "
                                              "this train with a sampled softmax (logQ-corrected)."),
    num_sampled: int = typer.Option(8192, "--num-sampled", help="Negatives per batch of the sampled softmax."),
    tail_user: int = typer.Option(10, "--tail-user", help="Tail user: history shorter than this."),
    tail_item: int = typer.Option(20, "--tail-item", help="Tail item: fewer distinct training users than this."),
    device: str = typer.Option("cpu", "--device"),
    workers: int = typer.Option(1, "--workers", help="(table, seed) runs at once in worker processes that share the "
                                "CPU threads (on 2 cores, 2 workers are ~1.7x faster)."),
) -> None:
    """Compare item tables on a downstream sequential recommender over several seeds, with paired tests."""
    from reaemb_trl.data.errors import DataFormatError
    from reaemb_trl.evaluation.compare import compare_tables
    from reaemb_trl.evaluation.config import FIXED_TABLES, EvalConfig
    from reaemb_trl.evaluation.report import render_markdown, write_report

    if seeds < 1:
        fail(f"--seeds must be >= 1 (the number of seeds per table), got {seeds}")
    specs = [t for t in list(tables) + list(more_tables or []) for t in t.split(",") if t]
    for spec in specs:
        if spec not in FIXED_TABLES and not Path(spec).is_file():
            fail(f"table {spec!r} is neither 'id', 'mostpop' nor an existing .safetensors file; write one with "
                  "`reaemb export --data DIR --output FILE --checkpoint CKPT`")
    files = [spec for spec in specs if spec not in FIXED_TABLES]
    if ensemble and not ("id" in specs and files and "frozen" in table_mode):
        fail("--ensemble combines the id model with each table file's frozen model: list id and at least one "
             ".safetensors file in --tables, with --table-mode frozen")
    if not (data / "items.jsonl").is_file() or not (data / "interactions.csv").is_file():
        fail(f"{data} is not a canonical dataset folder (items.jsonl + interactions.csv); make one with "
              "`reaemb data convert --format FORMAT --input RAW --output DIR`")
    try:
        config = EvalConfig(model=model, loss=loss, history=history, normalization=normalization, protocol=protocol,
                            max_epochs=max_epochs, patience=patience, eval_every=eval_every, batch_size=batch_size,
                            hidden=hidden, max_len=max_len, lr=lr, sampled_softmax_above=sampled_softmax_above,
                            num_sampled=num_sampled, tail_user_threshold=tail_user, tail_item_threshold=tail_item,
                            device=device, cold_items=cold_items, cold_item_seed=cold_item_seed,
                            id_dropout=id_dropout)
        modes = list(table_mode) + (["ensemble"] if ensemble else [])
        results = compare_tables(data, specs, seeds, config, compare=list(compare or []), modes=modes,
                                 workers=workers, runs_dir=output / "runs")
        paths = write_report(results, output)
    except (DataFormatError, ValueError, FloatingPointError) as exc:
        fail(str(exc))
    except OSError as exc:  # no room or no permission for the output
        fail(f"{exc.filename or output}: {exc.strerror or exc}")
    typer.echo(render_markdown(results))
    typer.echo(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}, {paths['ranks']}")
