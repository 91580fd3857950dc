"""`reaemb quickstart`: ReaEmb end to end on the embedded defaults, and whether it helped.

Stages (each skipped when its marker in OUTPUT/.stages exists, so a re-run continues where it stopped):
data -> lrcl -> crrl -> export (raw backbone, LRCL, LRCL+CRRL tables) -> evaluate (SASRec, ID vs tables).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

TABLES = ("raw", "lrcl", "crrl")


def typer_option(default, flag: str, help: str):
    import typer

    return typer.Option(default, flag, help=help)


@dataclass
class QuickstartSettings:
    """What the quickstart runs; the defaults fit 2 CPU cores in about 20 minutes."""

    output: Path
    backbone: str = "smollm2"
    dataset: str = "ml-100k"
    device: str = "cpu"
    seed: int = 42
    max_prompt_length: int = 96
    lrcl_steps: int = 40
    lrcl_batch: int = 12
    lrcl_learning_rate: float = 2e-4
    crrl_steps: int = 100
    crrl_items_per_step: int = 4
    crrl_generations: int = 8
    crrl_learning_rate: float = 1e-4
    export_batch: int = 32
    # Centred PCA (the paper reduces to 512): mean-pooled LLM states share one large direction that a small
    # adapter cannot see past; on MovieLens-100k it lifts the LLM tables' SASRec NDCG@10 about 5x.
    export_pca: int | None = 128
    eval_model: str = "sasrec"
    eval_seeds: int = 3
    eval_max_epochs: int = 30
    eval_patience: int = 5
    # Shorter sequences and smaller batches than the full protocol (200, 1024): several updates per epoch,
    # so SASRec converges within the CPU time budget. `reaemb evaluate` runs the full protocol.
    eval_max_len: int = 50
    eval_batch_size: int = 128
    bf16: bool | None = None  # None: where the hardware runs it fast
    extra: dict = field(default_factory=dict)

    @property
    def use_bf16(self) -> bool:
        import torch

        from reaemb_trl.export import fast_bf16_available

        return fast_bf16_available(torch.device(self.device)) if self.bf16 is None else self.bf16


def _log(message: str) -> None:
    print(f"[quickstart] {message}", file=sys.stderr, flush=True)


def _stage(settings: QuickstartSettings, name: str, run: Callable[[], dict | None]) -> dict:
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


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _common_training_args(settings: QuickstartSettings, folder: Path, steps: int) -> dict:
    return dict(
        max_steps=steps,
        save_steps=max(1, steps // 3),
        logging_steps=max(1, min(5, steps // 2)),
        output_dir=str(folder),
        seed=settings.seed,
        bf16=settings.use_bf16,
        use_cpu=settings.device == "cpu",
        save_strategy="steps",
        save_total_limit=1,
        report_to="tensorboard",
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=5,
    )


def _same_adapter(first: Path, second: Path) -> bool:
    """Whether two checkpoints carry the same LoRA weights (CRRL trains only the thought module by default)."""
    import torch
    from safetensors.torch import load_file

    from reaemb_trl.files import ADAPTER_DIR

    files = [folder / ADAPTER_DIR / "adapter_model.safetensors" for folder in (first, second)]
    if not all(f.exists() for f in files):
        return not any(f.exists() for f in files)
    a, b = (load_file(f) for f in files)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_quickstart(settings: QuickstartSettings) -> dict:
    """Run every stage; returns the evaluation results (also written to OUTPUT/eval)."""
    out = settings.output
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart_settings.json").write_text(json.dumps(asdict(settings), default=str, indent=2) + "\n")
    data = out / "data"

    def stage_data():
        from reaemb_trl.assets import resolve_dataset, resolve_model_path
        from reaemb_trl.data.canonical import print_stats

        resolve_model_path(settings.backbone)  # fetch the embedded backbone now, not in the middle of training
        source = resolve_dataset(settings.dataset)
        staging = out / ".data.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        shutil.rmtree(data, ignore_errors=True)
        staging.rename(data)
        stats = print_stats(data)
        return {"source": str(source), "stats": asdict(stats)}

    def stage_lrcl():
        from reaemb_trl import LRCLConfig, LRCLTrainer
        from reaemb_trl.data.canonical import load_items

        folder = out / "lrcl"
        args = LRCLConfig(
            model_name_or_path=settings.backbone,
            per_device_train_batch_size=settings.lrcl_batch,
            learning_rate=settings.lrcl_learning_rate,
            max_prompt_length=settings.max_prompt_length,
            **_common_training_args(settings, folder, settings.lrcl_steps),
        )
        trainer = LRCLTrainer(args=args, train_dataset=load_items(data))
        trainer.train(resume_from_checkpoint=_last_checkpoint(folder))
        trainer.save_model(str(folder))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}

    def stage_crrl():
        from reaemb_trl.crrl_config import CRRLConfig
        from reaemb_trl.builders import DataArguments, build_crrl_trainer

        folder = out / "crrl"
        args = CRRLConfig(
            lrcl_checkpoint=str(out / "lrcl"),
            per_device_train_batch_size=settings.crrl_items_per_step * settings.crrl_generations,
            num_generations=settings.crrl_generations,
            learning_rate=settings.crrl_learning_rate,
            **{
                **_common_training_args(settings, folder, settings.crrl_steps),
                # checkpoints on rollout boundaries (every num_iterations=2 steps) resume exactly
                "save_steps": max(2, settings.crrl_steps // 6 * 2),
            },
        )
        trainer = build_crrl_trainer(DataArguments(dataset=str(data)), args)
        trainer.train(resume_from_checkpoint=_last_checkpoint(folder))
        trainer.save_model(str(folder))
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        return {"first_reward": rewards[0] if rewards else None, "last_reward": rewards[-1] if rewards else None}

    def stage_export():
        import copy

        from safetensors.torch import load_file

        from reaemb_trl.data.canonical import read_items
        from reaemb_trl.embedder import ThoughtEmbedder
        from reaemb_trl.export import export_table, export_thought_variants
        from reaemb_trl.files import THOUGHT_FILE
        from reaemb_trl.prompt import ItemPromptFormatter

        items = read_items(data)
        tables = out / "tables"
        formatter = ItemPromptFormatter.load(out / "lrcl")  # the raw baseline gets the same prompt
        raw = ThoughtEmbedder.from_backbone(settings.backbone, formatter=formatter).to(settings.device)
        export_table(raw, items, tables / "raw.safetensors", source=settings.backbone, use_thought=False,
                     batch_size=settings.export_batch, pca=settings.export_pca)
        del raw
        crrl = ThoughtEmbedder.from_pretrained(out / "crrl", device=settings.device)
        if _same_adapter(out / "lrcl", out / "crrl"):  # CRRL left the LLM as LRCL trained it: share its passes
            lrcl_thought = copy.deepcopy(crrl.thought)
            lrcl_thought.load_state_dict(load_file(out / "lrcl" / THOUGHT_FILE))
            export_thought_variants(crrl, items, {
                "lrcl": (tables / "lrcl.safetensors", lrcl_thought, str(out / "lrcl")),
                "crrl": (tables / "crrl.safetensors", crrl.thought, str(out / "crrl")),
            }, batch_size=settings.export_batch, pca=settings.export_pca)  # fmt: skip
        else:
            lrcl = ThoughtEmbedder.from_pretrained(out / "lrcl", device=settings.device)
            for name, embedder in (("lrcl", lrcl), ("crrl", crrl)):
                export_table(embedder, items, tables / f"{name}.safetensors", source=str(out / name),
                             batch_size=settings.export_batch, pca=settings.export_pca)
        return {"items": len(items)}

    def stage_evaluate():
        from reaemb_trl.evaluation.report import write_report
        from reaemb_trl.evaluation.runner import EvalConfig, compare_tables

        config = EvalConfig(model=settings.eval_model, max_epochs=settings.eval_max_epochs,
                            patience=settings.eval_patience, max_len=settings.eval_max_len,
                            batch_size=settings.eval_batch_size, device=settings.device)
        tables = ["id"] + [str(out / "tables" / f"{name}.safetensors") for name in TABLES]
        results = compare_tables(data, tables, settings.eval_seeds, config)
        write_report(results, out / "eval")
        return {"tables": tables}

    stages = {}
    for name, run in [("data", stage_data), ("lrcl", stage_lrcl), ("crrl", stage_crrl),
                      ("export", stage_export), ("evaluate", stage_evaluate)]:
        stages[name] = _stage(settings, name, run)
    results = json.loads((out / "eval" / "results.json").read_text())
    summary = {"stages": stages, "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


def quickstart_command(
    output: Path = typer_option("runs/quickstart", "--output", "Folder for every artifact; re-running skips finished stages."),
    backbone: str = typer_option("smollm2", "--backbone", "Backbone: `smollm2` (embedded), a hub id or a folder."),
    dataset: str = typer_option("ml-100k", "--dataset", "`ml-100k` (embedded) or a canonical dataset folder."),
    device: str = typer_option("cpu", "--device", "cpu or cuda (training, export and evaluation)."),
    lrcl_steps: int = typer_option(40, "--lrcl-steps", "LRCL training steps."),
    crrl_steps: int = typer_option(100, "--crrl-steps", "CRRL training steps."),
    eval_seeds: int = typer_option(3, "--seeds", "Seeds per table in the downstream evaluation."),
    eval_max_epochs: int = typer_option(30, "--eval-max-epochs", "Max SASRec epochs per run (early stopping on)."),
) -> None:
    """ReaEmb end to end: fetch defaults, LRCL, CRRL, export tables, evaluate SASRec with ID vs each table."""
    from reaemb_trl.evaluation.report import render_markdown

    settings = QuickstartSettings(
        output=output, backbone=backbone, dataset=dataset, device=device, lrcl_steps=lrcl_steps,
        crrl_steps=crrl_steps, eval_seeds=eval_seeds, eval_max_epochs=eval_max_epochs,
    )
    results = run_quickstart(settings)
    print(render_markdown(results))
    summary = json.loads((output / "summary.json").read_text())
    print(f"\nall stages: {summary['total_seconds'] / 60:.1f} min; results in {output / 'eval'} "
          "(results.json, results.md, ndcg10.png)")
