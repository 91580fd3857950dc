"""`reaemb quickstart`: the pipeline of reaemb_trl/quickstart.py on the packaged settings (or a `--settings` file),
with the command line's overrides; prints the evaluation table."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from reaemb_trl.cli.errors import fail


def quickstart_command(
    output: Path = typer.Option(None, "--output", help="Folder for every artifact (default: the settings file's, "
                                "runs/quickstart); re-running skips finished stages."),
    settings_file: Path = typer.Option(None, "--settings", help="A quickstart YAML (default: the packaged "
                                       "reaemb_trl/configs/quickstart.yaml)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (training, export and evaluation)."),
    seeds: int = typer.Option(None, "--seeds", help="Seeds of the downstream evaluation (default 3)."),
    hybrid: bool = typer.Option(None, "--hybrid/--no-hybrid", help="Also evaluate each LLM table as ids + "
                                "adapter(table) (default: the settings file's, on; 9 runs, ~9 min on 2 cores)."),
    ensemble: bool = typer.Option(None, "--ensemble/--no-ensemble", help="Also report id+<table>, the score "
                                  "ensemble of the id and frozen runs (default: the settings file's, on; no "
                                  "training)."),
    reference: bool = typer.Option(None, "--reference/--no-reference", help="Also evaluate the text reference "
                                   "table: the backbone's input embeddings of the item text through a co-occurrence "
                                   "linear map (seconds to build; 3 frozen runs; default: the settings file's, on)."),
    cold_items: float = typer.Option(None, "--cold-items", help="Share of the items treated as new (default: the "
                                     "settings file's, 0.1): no training stage sees their interactions, the tables "
                                     "get them as `reaemb encode` adds new items, and their users are a group."),
) -> None:
    """ReaEmb end to end: fetch defaults, LRCL, CRRL, export tables, evaluate SASRec with MostPop, ids and each
    table (frozen, hybrid, and the id+table score ensemble), with paired tests, on all users and on the users of
    cold items (new to every training stage); settings from the packaged quickstart.yaml."""
    import yaml

    from reaemb_trl.evaluation import render_markdown
    from reaemb_trl.quickstart import SETTINGS_FILE, QuickstartSettings, run_quickstart

    try:
        settings = QuickstartSettings.from_yaml(settings_file or SETTINGS_FILE, output=output, device=device,
                                                eval_seeds=seeds, hybrid=hybrid, ensemble=ensemble,
                                                reference=reference, cold_items=cold_items)
    except FileNotFoundError:
        fail(f"{settings_file} does not exist: pass a quickstart YAML to --settings, or leave it out")
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        fail(" ".join(str(exc).split()))
    results = run_quickstart(settings)
    print(render_markdown(results, groups=("all", "cold_item", "tail_item", "head_item")))
    summary = json.loads((settings.output / "summary.json").read_text())
    crrl = summary["stages"]["crrl"]
    if crrl.get("yardstick_start") and crrl.get("yardstick_end"):
        key = "anchor_normalized_centered_cosine"
        start, end = crrl["yardstick_start"].get(f"start_{key}"), crrl["yardstick_end"].get(f"end_{key}")
        print(f"CRRL on held-out items (frozen yardstick, {key}): {start:.4f} (LRCL) -> {end:.4f} (LRCL+CRRL)")
    print(f"\nall stages: {summary['total_seconds'] / 60:.1f} min; results in {settings.output / 'eval'} "
          "(results.json, results.md, ndcg10.png, test_ranks.npz)")
