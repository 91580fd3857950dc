"""Rows added to a finished quickstart's comparison: same split, cold items and seeds, tested against its own runs.

Two kinds of row, each trained over the quickstart's seeds with its evaluation settings:
- `--id-dropout P`: the hybrid of each of the quickstart's tables trained with ID dropout (`EvalConfig.id_dropout`:
  each item's ID row left out of a training step with probability P, so the model also learns to place items from
  their table row alone), tested against the quickstart's plain hybrid of the same table and against id;
- `--frozen NAME=FILE` (repeatable): a further table file in frozen mode (every catalogue item needs a row, cold
  items included), tested against id, raw and LRCL.

Paired Wilcoxon tests over the test users (per-user NDCG@10 averaged over seeds), Holm-corrected within each user
group over this script's pairs: the same statistics as the quickstart's report. `--rank-profile` adds where each
row puts the targets of each group (median rank, share in the top 10 and top 50, and how popular in the whole log
the targets it puts in the top 10 are), which separates a row that places a group's targets a little better
everywhere from one that puts a few of them first.

    python -m experiments.quickstart_rows runs/quickstart --id-dropout 0.3 --output runs/quickstart/id_dropout0.3.json
    python -m experiments.quickstart_rows runs/quickstart --frozen eos=runs/abl/thought_eos_item_keys/lrcl.safetensors \
        --rank-profile --output runs/quickstart/frozen_rows.json

Finished runs are kept (OUTPUT_DIR/eval_id_dropout<P>/runs, OUTPUT_DIR/eval_frozen_rows/runs): a re-run resumes,
and a row added later reuses the others.
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


def present_groups(masks: dict) -> dict[str, np.ndarray]:
    """The report's user groups that this split has users in, in GROUPS order (an empty group has no test)."""
    return {g: masks[g] for g in GROUPS if g in masks and masks[g].any()}


def rank_profile(ranks, mask: np.ndarray, popularity: np.ndarray) -> dict:
    """Where a row puts one group's targets over all seeds: median rank, share in the top 10 and the top 50, and
    the median popularity in the whole log (`popularity`, per user: its target's count, cold items' removed
    interactions included) of the targets it puts in the top 10, beside that of all the group's targets."""
    chosen = np.asarray(ranks, dtype=np.float64)[:, mask]
    hits = np.broadcast_to(popularity[mask], chosen.shape)[chosen <= 10]
    return {"median_rank": float(np.median(chosen)), "top10": float((chosen <= 10).mean()),
            "top50": float((chosen <= 50).mean()),
            "hit_popularity": float(np.median(hits)) if hits.size else float("nan"),
            "group_popularity": float(np.median(popularity[mask]))}


def first_value(attributes) -> str:
    """An item's first attribute value (the title, for MovieLens), whatever the attribute layout."""
    from reaemb_trl.prompt import normalise_attributes

    pairs = normalise_attributes(attributes)
    return str(pairs[0][1]) if pairs else ""


def main() -> None:
    from reaemb_trl.data.canonical import RecDataset
    from reaemb_trl.data.cold import cold_item_ids
    from reaemb_trl.evaluation import EvalConfig, TableSpec, compare_tables
    from reaemb_trl.evaluation.significance import paired_tests
    from reaemb_trl.evaluation.split import group_masks, leave_one_out
    from reaemb_trl.quickstart import QuickstartSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("quickstart", type=Path, help="a finished quickstart's output folder")
    parser.add_argument("--id-dropout", type=float, default=None, help="hybrid rows with this ID dropout")
    parser.add_argument("--frozen", action="append", default=[], metavar="NAME=FILE",
                        help="a further table file in frozen mode (repeatable)")
    parser.add_argument("--rank-profile", action="store_true", help="also print where each row ranks each group")
    parser.add_argument("--show-hits", choices=GROUPS, default=None,
                        help="also list this group's users that some row puts in its top 10: each row's ranks over "
                             "the seeds, the user's last item and the target")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    frozen = dict(entry.split("=", 1) for entry in args.frozen if "=" in entry)
    if len(frozen) != len(args.frozen) or not all(frozen.values()):
        parser.error("--frozen takes NAME=FILE")
    clash = sorted(set(frozen) & {"mostpop", "id", *TABLES, "reference"})
    if clash:
        parser.error(f"--frozen names {clash} are the quickstart's own rows: choose other names")
    if args.id_dropout is None and not frozen:
        parser.error("nothing to add: give --id-dropout and/or --frozen")

    saved = json.loads((args.quickstart / "quickstart_settings.json").read_text())
    settings = QuickstartSettings(**(saved | {"output": args.quickstart}))
    seeds = list(range(settings.eval_seeds))
    config = EvalConfig(**{"device": settings.device, **settings.evaluation, "cold_items": settings.cold_items,
                           "cold_item_seed": settings.cold_item_seed})
    data = RecDataset.load(args.quickstart / "data")
    ranks = dict(np.load(args.quickstart / "eval" / "test_ranks.npz"))
    names, pairs, best_epochs = ["id"], [], {}

    if args.id_dropout is not None:
        dropout_config = EvalConfig(**{**config.__dict__, "id_dropout": args.id_dropout})
        specs = [TableSpec(f"{name}@hybrid", str(args.quickstart / "tables" / f"{name}.safetensors"), "hybrid")
                 for name in TABLES]
        runs_dir = args.quickstart / f"eval_id_dropout{args.id_dropout:g}" / "runs"
        dropped = compare_tables(data, specs, seeds, dropout_config, baseline_pairs=False, workers=args.workers,
                                 runs_dir=runs_dir)
        for name in TABLES:
            ranks[f"{name}@hybrid+drop"] = dropped["tables"][f"{name}@hybrid"]["test_ranks"]
            best_epochs[f"{name}@hybrid+drop"] = dropped["tables"][f"{name}@hybrid"]["best_epochs"]
        names += [f"{t}@hybrid" for t in TABLES] + [f"{t}@hybrid+drop" for t in TABLES]
        pairs += [(f"{t}@hybrid+drop", other) for t in TABLES for other in (f"{t}@hybrid", "id")]
    if frozen:
        specs = [TableSpec(name, path, "frozen") for name, path in frozen.items()]
        added = compare_tables(data, specs, seeds, config, baseline_pairs=False, workers=args.workers,
                               runs_dir=args.quickstart / "eval_frozen_rows" / "runs")
        for name in frozen:
            ranks[name] = added["tables"][name]["test_ranks"]
            best_epochs[name] = added["tables"][name]["best_epochs"]
        names += ["raw", "lrcl", *frozen]
        pairs += [(name, other) for name in frozen for other in ("id", "raw", "lrcl")]
    names = list(dict.fromkeys(names))

    split = leave_one_out(data, cold_item_ids(data.item_ids, settings.cold_items, settings.cold_item_seed))
    masks = group_masks(split, split.test, config.tail_user_threshold, config.tail_item_threshold)
    users = {name: per_user_ndcg(ranks[name]) for name in names}
    present = present_groups(masks)
    tests = paired_tests(users, pairs, present)  # the quickstart report's statistics, Holm within each group
    groups = list(present)

    def shown(name: str) -> str:
        if name.endswith("+drop"):
            return label(name.removesuffix("+drop")) + f", ID dropout {args.id_dropout:g}"
        return label(name) if name not in frozen else f"{name} (frozen, {frozen[name]})"

    print(f"\nNDCG@10, mean over seeds {seeds}, rows added to {args.quickstart}'s comparison\n")
    print("| table | " + " | ".join(f"{g} ({int(masks[g].sum())})" for g in groups) + " |")
    print("|---|" + "---:|" * len(groups))
    for name in names:
        print(f"| {shown(name)} | " + " | ".join(f"{users[name][masks[g]].mean():.4f}" for g in groups) + " |")
    profiles = {}
    if args.rank_profile:
        counts = {}
        for sequence in data.sequences.values():
            for item in sequence:
                counts[item] = counts.get(item, 0) + 1
        popularity = np.array([counts.get(split.item_ids[target - 1], 0) for _, _, target in split.test])
        profiles = {name: {g: rank_profile(ranks[name], masks[g], popularity) for g in groups} for name in names}
        print("\nWhere each row ranks each group's targets: median rank / share in the top 10 / in the top 50 / "
              "median popularity in the whole log of the targets in the top 10 (of all the group's targets)\n")
        print("| table | " + " | ".join(groups) + " |")
        print("|---|" + "---:|" * len(groups))
        for name in names:
            print(f"| {shown(name)} | " + " | ".join(
                f"{profiles[name][g]['median_rank']:.0f} / {profiles[name][g]['top10']:.3f} / "
                f"{profiles[name][g]['top50']:.3f} / {profiles[name][g]['hit_popularity']:.0f} "
                f"({profiles[name][g]['group_popularity']:.0f})" for g in groups) + " |")
    if args.show_hits:
        titles = {item["item_id"]: first_value(item["attributes"]) for item in data.items}
        print(f"\nUsers of group {args.show_hits} with a top-10 hit: ranks per seed ({', '.join(names)}); last "
              "item -> target\n")
        for user in np.flatnonzero(masks[args.show_hits]):
            per_row = [np.asarray(ranks[name])[:, user] for name in names]
            if any((r <= 10).any() for r in per_row):
                _, history, target = split.test[user]
                print("- " + "; ".join("/".join(map(str, r.tolist())) for r in per_row) + ": "
                      f"{titles[split.item_ids[history[-1] - 1]]} -> {titles[split.item_ids[target - 1]]}")
    print()
    for t in tests:
        print(f"- {t['a']} vs {t['b']} ({t['group']}): {t['mean_a']:.4f} vs {t['mean_b']:.4f}, "
              f"p = {t['p']:.2g}, Holm p = {t['p_holm']:.2g} ({t['differing_users']} users differ)")
    if args.output:
        args.output.write_text(json.dumps({
            "id_dropout": args.id_dropout, "frozen": frozen, "seeds": seeds, "tests": tests,
            "means": {n: {g: float(users[n][masks[g]].mean()) for g in groups} for n in names},
            "rank_profile": profiles, "best_epochs": best_epochs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
