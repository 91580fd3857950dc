"""What the experiment scripts share: one dataset read once, LRCL/CRRL runs through the quickstart's stage functions,
tables, the frozen CRRL yardstick and the downstream validation score. Run by hand, never in CI."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from reaemb_trl.data import RecDataset
from reaemb_trl.quickstart import SETTINGS_FILE, QuickstartSettings, fetch_data, train_crrl, train_lrcl

HELD_OUT_FRACTION = 0.2  # the same held-out items as CRRL's eval_item_fraction in the quickstart


def base_settings(output: Path, seed: int = 42) -> QuickstartSettings:
    """The quickstart's settings (reaemb_trl/configs/quickstart.yaml) with another output folder and seed, and no
    cold items: the ablations in docs/ablations.md were measured with every item warm (their `downstream()` trains
    on every item's interactions), so the LLM stages must see them all too."""
    return replace(QuickstartSettings.from_yaml(SETTINGS_FILE), output=Path(output), seed=seed, cold_items=0.0)


def load_data(settings: QuickstartSettings) -> RecDataset:
    if not (settings.output / "data" / "items.jsonl").exists():
        settings.output.mkdir(parents=True, exist_ok=True)
        fetch_data(settings)
    return RecDataset.load(settings.output / "data")


def timed(fn, *args) -> tuple[object, float]:
    start = time.time()
    out = fn(*args)
    return out, round(time.time() - start, 1)


def run_lrcl(settings: QuickstartSettings, data: RecDataset) -> dict:
    """Train LRCL unless its checkpoint exists; returns the stage info (steps, losses, seconds)."""
    marker = settings.output / "lrcl.json"
    if marker.exists():
        return json.loads(marker.read_text())
    info, seconds = timed(train_lrcl, settings, data)
    info["seconds"] = seconds
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_crrl(settings: QuickstartSettings, data: RecDataset) -> dict:
    marker = settings.output / "crrl.json"
    if marker.exists():
        return json.loads(marker.read_text())
    info, seconds = timed(train_crrl, settings, data)
    info["seconds"] = seconds
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return info


def table_of(checkpoint: Path, data: RecDataset, path: Path, settings: QuickstartSettings,
             without_thought: bool = False, backbone: str | None = None) -> Path:
    """Export the table of a checkpoint (or of the bare backbone with the checkpoint's prompt and pooling,
    `without_thought=True`) unless it exists."""
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.export import export_table

    if path.exists():
        return path
    if not without_thought:
        embedder = ThoughtEmbedder.from_pretrained(checkpoint, device=settings.device)
        source = str(checkpoint)
    else:
        like = ThoughtEmbedder.from_pretrained(checkpoint, device=settings.device)
        embedder = ThoughtEmbedder.from_backbone(backbone or settings.backbone, formatter=like.formatter,
                                                 pooling=like.pooling).to(settings.device)
        source = backbone or settings.backbone
    export_table(embedder, data.items, path, source=source, without_thought=without_thought,
                 batch_size=settings.export_batch, progress=False)
    return path


def yardstick_for(data: RecDataset):
    from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items

    ids = data.item_ids
    return CRRLYardstick(data.sequences, ids, held_out_items(ids, HELD_OUT_FRACTION))


def yardstick_scores(table_path: Path, yardstick) -> dict:
    from reaemb_trl.item_table import read_table

    table = read_table(table_path)
    return yardstick.score(table.embeddings, table.item_ids)


def downstream(table_paths: dict[str, Path], data: RecDataset, settings: QuickstartSettings, seeds=1,
               modes=("frozen",), compare=(), baseline_pairs: bool = True, workers: int = 2) -> dict:
    """compare_tables over MostPop, ids and the given tables with the quickstart's evaluation settings."""
    from reaemb_trl.evaluation import EvalConfig, TableSpec, compare_tables

    specs = [TableSpec("mostpop", "mostpop"), TableSpec("id", "id")]
    for mode in modes:
        suffix = "" if mode == "frozen" else f"@{mode}"
        specs += [TableSpec(name + suffix, str(path), mode) for name, path in table_paths.items()]
    config = EvalConfig(**{"device": settings.device, **settings.evaluation})
    return compare_tables(data, specs, seeds, config, progress=False, compare=list(compare),
                          baseline_pairs=baseline_pairs, workers=workers)


def validation_score(results: dict, name: str) -> tuple[float, float]:
    """Mean and sample std over seeds of a table's best validation NDCG@10 (what ablations choose by)."""
    import statistics

    values = [v for v in results["tables"][name]["valid_ndcg10"] if v is not None]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(mean, std=None, digits=4) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


__all__ = ["HELD_OUT_FRACTION", "base_settings", "downstream", "fmt", "load_data", "run_crrl", "run_lrcl",
           "table_of", "validation_score", "write_json", "yardstick_for", "yardstick_scores"]
