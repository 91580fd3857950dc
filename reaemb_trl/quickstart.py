"""The quickstart pipeline behind `reaemb quickstart` (reaemb_trl/cli/quickstart.py): ReaEmb end to end on the
embedded defaults, and whether it helped.

Stages, each a function of (settings, data) and each skipped when its marker in OUTPUT/.stages exists, so a re-run
continues where it stopped (an interrupted training stage resumes from its last checkpoint). Each table has one
writer:

    fetch_data -> train_lrcl -> train_crrl (+ tables lrcl, crrl) -> export_raw_table (tables raw, reference)
        -> evaluate_tables

Cold items (`cold_items`, reaemb_trl.data.cold) stand for items added after training: LRCL reads their text (it
uses no interactions), CRRL and its co-occurrence counts never see their interactions, the evaluation removes them
from its training data and reports their users as a group, and each table is written for the other (warm) items,
then gets the cold ones the way a user adds new items (`reaemb encode`, export.encode_new_items).

The settings live in reaemb_trl/configs/quickstart.yaml, shipped inside the package (its comments say how they
differ from the paper and why); `QuickstartSettings.from_yaml` reads it and the CLI's flags override it. The
experiment scripts (experiments/) call the same stage functions with other settings.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

if TYPE_CHECKING:
    from reaemb_trl.data.canonical import RecDataset

TABLES = ("raw", "lrcl", "crrl")
# The text reference (reaemb_trl.cooccurrence_projection): the backbone's input embeddings of the item text through a
# linear map trained on co-occurrence; evaluated frozen only, the bar the trained tables should clear.
REFERENCE = "reference"
# package data (pyproject.toml's package-data), so an installed wheel has it too
SETTINGS_FILE = resources.files("reaemb_trl") / "configs" / "quickstart.yaml"
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
    bf16: bool | str = "auto"  # auto: bf16 where the hardware runs it fast (reaemb_trl.preflight.resolve_bf16)
    lrcl: dict[str, Any] = field(default_factory=dict)
    crrl: dict[str, Any] = field(default_factory=dict)
    export_batch: int = 32
    export_pca: int | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    eval_seeds: int = 3
    eval_workers: int = 2  # downstream runs at once (worker processes sharing the CPU threads)
    hybrid: bool = False  # also evaluate every LLM table as ids + adapter(table)
    ensemble: bool = False  # also the score ensemble id+table of the id and frozen runs (no training)
    cold_items: float = 0.0  # share of the items treated as new (every stage; see the module doc)
    cold_item_seed: int = 0
    reference: bool = False  # also the text reference table (REFERENCE), frozen

    def __post_init__(self):
        if not 0.0 <= self.cold_items < 1.0:
            raise ValueError(f"cold_items is a share of the catalogue in [0, 1), got {self.cold_items}")
        misplaced = sorted({"cold_items", "cold_item_seed"} & set(self.evaluation))
        if misplaced:
            raise ValueError(f"set {misplaced} at the top level of the quickstart settings, not under `evaluation`: "
                             "the LLM stages use the same cold items")

    @classmethod
    def from_yaml(cls, path: str | Path | Traversable = SETTINGS_FILE, **overrides) -> "QuickstartSettings":
        """Settings from a YAML file (every key a field of this class; default: the packaged quickstart.yaml), then
        `overrides` (None values ignored)."""
        path = Path(path) if isinstance(path, str) else path
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown quickstart settings {unknown}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        data["output"] = Path(data.get("output", "runs/quickstart"))
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def crrl_fields(self) -> dict[str, Any]:
        """Every CRRLConfig field as this run sets it: the class defaults with `crrl` over them."""
        from reaemb_trl.crrl_config import CRRLConfig

        return {**{f.name: f.default for f in fields(CRRLConfig)}, **self.crrl}

    def precision(self) -> tuple[bool, str]:
        """(bf16, the line that says which precision and why), by the recipes' rule."""
        from reaemb_trl.preflight import resolve_bf16

        return resolve_bf16(self.bf16, self.device)


def _log(message: str) -> None:
    print(f"[quickstart] {message}", file=sys.stderr, flush=True)


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _training_args(settings: QuickstartSettings, folder: Path) -> dict:
    """What both trainers get from the quickstart: output, seed, precision, device, logging."""
    return dict(output_dir=str(folder), seed=settings.seed, bf16=settings.precision()[0],
                use_cpu=settings.device == "cpu", report_to="tensorboard", save_total_limit=1, disable_tqdm=False)


def _data_args(settings: QuickstartSettings):
    from reaemb_trl.builders import DataArguments

    return DataArguments(dataset=str(settings.output / "data"), cold_items=settings.cold_items,
                         cold_item_seed=settings.cold_item_seed)


def cold_items(settings: QuickstartSettings, data: RecDataset) -> set[str]:
    """The cold items of this run: the same draw as the evaluation's (EvalConfig.cold_items, cold_item_seed)."""
    from reaemb_trl.data.cold import cold_item_ids

    return set(cold_item_ids(data.item_ids, settings.cold_items, settings.cold_item_seed))


def _warm_items(settings: QuickstartSettings, data: RecDataset) -> list[dict]:
    cold = cold_items(settings, data)
    return [item for item in data.items if item["item_id"] not in cold]


def _add_cold_items(settings: QuickstartSettings, data: RecDataset, table: Path, model) -> int:
    """Add the cold items to `table` as a user adds new items (`reaemb encode`: export.encode_new_items with the
    model that made the table, a checkpoint folder or the bare backbone's embedder); returns how many."""
    from reaemb_trl.export import encode_new_items

    if not cold_items(settings, data):
        return 0
    _, added = encode_new_items(model, data.items, table, table, batch_size=settings.export_batch,
                                device=settings.device)
    return len(added)


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


def remaining_stage_seconds(settings: QuickstartSettings, data: RecDataset, after: str) -> float:
    """Reference-CPU seconds of the stages after `after` still to run (priced by reaemb_trl/quickstart_time.py)."""
    from reaemb_trl.quickstart_time import later_stage_seconds

    later = STAGES[STAGES.index(after) + 1:]
    return later_stage_seconds(settings, data, later, len(cold_items(settings, data)), len(TABLES),
                               int(settings.reference))


def lrcl_speed(settings: QuickstartSettings) -> float | None:
    """This machine's LRCL time per step / the reference CPU's, from the finished LRCL stage (None without it)."""
    from reaemb_trl.quickstart_time import REFERENCE_STEP_SECONDS

    marker = settings.output / ".stages" / "lrcl.json"
    info = json.loads(marker.read_text()) if marker.exists() else {}
    if not info.get("steps") or not info.get("seconds"):
        return None
    return info["seconds"] / info["steps"] / REFERENCE_STEP_SECONDS["lrcl"]


def train_lrcl(settings: QuickstartSettings, data: RecDataset) -> dict:
    """LRCL over the whole catalogue, cold items included: it reads item text only, never an interaction (a new
    item's text is known when it is added); `lrcl.num_train_epochs` = views of each item."""
    from reaemb_trl.builders import build_lrcl_trainer
    from reaemb_trl.lrcl_config import LRCLConfig
    from reaemb_trl.quickstart_time import TimeEstimate

    folder = settings.output / "lrcl"
    args = LRCLConfig(**{"model_name_or_path": settings.backbone, **_training_args(settings, folder),
                         "save_strategy": "steps", "save_steps": 50, **settings.lrcl})
    trainer = build_lrcl_trainer(_data_args(settings), args, data)
    trainer.add_callback(TimeEstimate("lrcl", remaining_stage_seconds(settings, data, "lrcl")))
    trainer.train(resume_from_checkpoint=_last_checkpoint(folder))
    trainer.save_model(str(folder))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "items": len(data.items), "epochs": trainer.state.epoch,
            "cold_items_read": len(cold_items(settings, data)),  # their text only: LRCL uses no interactions
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def train_crrl(settings: QuickstartSettings, data: RecDataset) -> dict:
    """CRRL from the LRCL checkpoint (never seeing a cold item), then the two tables of the trained checkpoints (this
    stage is their one writer): tables/lrcl and tables/crrl of the warm items, from the noise-free catalogue encodings
    of CRRL's frozen-yardstick evaluations before and after training when it has held-out items and started from
    scratch, else exported from the checkpoints; then the cold items added by each checkpoint, as `reaemb encode`
    adds them."""
    tables = settings.output / "tables"
    for name in ("lrcl", "crrl"):
        (tables / f"{name}.safetensors").unlink(missing_ok=True)
    info = _train_crrl(settings, data, tables)
    if not all((tables / f"{name}.safetensors").exists() for name in ("lrcl", "crrl")):
        _export_checkpoint_tables(settings, _warm_items(settings, data), tables)
    info["cold_items"] = len(cold_items(settings, data))
    for name in ("lrcl", "crrl"):
        _add_cold_items(settings, data, tables / f"{name}.safetensors", str(settings.output / name))
    return info


def _train_crrl(settings: QuickstartSettings, data: RecDataset, tables: Path) -> dict:
    """Train CRRL; with held-out items, the frozen yardstick before and after training, and (unless resumed) the
    LRCL and CRRL tables written from its encodings."""
    from reaemb_trl.builders import build_crrl_trainer
    from reaemb_trl.crrl_config import CRRLConfig
    from reaemb_trl.quickstart_time import TimeEstimate

    folder = settings.output / "crrl"
    args = CRRLConfig(**{"lrcl_checkpoint": str(settings.output / "lrcl"), **_training_args(settings, folder),
                         **settings.crrl})
    trainer = build_crrl_trainer(_data_args(settings), args, data)  # its catalogue: the warm items
    trainer.add_callback(TimeEstimate("crrl", remaining_stage_seconds(settings, data, "crrl"), lrcl_speed(settings)))
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
            # each generation batch serves num_iterations optimizer steps (TRL's buffered inputs)
            "rollout_items": trainer.state.global_step * args.per_device_train_batch_size * args.world_size
            * args.gradient_accumulation_steps // (args.num_generations * args.num_iterations),
            "first_reward": rewards[0] if rewards else None, "last_reward": rewards[-1] if rewards else None,
            "frac_reward_zero_std": _mean_logged(history, "frac_reward_zero_std"),
            "clip_region": _mean_logged(history, "clip_ratio/region_mean"),
            "log_ratio_iter2": _mean_logged(history, "policy/log_ratio_abs/iter2"),
            "delta_mu_iter2": _mean_logged(history, "policy/delta_mu_over_sigma/iter2"),
            "yardstick_start": before, "yardstick_end": after}


def _write_yardstick_table(trainer, settings: QuickstartSettings, path: Path, source: Path) -> None:
    """The catalogue table the trainer's last evaluation encoded, written as an item table (no second encoding)."""
    import torch

    from reaemb_trl.export import write_encoded_table

    ids, table = trainer.last_catalogue_table
    write_encoded_table(trainer.embedder, ids, table, path, source=str(source), pca=settings.export_pca,
                        dtype=torch.bfloat16 if trainer.args.bf16 else None)


def _export_checkpoint_tables(settings: QuickstartSettings, items: list[dict], tables: Path) -> None:
    """The LRCL and CRRL tables of `items` encoded from their checkpoints (no yardstick encodings to reuse); one
    prefix pass for both when CRRL left the LLM as LRCL trained it."""
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.export import export_table, export_thought_variants

    out = settings.output
    crrl = ThoughtEmbedder.from_pretrained(out / "crrl", device=settings.device)
    if crrl.same_adapter_as(out / "lrcl"):  # CRRL trained only the thought module: one prefix pass for both
        export_thought_variants(crrl, items, {
            "lrcl": (tables / "lrcl.safetensors", crrl.thought_module_from(out / "lrcl"), str(out / "lrcl")),
            "crrl": (tables / "crrl.safetensors", crrl.thought_module, str(out / "crrl")),
        }, batch_size=settings.export_batch, pca=settings.export_pca)  # fmt: skip
    else:
        lrcl = ThoughtEmbedder.from_pretrained(out / "lrcl", device=settings.device)
        for name, embedder in (("lrcl", lrcl), ("crrl", crrl)):
            export_table(embedder, items, tables / f"{name}.safetensors", source=str(out / name),
                         batch_size=settings.export_batch, pca=settings.export_pca)


def _mean_logged(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if h.get(key) is not None]
    return sum(values) / len(values) if values else None


def export_raw_table(settings: QuickstartSettings, data: RecDataset) -> dict:
    """The untrained tables. raw: the bare backbone with the trained checkpoints' prompt format and pooling, no
    thought (the baseline of the LLM tables; train_crrl writes those); the warm items, then the cold ones as `reaemb
    encode --backbone` adds them. reference (with `settings.reference`): the same backbone's input embeddings of the
    same item text through a co-occurrence linear map trained without the cold items and CRRL's held-out items
    (every item gets a row: its text is known)."""
    from reaemb_trl.checkpointing import read_config
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.export import export_table
    from reaemb_trl.prompt import ItemPromptFormatter

    path = settings.output / "tables" / "raw.safetensors"
    trained = settings.output / "crrl"  # its prompt format and pooling, read from its files (no model loaded)
    raw = ThoughtEmbedder.from_backbone(settings.backbone, formatter=ItemPromptFormatter.load(trained),
                                        pooling=read_config(trained)["pooling"]).to(settings.device)
    export_table(raw, _warm_items(settings, data), path, source=settings.backbone, without_thought=True,
                 batch_size=settings.export_batch, pca=settings.export_pca)
    added = _add_cold_items(settings, data, path, raw)
    written = [path]
    if settings.reference:
        from reaemb_trl.cooccurrence_projection import build_reference_table

        unseen = cold_items(settings, data) | crrl_held_out_items(settings, data)
        reference = settings.output / "tables" / f"{REFERENCE}.safetensors"
        written.append(build_reference_table(raw, data, unseen, reference, seed=settings.seed))
    return {"items": len(data.items), "cold_items": added, "tables": [str(p) for p in written]}


def crrl_held_out_items(settings: QuickstartSettings, data: RecDataset) -> set[str]:
    """The warm items CRRL holds out to measure itself (builders.build_crrl_trainer's draw)."""
    from reaemb_trl.crrl_yardstick import held_out_items

    config = settings.crrl_fields()
    warm = [item["item_id"] for item in _warm_items(settings, data)]
    return set(held_out_items(warm, config["eval_item_fraction"], config["eval_item_seed"]))


def evaluate_tables(settings: QuickstartSettings, data: RecDataset) -> dict:
    """MostPop, ids and the three tables (frozen, the paper's mode; hybrid = ids + adapter(table); the score
    ensemble id+table of the id and frozen runs) and the text reference (frozen) over the seeds, with paired tests:
    every table vs id, the LLM tables vs raw, each stage vs the one before, LRCL+CRRL vs the reference, each hybrid
    vs the ensemble of the same table. With cold items, the `cold_item` group: users whose target is one."""
    from reaemb_trl.evaluation import EvalConfig, TableSpec, compare_tables, write_report
    from reaemb_trl.evaluation.compare import spec_name

    tables = settings.output / "tables"
    modes = ["frozen"] + ["hybrid"] * settings.hybrid + ["ensemble"] * settings.ensemble
    specs = [TableSpec("mostpop", "mostpop"), TableSpec("id", "id")]
    specs += [TableSpec(spec_name(name, mode), str(tables / f"{name}.safetensors"), mode)
              for mode in modes for name in TABLES]
    compare = ["lrcl:raw", "crrl:lrcl"]
    if settings.reference:
        specs.append(TableSpec(REFERENCE, str(tables / f"{REFERENCE}.safetensors"), "frozen"))
        compare.append(f"crrl:{REFERENCE}")
    if settings.hybrid:
        compare += ["lrcl@hybrid:raw@hybrid", "crrl@hybrid:lrcl@hybrid"]
    if settings.hybrid and settings.ensemble:  # does a table inside the model beat combining two models' scores?
        compare += [f"{spec_name(name, 'hybrid')}:{spec_name(name, 'ensemble')}" for name in TABLES]
    config = EvalConfig(**{"device": settings.device, **settings.evaluation, "cold_items": settings.cold_items,
                           "cold_item_seed": settings.cold_item_seed})
    # Finished runs are kept in eval/runs: an interrupted evaluation stage resumes instead of starting over.
    results = compare_tables(data, specs, settings.eval_seeds, config, compare=compare, workers=settings.eval_workers,
                             runs_dir=settings.output / "eval" / "runs")
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
    from reaemb_trl.data.canonical import RecDataset

    out = settings.output
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart_settings.json").write_text(json.dumps(asdict(settings), default=str, indent=2) + "\n")
    bf16, precision = settings.precision()
    _log(precision)
    stages = {"data": _stage(settings, "data", lambda: fetch_data(settings))}
    data = RecDataset.load(out / "data")  # read once per run
    for name, run in (("lrcl", train_lrcl), ("crrl", train_crrl), ("export", export_raw_table),
                      ("evaluate", evaluate_tables)):
        stages[name] = _stage(settings, name, lambda run=run: run(settings, data))
    results = json.loads((out / "eval" / "results.json").read_text())
    summary = {"precision": {"bf16": bf16, "why": precision}, "stages": stages,
               "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results
