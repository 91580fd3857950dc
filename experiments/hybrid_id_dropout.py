"""Hybrid tables with ID dropout against the plain hybrid, on a finished quickstart's split and seeds.

The quickstart's hybrid rows (ids + adapter(table)) rank cold items near the bottom: the model leans on the learned
ID rows, and a cold item has none. `EvalConfig.id_dropout` leaves each item's ID row out of a training step with
that probability, so the model also learns to place items from their table row alone. This script trains the hybrid
of each table with ID dropout over the quickstart's seeds, with its evaluation settings, and tests each against the
quickstart's own plain hybrid and id runs of the same seeds (paired Wilcoxon over the test users, per-user NDCG@10
averaged over seeds, Holm-corrected within each user group; the same statistics as the quickstart's report):

    python -m experiments.hybrid_id_dropout runs/quickstart --id-dropout 0.3 --output id_dropout.json

Finished runs are kept in OUTPUT_DIR/eval_id_dropout<p>/runs (a re-run resumes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.quickstart_table import label

TABLES = ("raw", "lrcl", "crrl")
GROUPS = ("all", "cold_item", "tail_item", "head_item")


def per_user_ndcg(ranks) -> np.ndarray:
    from reaemb_trl.evaluation.significance import ndcg_at

    return ndcg_at(np.asarray(ranks)).mean(axis=0)  # (seeds, users) -> users


def main() -> None:
    from reaemb_trl.data.canonical import RecDataset
    from reaemb_trl.data.cold import cold_item_ids
    from reaemb_trl.evaluation import EvalConfig, TableSpec, compare_tables
    from reaemb_trl.evaluation.significance import holm, wilcoxon_signed_rank
    from reaemb_trl.evaluation.split import group_masks, leave_one_out
    from reaemb_trl.quickstart import QuickstartSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("quickstart", type=Path, help="a finished quickstart's output folder")
    parser.add_argument("--id-dropout", type=float, default=0.3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    saved = json.loads((args.quickstart / "quickstart_settings.json").read_text())
    settings = QuickstartSettings(**(saved | {"output": args.quickstart}))
    finished = json.loads((args.quickstart / "eval" / "results.json").read_text())
    seeds = list(range(settings.eval_seeds))
    config = EvalConfig(**{"device": settings.device, **settings.evaluation, "cold_items": settings.cold_items,
                           "cold_item_seed": settings.cold_item_seed, "id_dropout": args.id_dropout})
    data = RecDataset.load(args.quickstart / "data")
    specs = [TableSpec(f"{name}@hybrid", str(args.quickstart / "tables" / f"{name}.safetensors"), "hybrid")
             for name in TABLES]
    runs_dir = args.quickstart / f"eval_id_dropout{args.id_dropout:g}" / "runs"
    dropped = compare_tables(data, specs, seeds, config, baseline_pairs=False, workers=args.workers,
                             runs_dir=runs_dir)

    split = leave_one_out(data, cold_item_ids(data.item_ids, settings.cold_items, settings.cold_item_seed))
    masks = group_masks(split, split.test, config.tail_user_threshold, config.tail_item_threshold)
    ranks = np.load(args.quickstart / "eval" / "test_ranks.npz")
    users = {name: per_user_ndcg(ranks[name]) for name in ("id", *[f"{t}@hybrid" for t in TABLES])}
    users |= {f"{t}@hybrid+drop": per_user_ndcg(dropped["tables"][f"{t}@hybrid"]["test_ranks"]) for t in TABLES}
    pairs = [(f"{t}@hybrid+drop", other) for t in TABLES for other in (f"{t}@hybrid", "id")]
    tests = []
    for group in GROUPS:
        if group not in masks or not masks[group].any():
            continue
        mask = masks[group]
        found = [wilcoxon_signed_rank(users[a][mask], users[b][mask]) for a, b in pairs]
        for (a, b), (_, p, differing), p_holm in zip(pairs, found, holm([f[1] for f in found])):
            tests.append({"a": a, "b": b, "group": group, "users": int(mask.sum()), "differing_users": differing,
                          "mean_a": float(users[a][mask].mean()), "mean_b": float(users[b][mask].mean()), "p": p,
                          "p_holm": p_holm})

    names = ["id", *[f"{t}@hybrid" for t in TABLES], *[f"{t}@hybrid+drop" for t in TABLES]]
    print(f"\nNDCG@10, mean over seeds {seeds} (hybrid with ID dropout {args.id_dropout:g} vs the quickstart's runs)\n")
    print("| table | " + " | ".join(f"{g} ({int(masks[g].sum())})" for g in GROUPS if g in masks) + " |")
    print("|---|" + "---:|" * sum(g in masks for g in GROUPS))
    for name in names:
        shown = label(name.removesuffix("+drop")) + (f", ID dropout {args.id_dropout:g}" if name.endswith("+drop") else "")
        print(f"| {shown} | " + " | ".join(f"{users[name][masks[g]].mean():.4f}" for g in GROUPS if g in masks) + " |")
    print()
    for t in tests:
        print(f"- {t['a']} vs {t['b']} ({t['group']}): {t['mean_a']:.4f} vs {t['mean_b']:.4f}, "
              f"Holm p = {t['p_holm']:.2g} ({t['differing_users']} users differ)")
    best_epochs = {name: table["best_epochs"] for name, table in dropped["tables"].items()}
    if args.output:
        args.output.write_text(json.dumps({"id_dropout": args.id_dropout, "seeds": seeds, "tests": tests,
                                           "means": {n: {g: float(users[n][masks[g]].mean()) for g in GROUPS
                                                         if g in masks} for n in names},
                                           "best_epochs": best_epochs,
                                           "quickstart_wall_seconds": finished.get("wall_seconds")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
