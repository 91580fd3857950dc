"""The shipped recipes' speed under each precision setting on this machine: `bf16: auto` against `--bf16 false`
(and, with --with-bf16, forced bf16), so the `auto` rule is checked where it matters: on a CPU without bf16 hardware
`auto` must run as fast as fp32, where forced bf16 is emulated and many times slower.

    python -m benchmarks.bench_precision --steps 6                       # LRCL recipe, auto vs false
    python -m benchmarks.bench_precision --steps 6 --recipe crrl --lrcl-checkpoint runs/quickstart/lrcl
    python -m benchmarks.bench_precision --steps 3 --with-bf16           # also forced bf16 (slow without AMX/AVX512-BF16)

Each setting runs the recipe in its own process (`python recipes/<recipe>.py`, no checkpoints, no logging sinks) and
reports the trainer's own train_runtime per step, so model loading is not counted. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from reaemb_trl.hardware import cpu_flags, cpu_model, fast_bf16_available

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"lrcl": "recipes/configs/lrcl_smollm2_ml100k.yaml", "crrl": "recipes/configs/crrl_smollm2_ml100k.yaml"}


def run_recipe(recipe: str, precision: str, steps: int, extra: list[str]) -> dict:
    """One recipe run; returns its train_runtime, steps and the precision line the loader printed."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, f"recipes/{recipe}.py", "--config", CONFIGS[recipe], "--output_dir", out,
                   "--max_steps", str(steps), "--save_strategy", "no", "--report_to", "none", "--eval_strategy", "no",
                   "--bf16", precision, *extra]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    found = re.findall(r"\{'train_runtime':[^}]*\}", done.stdout + done.stderr)
    if not found:
        raise SystemExit(f"no train_runtime in the output of {' '.join(command)}")
    summary = ast.literal_eval(found[-1])
    chosen = [line for line in done.stderr.splitlines() if line.startswith("precision:")]
    runtime = float(summary["train_runtime"])
    return {"precision": precision, "chosen": chosen[-1] if chosen else "", "train_runtime_s": runtime,
            "seconds_per_step": runtime / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--recipe", choices=sorted(CONFIGS), default="lrcl")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lrcl-checkpoint", help="CRRL: the LRCL checkpoint to start from")
    parser.add_argument("--with-bf16", action="store_true", help="also time forced bf16")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    extra = ["--lrcl_checkpoint", args.lrcl_checkpoint] if args.recipe == "crrl" and args.lrcl_checkpoint else []
    settings = ["auto", "false"] + (["true"] if args.with_bf16 else [])
    rows = [run_recipe(args.recipe, precision, args.steps, extra) for precision in settings]
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx2", "avx512f", "avx512_bf16", "amx")))
    print(f"{args.recipe} recipe, {args.steps} steps; CPU: {cpu_model()} ({', '.join(flags)}); "
          f"fast bf16: {fast_bf16_available('cpu')}")
    print("| bf16 | chosen | s/step | vs --bf16 false |")
    print("|---|---|---:|---:|")
    reference = next(r for r in rows if r["precision"] == "false")["seconds_per_step"]
    for row in rows:
        print(f"| {row['precision']} | {row['chosen']} | {row['seconds_per_step']:.2f} | "
              f"{row['seconds_per_step'] / reference:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
