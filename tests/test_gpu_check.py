"""benchmarks/gpu_check.py, the one-command GPU acceptance run, rehearsed on CPU with `--tiny`: every section runs
(benchmarks in process, recipes through `accelerate launch` under the shipped single-GPU and ZeRO-2 configs, the
export CLI) and lands in the JSON and Markdown summaries with numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RUNS = {"lrcl_single": ("single_gpu.yaml", 20, 5), "lrcl_zero2": ("deepspeed_zero2.yaml", 20, 5),
        "crrl_single": ("single_gpu.yaml", 10, 2), "crrl_zero2": ("deepspeed_zero2.yaml", 10, 2)}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--output", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode != 0 and "ninja" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("DeepSpeed's CPU accelerator compiles its shm comm op on first use: needs ninja + a C++ compiler")
    summary = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    errors = {n: s.get("error") for n, s in (summary or {}).get("sections", {}).items() if s["status"] == "error"}
    assert proc.returncode == 0, (errors, proc.stdout[-3000:], proc.stderr[-3000:])
    return summary, (out / "gpu_check.md").read_text()


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_benchmark_sections_compare_literal_and_fast_paths(tiny_run):
    summary, _ = tiny_run
    assert summary["mode"] == "tiny-cpu"
    sections = summary["sections"]
    assert sections["env"]["versions"]["torch"] and sections["setup"]["items"] == 300
    for name, key in (("lrcl_bench", "step_ms"), ("crrl_bench", "step_ms"), ("export_bench", "seconds")):
        section = sections[name]
        # rows from the script's --json, or parsed from its printed table where a script lacks the option
        assert section["status"] == "ok" and section["source"] in ("json", "printed table"), section
        paths = {row["path"]: row for row in section["rows"]}
        literal = next(row for path, row in paths.items() if path.startswith("literal"))
        fast = [row for path, row in paths.items() if path.startswith("fast")]
        assert fast and all(_positive(row[key]) for row in [literal, *fast]), section["rows"]
    targets = {t["key"]: t for t in summary["targets"]}
    for key in ("lrcl_speedup", "crrl_speedup", "export_speedup"):
        assert _positive(targets[key]["measured"]), targets[key]
    # No GPU: no MFU, no GPU memory, and no verdict on targets that are about a GPU.
    assert targets["lrcl_mfu"]["measured"] is None and targets["lrcl_paper_memory_gib"]["measured"] is None
    assert all(t["met"] is None for t in summary["targets"])


@pytest.mark.parametrize("name", RUNS)
def test_recipe_runs_train_save_and_reload(tiny_run, name):
    summary, _ = tiny_run
    config, steps, logging_steps = RUNS[name]
    run = summary["sections"][name]
    assert run["status"] == "ok" and run["exit"] == 0 and run["config"] == config, run
    assert run["steps"] == steps and len(run["losses"]) == steps // logging_steps
    assert all(math.isfinite(loss) for loss in run["losses"])
    assert _positive(run["train_seconds"]) and run["world"] == 1
    # every trainable tensor moved; CRRL trains the thought module only (6 tensors), LRCL LoRA + thought + tau
    assert run["changed"] == run["compared_with_start"] == run["trainable"] > 0
    assert run["trainable"] == 6 if name.startswith("crrl") else run["trainable"] > 6
    if "zero2" in name:
        assert run["holding"]["wrapper"] == "DeepSpeedEngine" and run["holding"]["zero_stage"] == 2, run["holding"]
        # ZeRO-2 with one process is tested here only (tests/test_deepspeed.py runs it with two)
        assert run["holding"]["optimizer"] == "DeepSpeedZeroOptimizer", run["holding"]
    else:
        assert "zero_stage" not in run["holding"], run["holding"]
    # the saved folder reloads to the live model: same tensors, same embeddings
    assert run["reload_tensors_compared"] >= 6 and run["reload_max_abs_tensor_diff"] <= 1e-6
    assert run["reload_embeddings_finite"]
    assert run["reload_max_abs_embedding_diff"] <= 1e-5 * max(1.0, run["embedding_max_abs"])


def test_export_and_skipped_fsdp2(tiny_run):
    summary, _ = tiny_run
    export = summary["sections"]["export"]
    assert export["status"] == "ok" and export["rows_match"] and export["finite"], export
    assert export["shape"] == [300, 32] and _positive(export["items_per_s_wall"])
    fsdp = summary["sections"]["lrcl_fsdp2"]
    assert fsdp["status"] == "skipped" and "GPU" in fsdp["reason"]


def test_markdown_summary_holds_every_section(tiny_run):
    _, markdown = tiny_run
    for heading in ("## Targets", "## LRCL step", "## CRRL step", "## Export (export_bench)",
                    "## Recipes through accelerate launch", "## Export (one process)"):  # fmt: skip
        assert heading in markdown
    for name in RUNS:
        assert f"| {name} | ok | {RUNS[name][0]} | {RUNS[name][1]} |" in markdown
    assert "| literal |" in markdown and "| fast |" in markdown and "300 items in" in markdown


# ---- the summary's logic, without running anything ----------------------------------------------------------------
def test_targets_are_judged_only_on_a_gpu_run():
    from benchmarks.gpu_check_report import evaluate_targets

    sections = {
        "lrcl_bench": {"status": "ok", "rows": [{"path": "literal", "step_ms": 260.0},
                                                {"path": "fast+template", "step_ms": 200.0, "mfu": 0.42}]},
        "crrl_bench": {"status": "ok", "rows": [{"path": "literal", "step_ms": 70.0},
                                                {"path": "fast", "step_ms": 10.0}]},
        "export_bench": {"status": "ok", "rows": [{"path": "literal, unsorted, fp32", "seconds": 3.0},
                                                  {"path": "fast, fp32", "seconds": 2.0}]},
        "lrcl_single": {"status": "ok", "max_memory_reserved_gib": 20.5},
    }  # fmt: skip
    gpu = {t["key"]: t for t in evaluate_targets({"mode": "gpu", "sections": sections})}
    assert gpu["lrcl_mfu"]["met"] is True
    assert gpu["lrcl_speedup"]["measured"] == 1.3 and gpu["lrcl_speedup"]["met"] is True
    assert gpu["crrl_speedup"]["met"] is False and gpu["crrl_speedup"]["measured"] == 7.0
    assert gpu["export_speedup"]["measured"] == 1.5 and gpu["export_speedup"]["met"] is False
    assert gpu["lrcl_paper_memory_gib"]["met"] is True
    sections["lrcl_bench"]["status"] = "error"
    cpu = {t["key"]: t for t in evaluate_targets({"mode": "tiny-cpu", "sections": sections})}
    assert cpu["lrcl_speedup"]["measured"] is None and all(t["met"] is None for t in cpu.values())


def test_printed_tables_parse_back_and_unknown_options_are_dropped(capsys):
    from benchmarks.common import parse_table, print_table
    from benchmarks.gpu_check import known_options, number

    print("CRRL step | tiny | CPU")
    print_table([{"path": "literal", "step_ms": "892", "vs_literal": "1.00x"},
                 {"path": "fast", "step_ms": "80", "vs_literal": "11.15x"}], ["path", "step_ms", "vs_literal"])
    print("max |fast - literal| (fp32) = 2.4e-07")
    title, rows = parse_table(capsys.readouterr().out)
    assert title == "CRRL step | tiny | CPU"
    assert [{k: number(v) for k, v in r.items()} for r in rows] == [
        {"path": "literal", "step_ms": 892.0, "vs_literal": 1.0},
        {"path": "fast", "step_ms": 80.0, "vs_literal": 11.15}]
    assert number("45.3%") == pytest.approx(0.453)
    source = 'parser.add_argument("--batch")\nparser.add_argument("--lora-layers", nargs="*")'
    arguments = ["--batch", "8", "--prompts", "synthetic", "--lora-layers"]
    assert known_options(arguments, source) == ["--batch", "8", "--lora-layers"]
