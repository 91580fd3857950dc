"""GPU acceptance run: the paper-shaped benchmarks and the recipes under the shipped accelerate configs, one command.

    bash benchmarks/gpu_check.sh OUT                      # on the GPU machine: installs the carried wheels first
    python -m benchmarks.gpu_check --output OUT           # a GPU with the packages installed
    python -m benchmarks.gpu_check --tiny --output OUT    # CPU, tiny model, about a minute (tests/test_gpu_check.py)
(from the repository root, as every script in benchmarks/).

Sections, each recorded (numbers, or the error) as soon as it ends, so a run cut short still leaves a summary:
  env            versions, card, its dense bf16 peak
  setup          a random model with Qwen2.5-0.5B's shape (tiny tokenizer of tests/assets; nothing is downloaded)
                 and a synthetic catalogue with interactions
  lrcl_bench     benchmarks/bench_lrcl.py: 64 items x 2 views x 128 tokens, bf16, literal vs fast, MFU, peak memory
  crrl_bench     benchmarks/bench_crrl.py: 4 items x G 8, N 10, literal vs fast
  export_bench   benchmarks/bench_export.py: literal vs fast at equal batch
  lrcl_single, lrcl_zero2, lrcl_fsdp2   recipes/lrcl.py (20 steps; FSDP2 10) through `accelerate launch`
  crrl_single, crrl_zero2               recipes/crrl.py (10 steps) from lrcl_single's checkpoint
  export         `reaemb export` of the whole catalogue (10k items) from lrcl_single's checkpoint, one process
Launches in the same phase run side by side (the card has room); their step times are therefore indicative only,
the benchmarks run alone. Writes OUT/gpu_check.json and OUT/gpu_check.md; working files (models, checkpoints,
launch logs) go to a temporary folder, removed at the end unless --keep-work.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_check_report import evaluate_targets, write_summary

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

WORDS = ("drama comedy action thriller romance war western crime family music night city river story love house "
         "return dark star game man woman secret last first world summer winter king island road garden storm "
         "silver golden little great lost broken hidden wild quiet red blue green old new young").split()  # fmt: skip


class Run:
    """Settings of one mode: the GPU acceptance run or the tiny CPU rehearsal."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.device = "cpu" if tiny else "cuda"
        self.items = 300 if tiny else 10_000
        self.users = 150 if tiny else 4_000
        self.lrcl_steps, self.crrl_steps, self.fsdp_steps = 20, 10, 10
        self.lrcl_batch = 8 if tiny else 64
        self.prompt_tokens = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- setup ----------------------------------------------------------------------------------------------------------
def make_catalogue(folder: Path, run: Run) -> dict:
    """Items whose prompts fill the 128-token budget, and users drawn from topic clusters (so items co-occur)."""
    import numpy as np

    from reaemb_trl.data.canonical import write_dataset

    rng = np.random.default_rng(0)
    clusters = 20
    items = []
    for i in range(run.items):
        words = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
        items.append({"item_id": str(i), "attributes": [
            {"key": "title", "value": f"{words(3).title()} {i}"}, {"key": "genres", "value": words(2)},
            {"key": "topic", "value": f"topic{i % clusters}"}, {"key": "description", "value": words(16)},
            {"key": "review", "value": words(16)}]})  # fmt: skip
    by_cluster = [list(range(c, run.items, clusters)) for c in range(clusters)]
    users = {}
    for u in range(run.users):
        pool = by_cluster[u % clusters]
        users[f"u{u}"] = [str(i) for i in rng.choice(pool, size=min(len(pool), 12), replace=False)]
    write_dataset(folder, items, users, source_format="synthetic")
    return {"items": len(items), "users": len(users), "interactions": sum(map(len, users.values()))}


def make_backbone(folder: Path, run: Run) -> dict:
    """Qwen2.5-0.5B's shape with random weights, saved in bf16 as the hub checkpoint is; the tiny tokenizer."""
    if run.tiny:
        return {"backbone": str(REPO / "tests" / "assets" / "tiny-llama"), "parameters": None}
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from benchmarks.common import qwen2_5_0_5b_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(qwen2_5_0_5b_config(dtype=torch.bfloat16)).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(REPO / "tests" / "assets" / "tiny_tokenizer").save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return {"backbone": str(folder), "parameters": parameters}


def environment() -> dict:
    import importlib.metadata as metadata
    import platform

    import torch

    from benchmarks.common import bf16_peak_tflops, machine

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    out = {"python": platform.python_version(), "versions": versions, "machine": machine(),
           "cuda": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, bf16_peak_tflops=bf16_peak_tflops(),
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    return out


# ---- benchmarks, in this process (one CUDA start for all) ---------------------------------------------------------
def run_bench(script: str, arguments: list[str], work: Path) -> dict:
    """Run benchmarks.<script> as __main__ with `arguments`; its rows from --json when it has the option, else
    parsed from the table it prints."""
    from benchmarks.common import parse_table

    source = (BENCH / f"{script}.py").read_text()
    arguments = known_options(arguments, source)
    json_path = work / f"{script}.json"
    if '"--json"' in source:
        arguments = arguments + ["--json", str(json_path)]
    printed = io.StringIO()
    argv = sys.argv
    sys.argv = [str(BENCH / f"{script}.py"), *arguments]
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(Tee(printed, sys.stdout)):
            runpy.run_module(f"benchmarks.{script}", run_name="__main__")
    finally:
        sys.argv = argv
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()
    result = {"command": " ".join(["python", "-m", f"benchmarks.{script}", *arguments]),
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    if json_path.exists():
        report = json.loads(json_path.read_text())
        result.update(title=report.get("title"), rows=report["rows"], source="json")
        result.update({k: report[k] for k in ("differences",) if k in report})
    else:
        title, rows = parse_table(printed.getvalue())
        result.update(title=title, rows=[{k: number(v) for k, v in r.items()} for r in rows], source="printed table")
    return result


def known_options(arguments: list[str], source: str) -> list[str]:
    """Drop the options (with their values) that the script's source does not define: the benchmark scripts grow
    options independently of this one."""
    kept, keep = [], True
    for a in arguments:
        if a.startswith("--"):
            keep = f'"{a}"' in source
        if keep:
            kept.append(a)
    return kept


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def number(value):
    """'1.26x' -> 1.26, '45.3%' -> 0.453, '5331' -> 5331.0; anything else unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip().rstrip("x").replace(",", "")
    scale = 0.01 if text.endswith("%") else 1.0
    try:
        return float(text.rstrip("%")) * scale
    except ValueError:
        return value


def bench_sections(run: Run, work: Path) -> list[tuple[str, object]]:
    common = ["--device", run.device, "--prompts", "synthetic"]
    if run.tiny:
        lrcl = ["--backbone", "tiny", "--batch", "8", "--tokens", "64", "--repeats", "1"]
        crrl = ["--backbone", "tiny", "--items", "2", "--generations", "4", "--candidates", "4", "--tokens", "48",
                "--repeats", "1"]  # fmt: skip
        export = ["--backbone", "tiny", "--items", "64", "--batch", "16", "--tokens", "64"]
    else:
        lrcl = ["--backbone", "qwen2.5-0.5b-random", "--batch", "64", "--tokens", "128", "--dtype", "bfloat16",
                "--repeats", "3"]  # fmt: skip
        crrl = ["--backbone", "qwen2.5-0.5b-random", "--dtype", "bfloat16", "--items", "4", "--generations", "8",
                "--candidates", "10", "--repeats", "2"]  # fmt: skip
        export = ["--backbone", "qwen2.5-0.5b-random", "--items", "512", "--batch", "64", "--tokens", "128"]
    return [
        ("lrcl_bench", lambda: run_bench("bench_lrcl", lrcl + common + ["--lora-layers"], work)),
        ("crrl_bench", lambda: run_bench("bench_crrl", crrl + ["--device", run.device], work)),
        ("export_bench", lambda: run_bench("bench_export", export + common, work)),
    ]


# ---- recipes under accelerate launch ---------------------------------------------------------------------------------
def launch_command(run: Run, config: str, recipe: str, recipe_args: list[str]) -> list[str]:
    topology = ["--config_file", str(REPO / "accelerate_configs" / config), "--num_processes", "1",
                "--num_machines", "1", "--main_process_port", str(free_port())]  # fmt: skip
    if run.tiny:
        topology += ["--mixed_precision", "no"] + (["--cpu"] if config == "single_gpu.yaml" else [])
        recipe_args = recipe_args + ["--use_cpu", "true", "--bf16", "false"]
    elif recipe == "crrl":
        # crrl_paper.yaml: LLM frozen in bf16 (model_dtype), trainer in fp32 (bf16: false). The configs' bf16 would
        # contradict it, which the DeepSpeed integration refuses ("ds bf16.enabled=True vs hf bf16=False").
        topology += ["--mixed_precision", "no"]
    return [sys.executable, "-m", "accelerate.commands.launch", *topology, "-m", "benchmarks.recipe_probe", recipe,
            *recipe_args]  # fmt: skip


def recipe_args(run: Run, recipe: str, data: Path, backbone: str, out: Path, work: Path, steps: int) -> list[str]:
    common = ["--dataset", str(data), "--output_dir", str(out), "--max_steps", str(steps), "--save_strategy", "no",
              "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "5" if recipe == "lrcl" else "2"]
    if recipe == "lrcl":  # the paper's LRCL setting, 128-token prompts
        config = "lrcl_tiny.yaml" if run.tiny else "lrcl_paper.yaml"
        return ["--config", f"recipes/configs/{config}", "--model_name_or_path", backbone,
                "--max_item_tokens", str(run.prompt_tokens), "--per_device_train_batch_size", str(run.lrcl_batch),
                *common]  # fmt: skip
    if run.tiny:
        return ["--config", "recipes/configs/crrl_tiny.yaml", "--lrcl_checkpoint", str(work / "lrcl_single"), *common]
    # The paper's shape (batch 32 = 4 items x G 8, N 10, sigma 0.1, 2 iterations, frozen LLM in bf16). A smooth
    # reward next to the rank reward: on random weights every copy of an item often gets the same rank, which
    # leaves the whole batch without advantage and the thought module without an update.
    return ["--config", "recipes/configs/crrl_paper.yaml", "--lrcl_checkpoint", str(work / "lrcl_single"),
            "--reward_funcs", "rank", "softmax", "--reward_weights", "1.0", "1.0", "--similarity", "cosine",
            "--reward_temperature", "0.05", *common]  # fmt: skip


def child_env(run: Run, **extra: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **extra,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if run.tiny:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


CHILDREN: list[subprocess.Popen] = []


def spawn(name: str, command: list[str], env: dict, work: Path, config: str, shown: str) -> dict:
    """Start a child in its own process group, so that a timeout ends the launcher and its workers together (a
    group, not a session: whatever ends this command's session still ends them), output to a log."""
    log = open(work / f"{name}.log", "w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0)
    CHILDREN.append(process)
    return {"name": name, "process": process, "log": log, "start": time.perf_counter(), "config": config,
            "command": shown}


def wait(job: dict, work: Path, timeout: float) -> int | str:
    try:
        code = job["process"].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job["process"].pid, signal.SIGKILL)
        job["process"].wait()
        code = "timeout"
    job["log"].close()
    if code != 0:
        tail = (work / f"{job['name']}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"exit {code} after {time.perf_counter() - job['start']:.0f} s; log tail:\n{tail}")
    return code


def start_launch(run: Run, name: str, config: str, recipe: str, args: list[str], work: Path) -> dict:
    command = launch_command(run, config, recipe, args)
    env = child_env(run, PROBE_DIR=str(work / f"{name}.probe"))
    return spawn(name, command, env, work, config, " ".join(["accelerate launch", *command[3:]]))


def finish_launch(job: dict, work: Path, timeout: float) -> dict:
    code = wait(job, work, timeout)
    result = {"config": job["config"], "command": job["command"], "exit": code,
              "wall_seconds": round(time.perf_counter() - job["start"], 1)}  # fmt: skip
    report = work / f"{job['name']}.probe" / "report.json"
    if not report.exists():
        raise RuntimeError(f"the probe wrote no {report.name}")
    result.update(json.loads(report.read_text()))
    return result


def export_job(run: Run, data: Path, work: Path) -> dict:
    command = [sys.executable, "-m", "reaemb_trl.cli", "export", "--checkpoint", str(work / "lrcl_single"), "--data",
               str(data), "--output", str(work / "table.safetensors"), "--device", run.device, "--batch-size", "64"]
    return spawn("export", command, child_env(run), work, "one process", " ".join(["reaemb", *command[3:]]))


def finish_export(job: dict, work: Path, timeout: float, items: int) -> dict:
    from safetensors import safe_open

    wait(job, work, timeout)
    seconds = time.perf_counter() - job["start"]
    with safe_open(str(work / "table.safetensors"), "pt") as table:
        embeddings = table.get_tensor("embeddings")
    return {"command": job["command"], "items": items, "wall_seconds": round(seconds, 1),
            "items_per_s_wall": round(items / seconds, 1), "shape": list(embeddings.shape),
            "finite": bool(embeddings.isfinite().all()), "rows_match": embeddings.shape[0] == items}  # fmt: skip


# ---- main ------------------------------------------------------------------------------------------------------------
def stop_children(signum=None, frame=None) -> None:
    """End the launched process groups (on SIGTERM/SIGINT too: a cut-short run leaves nothing on the card)."""
    for process in CHILDREN:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    if signum is not None:
        sys.exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny model, few items")
    parser.add_argument("--launch-timeout", type=float, default=300.0, help="seconds per launched run")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder (models, checkpoints)")
    args = parser.parse_args()
    run = Run(args.tiny)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    started = time.perf_counter()
    summary = {"mode": "tiny-cpu" if run.tiny else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "work_dir": str(work), "sections": {}, "targets": []}  # fmt: skip

    def record(name: str, fn) -> object:
        print(f"[gpu_check {time.perf_counter() - started:6.1f}s] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
            summary["sections"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1), **result}
        except Exception as error:  # noqa: BLE001 (one failed section must not lose the others)
            summary["sections"][name] = {"status": "error", "error": f"{type(error).__name__}: {error}"[-4000:]}
            print(f"[gpu_check] {name} failed: {error}", file=sys.stderr, flush=True)
        summary["elapsed_seconds"] = round(time.perf_counter() - started, 1)
        summary["targets"] = evaluate_targets(summary)
        write_summary(summary, output)
        return summary["sections"][name]

    record("env", environment)
    data, backbone_dir = work / "catalogue", work / "backbone"
    setup = record("setup", lambda: {**make_catalogue(data, run), **make_backbone(backbone_dir, run)})
    backbone = setup.get("backbone", str(backbone_dir))
    for name, fn in bench_sections(run, work):
        record(name, fn)

    # Phase B: LRCL under each config, side by side. Phase C: CRRL from lrcl_single's checkpoint, and the export.
    lrcl = lambda name, steps: recipe_args(run, "lrcl", data, backbone, work / name, work, steps)  # noqa: E731
    crrl = lambda name: recipe_args(run, "crrl", data, backbone, work / name, work, run.crrl_steps)  # noqa: E731
    phase_b = [("lrcl_single", "single_gpu.yaml", "lrcl", lrcl("lrcl_single", run.lrcl_steps)),
               ("lrcl_zero2", "deepspeed_zero2.yaml", "lrcl", lrcl("lrcl_zero2", run.lrcl_steps))]
    if not run.tiny:
        phase_b.append(("lrcl_fsdp2", "fsdp2.yaml", "lrcl", lrcl("lrcl_fsdp2", run.fsdp_steps)))
    else:
        summary["sections"]["lrcl_fsdp2"] = {
            "status": "skipped", "reason": "accelerate runs FSDP only on GPUs (on CPU it falls back to plain DDP)"}
    jobs = [start_launch(run, *spec, work) for spec in phase_b]
    for job in jobs:
        record(job["name"], lambda job=job: finish_launch(job, work, args.launch_timeout))
    if summary["sections"]["lrcl_single"]["status"] == "ok":
        jobs = [start_launch(run, "crrl_single", "single_gpu.yaml", "crrl", crrl("crrl_single"), work),
                start_launch(run, "crrl_zero2", "deepspeed_zero2.yaml", "crrl", crrl("crrl_zero2"), work),
                export_job(run, data, work)]
        for job in jobs[:2]:
            record(job["name"], lambda job=job: finish_launch(job, work, args.launch_timeout))
        record("export", lambda: finish_export(jobs[2], work, args.launch_timeout, run.items))
    else:
        for name in ("crrl_single", "crrl_zero2", "export"):
            summary["sections"][name] = {"status": "skipped", "reason": "lrcl_single (their checkpoint) failed"}
    summary["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    summary["targets"] = evaluate_targets(summary)
    write_summary(summary, output)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, s in summary["sections"].items() if s["status"] == "error"]
    print(f"[gpu_check] done in {summary['elapsed_seconds']} s; summary in {output}; failed: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
