"""`reaemb quickstart`: ReaEmb end to end on the embedded defaults, and whether it helped.

Stages, each a function of (settings, data) and each skipped when its marker in OUTPUT/.stages exists, so a re-run
continues where it stopped (an interrupted training stage resumes from its last checkpoint):

    fetch_data -> train_lrcl -> train_crrl -> export_tables (raw backbone, LRCL, LRCL+CRRL) -> evaluate_tables

The settings live in recipes/configs/quickstart.yaml (its comments say how they differ from the paper and why);
`QuickstartSettings.from_yaml` reads it and the CLI's flags override it. The experiment scripts (experiments/) call
the same stage functions with other settings.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import typer
import yaml

TABLES = ("raw", "lrcl", "crrl")
SETTINGS_FILE = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "quickstart.yaml"
STAGES = ("data", "lrcl", "crrl", "export", "evaluate")


@dataclass
class QuickstartSettings:
    """What the quickstart runs. `lrcl` / `crrl` / `evaluation` hold fields of LRCLConfig / CRRLConfig / EvalConfig
    that differ from those classes' defaults (which are the paper's)."""

    output: Path
    backbone: str = "smollm2"
    dataset: str = "ml-100k"
    device: str = "cpu"
    seed: int = 42
    bf16: bool | None = None  # None: where the hardware runs it fast
    lrcl: dict[str, Any] = field(default_factory=dict)
    crrl: dict[str, Any] = field(default_factory=dict)
    export_batch: int = 32
    export_pca: int | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    eval_seeds: int = 3
    eval_workers: int = 2  # downstream runs at once (worker processes sharing the CPU threads)
    hybrid: bool = False  # also evaluate every LLM table as ids + adapter(table)

    @classmethod
    def from_yaml(cls, path: str | Path = SETTINGS_FILE, **overrides) -> "QuickstartSettings":
        """Settings from a YAML file (every key a field of this class), then `overrides` (None values ignored)."""
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown quickstart settings {unknown}; known: {sorted(known)}")
        from reaemb_trl.model_args import check_renamed_keys

        for section in ("lrcl", "crrl"):
            check_renamed_keys(data.get(section) or {}, f"{path}: {section}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        data["output"] = Path(data.get("output", "runs/quickstart"))
        return cls(**data)

    @property
    def use_bf16(self) -> bool:
        import torch

        from reaemb_trl.provenance import fast_bf16_available

        return fast_bf16_available(torch.device(self.device)) if self.bf16 is None else self.bf16


def _log(message: str) -> None:
    print(f"[quickstart] {message}", file=sys.stderr, flush=True)


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _training_args(settings: QuickstartSettings, folder: Path) -> dict:
    """What both trainers get from the quickstart: output, seed, precision, device, logging."""
    return dict(output_dir=str(folder), seed=settings.seed, bf16=settings.use_bf16, use_cpu=settings.device == "cpu",
                report_to="tensorboard", save_total_limit=1, disable_tqdm=False)


# ---- the stages -----------------------------------------------------------------------------------------------------
def fetch_data(settings: QuickstartSettings) -> dict:
    """Fetch the backbone and the dataset (once; cached) and copy the canonical dataset into OUTPUT/data."""
    from reaemb_trl.assets import resolve_dataset, resolve_model_path
    from reaemb_trl.data.canonical import print_stats

    out = settings.output
    resolve_model_path(settings.backbone)  # fetch the embedded backbone now, not in the middle of training
    source = resolve_dataset(settings.dataset)
    staging = out / ".data.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(out / "data", ignore_errors=True)
    staging.rename(out / "data")
    return {"source": str(source), "stats": asdict(print_stats(out / "data"))}


def train_lrcl(settings: QuickstartSettings, data) -> dict:
    """LRCL over the whole catalogue; `lrcl.num_train_epochs` = views of each item."""
    from reaemb_trl.builders import DataArguments, build_lrcl_trainer
    from reaemb_trl.lrcl_config import LRCLConfig

    folder = settings.output / "lrcl"
    args = LRCLConfig(**{"model_name_or_path": settings.backbone, **_training_args(settings, folder),
                         "save_strategy": "steps", "save_steps": 50, **settings.lrcl})
    trainer = build_lrcl_trainer(DataArguments(dataset=str(data.folder)), args, data)
    trainer.train(resume_from_checkpoint=_last_checkpoint(folder))
    trainer.save_model(str(folder))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "items": len(data.items), "epochs": trainer.state.epoch,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def train_crrl(settings: QuickstartSettings, data) -> dict:
    """CRRL from the LRCL checkpoint; with held-out items, the frozen yardstick before and after training."""
    from reaemb_trl.builders import DataArguments, build_crrl_trainer
    from reaemb_trl.crrl_config import CRRLConfig

    folder, tables = settings.output / "crrl", settings.output / "tables"
    for name in ("lrcl", "crrl"):  # written below from the yardstick's encodings, or by export_tables
        (tables / f"{name}.safetensors").unlink(missing_ok=True)
    args = CRRLConfig(**{"lrcl_checkpoint": str(settings.output / "lrcl"), **_training_args(settings, folder),
                         **settings.crrl})
    trainer = build_crrl_trainer(DataArguments(dataset=str(data.folder)), args, data)
    resume = _last_checkpoint(folder)
    before = trainer.evaluate(metric_key_prefix="start") if trainer.yardstick is not None and not resume else None
    if before is not None:  # the LRCL table: the catalogue under the thought module CRRL starts from
        _write_yardstick_table(trainer, settings, tables / "lrcl.safetensors", settings.output / "lrcl")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(folder))
    after = trainer.evaluate(metric_key_prefix="end") if trainer.yardstick is not None else None
    if before is not None:
        _write_yardstick_table(trainer, settings, tables / "crrl.safetensors", folder)
    history = trainer.state.log_history
    rewards = [h["reward"] for h in history if "reward" in h]
    return {"steps": trainer.state.global_step, "trained_items": len(trainer.train_dataset),
            "rollout_items": trainer.state.global_step * args.per_device_train_batch_size // args.num_generations,
            "first_reward": rewards[0] if rewards else None, "last_reward": rewards[-1] if rewards else None,
            "frac_reward_zero_std": _mean_logged(history, "frac_reward_zero_std"),
            "clip_region": _mean_logged(history, "clip_ratio/region_mean"),
            "log_ratio_iter2": _mean_logged(history, "policy/log_ratio_abs/iter2"),
            "delta_mu_iter2": _mean_logged(history, "policy/delta_mu_over_sigma/iter2"),
            "yardstick_start": before, "yardstick_end": after}


def _write_yardstick_table(trainer, settings: QuickstartSettings, path: Path, source: Path) -> None:
    """The catalogue table the trainer's last evaluation encoded, written as an item table: the export stage then
    encodes only the raw backbone."""
    import torch

    from reaemb_trl.export import write_encoded_table

    ids, table = trainer.last_catalogue_table
    write_encoded_table(trainer.embedder, ids, table, path, source=str(source), pca=settings.export_pca,
                        dtype=torch.bfloat16 if trainer.args.bf16 else None)


def _mean_logged(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if h.get(key) is not None]
    return sum(values) / len(values) if values else None


def export_tables(settings: QuickstartSettings, data) -> dict:
    """raw (the bare backbone, same prompt and pooling, no thought), lrcl and crrl tables; LRCL and CRRL share
    their prefix passes when CRRL left the LLM as LRCL trained it."""
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.export import export_table, export_thought_variants

    out, tables = settings.output, settings.output / "tables"
    rows = data.rows
    crrl = ThoughtEmbedder.from_pretrained(out / "crrl", device=settings.device)
    raw = ThoughtEmbedder.from_backbone(settings.backbone, formatter=crrl.formatter, pooling=crrl.pooling)
    export_table(raw.to(settings.device), rows, tables / "raw.safetensors", source=settings.backbone,
                 without_thought=True, batch_size=settings.export_batch, pca=settings.export_pca)
    del raw
    if all((tables / f"{name}.safetensors").exists() for name in ("lrcl", "crrl")):
        pass  # train_crrl wrote both from the noise-free catalogue tables of its yardstick evaluations
    elif crrl.same_adapter_as(out / "lrcl"):  # CRRL trained only the thought module: one prefix pass for both
        export_thought_variants(crrl, rows, {
            "lrcl": (tables / "lrcl.safetensors", crrl.thought_module_from(out / "lrcl"), str(out / "lrcl")),
            "crrl": (tables / "crrl.safetensors", crrl.thought_module, str(out / "crrl")),
        }, batch_size=settings.export_batch, pca=settings.export_pca)  # fmt: skip
    else:
        lrcl = ThoughtEmbedder.from_pretrained(out / "lrcl", device=settings.device)
        for name, embedder in (("lrcl", lrcl), ("crrl", crrl)):
            export_table(embedder, rows, tables / f"{name}.safetensors", source=str(out / name),
                         batch_size=settings.export_batch, pca=settings.export_pca)
    return {"items": len(rows), "tables": [str(tables / f"{n}.safetensors") for n in TABLES]}


def evaluate_tables(settings: QuickstartSettings, data) -> dict:
    """MostPop, ids and the three tables (frozen, the paper's mode; and hybrid = ids + adapter(table)) over the
    seeds, with paired tests: every table vs id, the LLM tables vs raw, each stage vs the one before."""
    from reaemb_trl.evaluation.report import write_report
    from reaemb_trl.evaluation.runner import EvalConfig, TableSpec, compare_tables

    tables = settings.output / "tables"
    specs = [TableSpec("mostpop", "mostpop"), TableSpec("id", "id")]
    specs += [TableSpec(name, str(tables / f"{name}.safetensors"), "frozen") for name in TABLES]
    compare = ["lrcl:raw", "crrl:lrcl"]
    if settings.hybrid:
        specs += [TableSpec(f"{name}@hybrid", str(tables / f"{name}.safetensors"), "hybrid") for name in TABLES]
        compare += ["lrcl@hybrid:raw@hybrid", "crrl@hybrid:lrcl@hybrid"]
    config = EvalConfig(**{"device": settings.device, **settings.evaluation})
    results = compare_tables(data.rec_dataset(), specs, settings.eval_seeds, config, compare=compare,
                             workers=settings.eval_workers)
    write_report(results, settings.output / "eval")
    return {"tables": [s.name for s in specs], "seconds_of_runs": results["wall_seconds"]}


# ---- orchestration --------------------------------------------------------------------------------------------------
def _stage(settings: QuickstartSettings, name: str, run: Callable[[], dict]) -> dict:
    """Run a stage unless its marker exists; the marker (with timing) is written only after the stage finished."""
    marker = settings.output / ".stages" / f"{name}.json"
    if marker.exists():
        _log(f"{name}: already done, skipping ({marker})")
        return json.loads(marker.read_text())
    _log(f"{name}: running ...")
    start = time.time()
    info = run() or {}
    info["seconds"] = round(time.time() - start, 1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(info, indent=2) + "\n")
    _log(f"{name}: done in {info['seconds']:.0f} s")
    return info


def run_quickstart(settings: QuickstartSettings) -> dict:
    """Run every stage; returns the evaluation results (also written to OUTPUT/eval)."""
    from reaemb_trl.builders import DataArguments, LoadedDataset

    out = settings.output
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart_settings.json").write_text(json.dumps(asdict(settings), default=str, indent=2) + "\n")
    stages = {"data": _stage(settings, "data", lambda: fetch_data(settings))}
    data = LoadedDataset.load(DataArguments(dataset=str(out / "data")), with_sequences=True)  # read once per run
    for name, run in (("lrcl", train_lrcl), ("crrl", train_crrl), ("export", export_tables),
                      ("evaluate", evaluate_tables)):
        stages[name] = _stage(settings, name, lambda run=run: run(settings, data))
    results = json.loads((out / "eval" / "results.json").read_text())
    summary = {"stages": stages, "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


def quickstart_command(
    output: Path = typer.Option(None, "--output", help="Folder for every artifact (default: the settings file's, "
                                "runs/quickstart); re-running skips finished stages."),
    settings_file: Path = typer.Option(None, "--settings", help="A quickstart YAML (default: "
                                       "recipes/configs/quickstart.yaml)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (training, export and evaluation)."),
    seeds: int = typer.Option(None, "--seeds", help="Seeds of the downstream evaluation (default 3)."),
    hybrid: bool = typer.Option(None, "--hybrid/--no-hybrid", help="Also evaluate each LLM table as ids + "
                                "adapter(table) (default: the settings file's; 9 more runs, ~9 min on 2 cores)."),
) -> None:
    """ReaEmb end to end: fetch defaults, LRCL, CRRL, export tables, evaluate SASRec with MostPop, ids and each
    table (frozen and hybrid), with paired tests; settings from recipes/configs/quickstart.yaml."""
    from reaemb_trl.evaluation.report import render_markdown

    settings = QuickstartSettings.from_yaml(settings_file or SETTINGS_FILE, output=output, device=device,
                                            eval_seeds=seeds, hybrid=hybrid)
    results = run_quickstart(settings)
    print(render_markdown(results, groups=("all", "tail_item", "head_item")))
    summary = json.loads((settings.output / "summary.json").read_text())
    crrl = summary["stages"]["crrl"]
    if crrl.get("yardstick_start") and crrl.get("yardstick_end"):
        key = "anchor_normalized_centered_cosine"
        start, end = crrl["yardstick_start"].get(f"start_{key}"), crrl["yardstick_end"].get(f"end_{key}")
        print(f"CRRL on held-out items (frozen yardstick, {key}): {start:.4f} (LRCL) -> {end:.4f} (LRCL+CRRL)")
    print(f"\nall stages: {summary['total_seconds'] / 60:.1f} min; results in {settings.output / 'eval'} "
          "(results.json, results.md, ndcg10.png, test_ranks.npz)")
