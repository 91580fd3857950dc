"""Downstream evaluation speed (run by hand; numbers in docs/benchmarks.md, "Downstream evaluation").

    python -m benchmarks.bench_eval loss --epochs 2          # chunked softmax vs the full-logit path, same process
    python -m benchmarks.bench_eval workers --runs 4         # compare_tables with 1 vs 2 worker processes
    python -m benchmarks.bench_eval defaults                 # one `reaemb evaluate` SASRec run with its defaults on a
                                                             # synthetic 4,905-user x 2,420-item log (Amazon-Office-sized)

`loss` trains SASRec (CE, history excluded) on MovieLens-100k for the given epochs twice per path, interleaved, from
the same initialisation and batches, and reports seconds per epoch and the ratio. The reference path is what the
evaluation did before: the full (positions x catalogue) logit matrix, a history mask, F.cross_entropy.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F


def reference_loss(model, batch, cfg, num_items, gen):
    """The full-logit CE of one batch of windows (the slow path)."""
    from reaemb_trl.evaluation.losses import first_seen
    from reaemb_trl.evaluation.training import training_targets

    users = batch[1]
    inputs, targets, limit = training_targets(model, batch, cfg, gen)
    states = model(inputs)
    logits = states @ model.table.all_items().T
    logits[..., 0] = -torch.inf
    excluded = first_seen(users, num_items).unsqueeze(1) < limit.unsqueeze(2)
    excluded.scatter_(-1, targets.unsqueeze(-1), False)
    logits = logits.masked_fill(excluded, -torch.inf)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)


def bench_loss(args) -> dict:
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.data.canonical import RecDataset
    from reaemb_trl.evaluation import EvalConfig, leave_one_out
    from reaemb_trl.evaluation.models import build_model
    from reaemb_trl.evaluation.losses import proposal_log_q
    from reaemb_trl.evaluation.training import TrainingBatches, training_loss
    from reaemb_trl.evaluation.tables import build_table

    split = leave_one_out(RecDataset.load(resolve_dataset("ml-100k")))
    cfg = EvalConfig(max_len=args.max_len, batch_size=args.batch_size, hidden=args.hidden, dtype=args.dtype)
    batches = TrainingBatches(split, cfg)
    log_q = proposal_log_q(torch.tensor(split.train_interaction_counts()), "uniform")
    dtype = cfg.training_dtype()
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
    paths = {
        "full logits (before)": lambda m, b, g: reference_loss(m, b, cfg, split.num_items, g),
        "chunked softmax (now)": lambda m, b, g: training_loss(m, b, cfg, split.num_items, True, log_q, g),
    }
    seconds = {name: [] for name in paths}
    for repeat in range(args.repeats):
        for name, loss_fn in paths.items():
            torch.manual_seed(0)
            model = build_model("sasrec", build_table("id", split.item_ids, cfg.hidden), split.num_items, cfg.hidden,
                                cfg.max_len)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
            start = time.perf_counter()
            for _ in range(args.epochs):
                for batch in batches.epoch(rng):
                    with autocast:
                        loss = loss_fn(model, batch, gen)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            seconds[name].append((time.perf_counter() - start) / args.epochs)
    best = {name: min(v) for name, v in seconds.items()}
    names = list(paths)
    return {"targets_per_epoch": batches.num_targets, "seconds_per_epoch": best,
            "speedup": best[names[0]] / best[names[1]], "dtype": str(dtype), "threads": torch.get_num_threads()}


def bench_workers(args) -> dict:
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.evaluation import EvalConfig, compare_tables

    cfg = EvalConfig(max_len=args.max_len, batch_size=args.batch_size, hidden=args.hidden, max_epochs=args.epochs,
                     patience=args.epochs)
    out = {}
    for workers in (1, 2):
        start = time.perf_counter()
        compare_tables(resolve_dataset("ml-100k"), ["id"], seeds=args.runs, config=cfg, progress=False,
                       workers=workers)
        out[f"{workers} worker(s)"] = time.perf_counter() - start
    out["speedup"] = out["1 worker(s)"] / out["2 worker(s)"]
    return out


def synthetic_office(seed: int = 0, users: int = 4905, items: int = 2420, interactions: int = 53258):
    """A log with Amazon-Office-like sizes: Zipf popularity, sessions that drift through item neighbourhoods."""
    from reaemb_trl.data import RecDataset, make_item

    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8
    popularity /= popularity.sum()
    lengths = np.maximum(5, rng.geometric(1 / (interactions / users - 4), size=users) + 4)
    lengths = (lengths * interactions / lengths.sum()).round().astype(int).clip(5)
    catalogue = [make_item(f"i{k}", [("title", f"item {k}")]) for k in range(items)]
    sequences = {}
    for u, n in enumerate(lengths):
        current, seq = int(rng.choice(items, p=popularity)), []
        while len(seq) < n:
            step = current if rng.random() < 0.5 else int(rng.choice(items, p=popularity))
            current = (step + int(rng.integers(-20, 21))) % items
            if f"i{current}" not in seq:
                seq.append(f"i{current}")
        sequences[f"u{u}"] = seq
    return RecDataset(catalogue, sequences)


def bench_defaults(args) -> dict:
    from reaemb_trl.evaluation import EvalConfig, leave_one_out, train_and_evaluate

    dataset = synthetic_office()
    split = leave_one_out(dataset)
    out = {"users": len(split.users), "items": split.num_items,
           "interactions": sum(len(s) for s in dataset.sequences.values())}
    for name, cfg in (("reaemb evaluate defaults", EvalConfig()),):
        start = time.perf_counter()
        result = train_and_evaluate(split, "id", cfg, seed=0, progress=True)
        seconds = time.perf_counter() - start
        out[name] = {"seconds": seconds, "epochs": result.epochs_run, "best_epoch": result.best_epoch,
                     "seconds_per_epoch": seconds / max(result.epochs_run, 1),
                     "test_ndcg10": result.metrics["all"]["NDCG@10"]}
    return out


def main() -> None:
    from reaemb_trl.provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("loss", "workers", "defaults"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    result = {"loss": bench_loss, "workers": bench_workers, "defaults": bench_defaults}[args.what](args)
    result["provenance"] = provenance()
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
