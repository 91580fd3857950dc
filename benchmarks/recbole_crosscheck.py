"""Cross-check our ID-based SASRec against RecBole 1.2.1's SASRec on MovieLens-100k, on OUR split.

Run by hand, never in CI. RecBole is fed exactly our leave-one-out split through its benchmark files
(``ml-100k.train.inter`` / ``.valid.inter`` / ``.test.inter`` with ``item_id_list`` histories already cut,
so RecBole does no splitting, ordering or augmentation of its own and timestamp ties cannot move a
target); the script asserts that RecBole's test and validation targets, histories and history lengths
per user equal ours before anything trains. Both sides then train with matched hyperparameters (hidden
64, 2 layers, 2 heads, feed-forward width 64, dropout 0.2 on hidden / 0.0 on attention, max length 50,
Adam lr 1e-3, cross-entropy over the full catalogue, full ranking with history items kept, early
stopping on validation NDCG@10) for 3 seeds each, and the script prints test NDCG@10 / HR@10
(mean +- sample std), wall time per run and the verdict of the acceptance rule: ours is accepted when
its mean test NDCG@10 is within 10% (relative) of RecBole's, or within the two seed spreads
(|mean difference| <= std_ours + std_recbole).

RecBole's dependencies do not install beside ours, so it runs in its own venv (outside the repo; any
path), as a subprocess (``benchmarks/recbole_runner.py``). Build that venv once (CPU torch FIRST, so that
pip never pulls a CUDA build; on a machine without a local CPU wheel add
``--index-url https://download.pytorch.org/whl/cpu`` to the first install)::

    export RECBOLE_VENV=$HOME/recbole-venv   # any folder outside the repository
    python3 -m venv "$RECBOLE_VENV"
    "$RECBOLE_VENV"/bin/pip install torch==2.13.0
    "$RECBOLE_VENV"/bin/pip install recbole==1.2.1 --no-deps
    "$RECBOLE_VENV"/bin/pip install ray==2.6.3 numpy==1.26.4 pandas==2.2.3 scipy==1.13.1 \\
        scikit-learn==1.5.2 colorlog==4.7.2 colorama==0.4.4 tensorboard==2.21.0 texttable==1.7.2 \\
        psutil==7.2.2 tqdm==4.70.1 pyyaml==6.0.4 tabulate==0.10.0 thop==0.1.1.post2209072238 plotly==7.1.0
    "$RECBOLE_VENV"/bin/pip install --no-deps 'setuptools<70'   # ray 2.6.3 imports pkg_resources

(the last line re-pins what tensorboard's resolution upgraded; pip then warns that torch wants a newer
setuptools, which is harmless here). Then, from the repo root in OUR venv::

    . .venv/bin/activate
    nice -n 10 python -m benchmarks.recbole_crosscheck --recbole-python "$RECBOLE_VENV"/bin/python --threads 1

Cost on the 2-core development machine (shared, one thread per run): RecBole re-encodes every prefix of every
user, ~150 CPU-seconds per epoch and ~85 minutes per seed; ours ~4 CPU-seconds per epoch and ~5 minutes per
seed. ``--sides``, ``--seeds`` and ``--combine`` split the work over several sittings; ``--trace`` records
RecBole's validation and test metrics after every epoch (so a stopped run still leaves its curve).

It sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for RecBole (1.2.1 reloads its own checkpoints with
``torch.load``). The RecBole data files and checkpoints go to ``--workdir`` (default: a folder under
the reaemb cache, outside the repo; MovieLens-100k is research-use data and is never committed). Results:
a markdown table on stdout and everything (per-seed histories included) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "recbole_runner.py"


# ----------------------------------------------------------------------------------------------- data

def load_split():
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.data.canonical import RecDataset
    from reaemb_trl.evaluation import leave_one_out

    return leave_one_out(RecDataset.load(resolve_dataset("ml-100k")))


def _token(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"id {value!r} cannot be a RecBole token (empty or has whitespace)")
    return value


def expected_parts(split, max_len: int) -> dict[str, dict[str, tuple]]:
    """What RecBole must hold for valid/test: user -> (target, history length, history), history cut to
    the last `max_len` items (the window both models see)."""
    out = {}
    for name, part in (("valid", split.valid), ("test", split.test)):
        rows = {}
        for u, hist, target in part:
            h = [split.item_ids[i - 1] for i in hist[-max_len:]]
            rows[split.users[u]] = (split.item_ids[target - 1], len(h), h)
        out[name] = rows
    return out


def write_benchmark_files(split, folder: Path, max_len: int) -> dict[str, int]:
    """ml-100k.{train,valid,test}.inter in RecBole's sequential benchmark format (user, item_id_list, item_id).

    train: every prefix of each user's training sequence (what RecBole's own augmentation makes: targets
    seq[1..], history the up-to-`max_len` items before); valid / test: one row per evaluated user with our
    validation / test history and target."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    item = [None] + [_token(str(i)) for i in split.item_ids]
    users = [_token(str(u)) for u in split.users]

    def row(u: int, hist, target: int) -> str:
        return f"{users[u]}\t{' '.join(item[i] for i in hist[-max_len:])}\t{item[target]}\n"

    counts = {}
    parts = {
        "train": [(u, seq[max(0, j - max_len):j], seq[j]) for u, seq in enumerate(split.train)
                  for j in range(1, len(seq))],
        "valid": split.valid,
        "test": split.test,
    }
    for name, rows in parts.items():
        path = folder / f"ml-100k.{name}.inter"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(header)
            f.writelines(row(u, h, t) for u, h, t in rows)
        os.replace(tmp, path)
        counts[name] = len(rows)
    return counts


# --------------------------------------------------------------------------------------------- config

def recbole_config(args, data_path: Path, checkpoint_dir: Path) -> dict:
    return {
        # data: our split, as benchmark files; item_id_list shares item_id's index space
        "data_path": str(data_path),  # the folder holding ml-100k.{train,valid,test}.inter
        "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
        "alias_of_item_id": ["item_id_list"],
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "rm_dup_inter": None, "val_interval": None,
        # model: matched to ours
        "hidden_size": args.hidden, "n_layers": args.layers, "n_heads": args.heads,
        "inner_size": args.hidden,  # our SASRec's feed-forward width = hidden
        "hidden_dropout_prob": args.dropout, "attn_dropout_prob": 0.0,  # ours has no attention-weight dropout
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
        "loss_type": "CE", "train_neg_sample_args": None,
        # training
        "learner": "adam", "learning_rate": args.lr, "weight_decay": 0.0,
        "train_batch_size": args.recbole_batch_size, "epochs": args.max_epochs,
        "eval_step": 1,
        # RecBole stops once `stopping_step` + 1 evaluations in a row did not reach the best; we stop after
        # `patience` evaluations in a row that did not beat it: stopping_step = patience - 1 matches the count.
        "stopping_step": args.patience - 1,
        # evaluation: full ranking, history kept (RecBole's default for sequential models)
        "eval_args": {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": "full"},
        "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", "valid_metric_bigger": True,
        "metric_decimal_place": 6, "eval_batch_size": 4096,
        # environment
        "use_gpu": False, "reproducibility": True, "show_progress": False, "worker": 0,
        "checkpoint_dir": str(checkpoint_dir), "save_dataset": False, "save_dataloaders": False,
        "log_wandb": False,
    }


def our_config(args):
    import dataclasses

    from reaemb_trl.evaluation import EvalConfig

    kwargs = dict(model="sasrec", loss="ce", history="keep", table_mode="frozen", hidden=args.hidden,
                  layers=args.layers, heads=args.heads, inner_size=args.hidden, dropout=args.dropout,
                  max_len=args.max_len, lr=args.lr, batch_size=args.batch_size, max_epochs=args.max_epochs,
                  patience=args.patience)
    if "dtype" in {f.name for f in dataclasses.fields(EvalConfig)}:
        kwargs["dtype"] = "float32"  # RecBole trains in float32; "auto" would pick bf16 on CPUs that run it fast
    return EvalConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- runs

def run_recbole(args, config_path: Path, workdir: Path, extra: list[str]) -> dict:
    out = workdir / f"out-{'-'.join(extra[:2]).replace('--', '')}.json"
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": ""}
    cmd = [args.recbole_python, str(RUNNER), "--config", str(config_path), "--out", str(out),
           "--threads", str(args.threads), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"RecBole run failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.perf_counter() - t0
    return result


def check_same_split(inspected: dict, expected: dict, num_items: int) -> None:
    """Assert RecBole's parsed valid/test rows equal our split: per user, same target, same history
    length (the window the model sees) and same history items."""
    assert inspected["num_items"] == num_items, (inspected["num_items"], num_items)
    for name in ("valid", "test"):
        got = {u: (t, n, h) for u, t, n, h in inspected[name]}
        assert len(got) == len(inspected[name]), f"{name}: a user appears twice in RecBole's rows"
        want = {u: (t, n, list(h)) for u, (t, n, h) in expected[name].items()}
        assert got.keys() == want.keys(), f"{name}: users differ ({len(got)} vs {len(want)})"
        bad = [u for u in want if got[u] != want[u]]
        assert not bad, f"{name}: {len(bad)} users differ, e.g. {bad[0]}: RecBole {got[bad[0]]} vs ours {want[bad[0]]}"


def run_ours(args, split, seed: int) -> dict:
    import torch

    from reaemb_trl.evaluation import train_and_evaluate

    torch.set_num_threads(args.threads)
    cfg = our_config(args)
    t0 = time.perf_counter()
    run = train_and_evaluate(split, "id", cfg, seed=seed, progress=False)
    wall = time.perf_counter() - t0
    return {"seed": seed, "test": {"ndcg@10": run.metrics["all"]["NDCG@10"], "hit@10": run.metrics["all"]["HR@10"]},
            "best_valid_ndcg10": run.best_valid_ndcg10, "best_epoch": run.best_epoch, "epochs_run": run.epochs_run,
            "history": list(run.history), "threads": torch.get_num_threads(), "wall_s": wall,
            "config": cfg.as_dict() if hasattr(cfg, "as_dict") else repr(cfg)}


# ------------------------------------------------------------------------------------------- summary

def mean_std(values) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def verdict(ours: list[float], recbole: list[float]) -> dict:
    mo, so = mean_std(ours)
    mr, sr = mean_std(recbole)
    rel = (mo - mr) / mr
    within_rel = abs(rel) <= 0.10
    within_spread = abs(mo - mr) <= (so if so == so else 0.0) + (sr if sr == sr else 0.0)
    return {"ours_mean": mo, "ours_std": so, "recbole_mean": mr, "recbole_std": sr, "relative_diff": rel,
            "within_10pct": within_rel, "within_seed_spreads": within_spread, "accepted": within_rel or within_spread}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    except OSError:
        name = platform.processor() or "?"
    return f"{name}, {os.cpu_count()} cores"


def render(results: dict) -> str:
    lines = ["| side | seed | test NDCG@10 | test HR@10 | best epoch | epochs run | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for side in ("recbole", "ours"):
        for r in results[side]:
            lines.append(f"| {side} | {r['seed']} | {r['test']['ndcg@10']:.4f} | {r['test']['hit@10']:.4f} | "
                         f"{r['best_epoch']} | {r['epochs_run']} | {r['wall_s']:.0f} |")
    for side in ("recbole", "ours"):
        if results[side]:
            n_m, n_s = mean_std([r["test"]["ndcg@10"] for r in results[side]])
            h_m, h_s = mean_std([r["test"]["hit@10"] for r in results[side]])
            w = statistics.fmean(r["wall_s"] for r in results[side])
            lines.append(f"| **{side}** | mean +- std | **{n_m:.4f} +- {n_s:.4f}** | {h_m:.4f} +- {h_s:.4f} | | | "
                         f"{w:.0f} |")
    v = results.get("verdict")
    n_rb, n_ours = len(results["recbole"]), len(results["ours"])
    if v:
        lines.append("")
        lines.append(f"NDCG@10 relative difference (ours - RecBole) / RecBole: {v['relative_diff']:+.1%}; "
                     f"within 10%: {v['within_10pct']}; within the seed spreads: {v['within_seed_spreads']}; "
                     f"**{'ACCEPTED' if v['accepted'] else 'NOT ACCEPTED'}**"
                     + (f" (provisional: {n_rb} RecBole seed(s) and {n_ours} of ours; the rule wants 3 each)"
                        if min(n_rb, n_ours) < 3 else ""))
        hv = results["verdict_hr10"]
        lines.append(f"HR@10 relative difference: {hv['relative_diff']:+.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recbole-python", default=os.environ.get("RECBOLE_PYTHON"),
                        help="python of RecBole's venv (or $RECBOLE_PYTHON)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sides", nargs="+", choices=("recbole", "ours"), default=["recbole", "ours"])
    parser.add_argument("--workdir", type=Path, help="RecBole data/checkpoints (default: under the reaemb cache)")
    parser.add_argument("--out", type=Path, default=Path("outputs/recbole_crosscheck.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10,
                        help="validation evaluations without a new best before stopping (both sides)")
    # Both sides see every training transition once per epoch (RecBole: one row per prefix; ours: consecutive
    # windows of max_len + 1 items, 2,412 of them on ML-100k). 2048 rows (RecBole's default) and 50 windows give
    # both about 2,000 transitions per update and 48-49 updates per epoch.
    parser.add_argument("--batch-size", type=int, default=50, help="ours: training windows per update")
    parser.add_argument("--recbole-batch-size", type=int, default=2048,
                        help="RecBole: (history, target) rows per update (RecBole's default)")
    parser.add_argument("--trace", action="store_true",
                        help="RecBole: also test every epoch, one JSON line per epoch under --workdir (diagnostics)")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="no runs: merge the runs of earlier --out files (e.g. the sides run apart) and report")
    parser.add_argument("--check-only", action="store_true", help="write the files, check the split, stop")
    args = parser.parse_args(argv)

    if args.combine:
        results = {"recbole": [], "ours": [], "combined_from": [str(p) for p in args.combine]}
        for path in args.combine:
            part = json.loads(path.read_text())
            results["machine"] = part.get("machine", "?")
            for side in ("recbole", "ours"):
                results[side] += part.get(side, [])
        return report(results, args)

    from reaemb_trl.assets import cache_dir

    workdir = (args.workdir or cache_dir() / "recbole-crosscheck").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    split = load_split()
    results: dict = {"machine": machine(), "python": sys.version.split()[0], "args": {k: str(v) for k, v in
                                                                                      vars(args).items()},
                     "recbole": [], "ours": []}

    if "recbole" in args.sides:
        if not args.recbole_python:
            parser.error("--recbole-python (RecBole's venv interpreter) is needed for the RecBole side")
        counts = write_benchmark_files(split, workdir / "ml-100k", args.max_len)
        print(f"[crosscheck] benchmark files in {workdir / 'ml-100k'}: {counts}", file=sys.stderr)
        config_path = workdir / "recbole_config.json"
        config_path.write_text(json.dumps(recbole_config(args, workdir / "ml-100k", workdir / "saved"), indent=1))
        inspected = run_recbole(args, config_path, workdir, ["--inspect"])
        check_same_split(inspected, expected_parts(split, args.max_len), split.num_items)
        assert inspected["train_rows"] == counts["train"], (inspected["train_rows"], counts["train"])
        print(f"[crosscheck] RecBole's valid/test targets, histories and history lengths equal ours "
              f"({len(inspected['test'])} users, {inspected['num_items']} items, "
              f"{inspected['train_rows']} training rows)", file=sys.stderr)
        results["recbole_train_rows"] = inspected["train_rows"]
        if args.check_only:
            return 0
        for seed in args.seeds:
            extra = ["--seed", str(seed)]
            if args.trace:
                trace = workdir / f"trace-seed-{seed}.jsonl"
                trace.unlink(missing_ok=True)
                extra += ["--trace", str(trace)]
                print(f"[crosscheck] per-epoch trace: {trace}", file=sys.stderr)
            r = run_recbole(args, config_path, workdir, extra)
            results["recbole"].append(r)
            print(f"[crosscheck] recbole seed {seed}: NDCG@10 {r['test']['ndcg@10']:.4f} HR@10 "
                  f"{r['test']['hit@10']:.4f} best epoch {r['best_epoch']}/{r['epochs_run']} {r['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
    if "ours" in args.sides:
        for seed in args.seeds:
            r = run_ours(args, split, seed)
            results["ours"].append(r)
            print(f"[crosscheck] ours seed {seed}: NDCG@10 {r['test']['ndcg@10']:.4f} HR@10 "
                  f"{r['test']['hit@10']:.4f} best epoch {r['best_epoch']}/{r['epochs_run']} {r['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
    return report(results, args)


def report(results: dict, args) -> int:
    if results["recbole"] and results["ours"]:
        results["verdict"] = verdict([r["test"]["ndcg@10"] for r in results["ours"]],
                                     [r["test"]["ndcg@10"] for r in results["recbole"]])
        results["verdict_hr10"] = verdict([r["test"]["hit@10"] for r in results["ours"]],
                                          [r["test"]["hit@10"] for r in results["recbole"]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    threads = sorted({r.get("threads") for side in ("recbole", "ours") for r in results[side]} - {None})
    print(f"Machine: {results['machine']}; torch threads per run: {threads}")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
