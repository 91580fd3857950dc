"""The whole pipeline over 3 seeds: retrain LRCL and CRRL with the quickstart's settings and seeds 0, 1, 2, export
each seed's tables and evaluate them downstream, so claims rest on the variance of the whole pipeline, not only
on the downstream model's seeds.

    python -m experiments.multiseed --output runs/multiseed                  # ~3 quickstarts of CPU time
    python -m experiments.multiseed --output runs/multiseed --seeds 0 1 2 --downstream-seeds 3

For every pipeline seed s the tables raw, lrcl-s and crrl-s (frozen and hybrid) are evaluated with the quickstart's
protocol over `--downstream-seeds` downstream seeds; the paired tests (Wilcoxon + Holm over users) compare
lrcl-s with raw and crrl-s with lrcl-s for each s. The summary reports, per table kind, the mean and sample std over
pipeline seeds of the test NDCG@10 (overall and on tail items), and how many pipeline seeds reach a significant
difference in each direction. Writes OUTPUT/multiseed.json and OUTPUT/multiseed.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from experiments.pipeline import base_settings, downstream, fmt, load_data, run_crrl, run_lrcl, table_of, write_json

GROUPS = ("all", "tail_item", "head_item")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="pipeline (LRCL + CRRL) seeds")
    parser.add_argument("--downstream-seeds", type=int, default=3)
    parser.add_argument("--modes", nargs="*", default=["frozen", "hybrid"])
    args = parser.parse_args()

    data = load_data(base_settings(args.output / "shared"))
    tables, compare, runs = {}, [], {}
    for seed in args.seeds:
        settings = base_settings(args.output / f"seed{seed}", seed)
        runs[seed] = {"lrcl": run_lrcl(settings, data), "crrl": run_crrl(settings, data)}
        if "raw" not in tables:
            tables["raw"] = table_of(settings.output / "lrcl", data, args.output / "raw.safetensors", settings,
                                     without_thought=True)
        tables[f"lrcl-{seed}"] = table_of(settings.output / "lrcl", data, settings.output / "lrcl.safetensors", settings)
        tables[f"crrl-{seed}"] = table_of(settings.output / "crrl", data, settings.output / "crrl.safetensors", settings)
        for mode in args.modes:
            suffix = "" if mode == "frozen" else f"@{mode}"
            compare += [f"lrcl-{seed}{suffix}:raw{suffix}", f"crrl-{seed}{suffix}:lrcl-{seed}{suffix}"]
    settings = base_settings(args.output / "shared")
    # Only the stage comparisons form the Holm family (a family with every table against ids would be larger).
    results = downstream(tables, data, settings, seeds=args.downstream_seeds, modes=args.modes, compare=compare,
                         baseline_pairs=False)
    write_json(args.output / "results.json", {k: v for k, v in results.items()})

    summary = {}
    for mode in args.modes:
        suffix = "" if mode == "frozen" else f"@{mode}"
        for kind in ("raw", "lrcl", "crrl"):
            names = [f"raw{suffix}"] if kind == "raw" else [f"{kind}-{s}{suffix}" for s in args.seeds]
            entry = {}
            for group in GROUPS:
                means = [results["tables"][n]["groups"][group]["NDCG@10"]["mean"] for n in names]
                entry[group] = (statistics.mean(means), statistics.stdev(means) if len(means) > 1 else 0.0,
                                results["tables"][names[0]]["groups"][group]["size"])
            summary[f"{kind}{suffix}"] = entry
    verdicts = {}
    for row in results["comparisons"]:
        if row["group"] not in GROUPS or ":" in row["a"]:
            continue
        a, b = row["a"], row["b"]
        kind = None
        if a.startswith("lrcl-") and b.startswith("raw"):
            kind = "lrcl vs raw"
        elif a.startswith("crrl-") and b.startswith("lrcl-"):
            kind = "crrl vs lrcl"
        if kind is None:
            continue
        mode = "hybrid" if "@hybrid" in a else "frozen"
        tally = verdicts.setdefault((kind, mode, row["group"]), {"better": 0, "worse": 0, "n.s.": 0, "p_holm": []})
        tally["better" if row["significant"] and row["diff"] > 0 else "worse" if row["significant"] else "n.s."] += 1
        tally["p_holm"].append(row["p_holm"])
    write_json(args.output / "multiseed.json", {"runs": runs, "summary": summary,
                                                "verdicts": {" / ".join(k): v for k, v in verdicts.items()}})

    lines = [f"Pipeline seeds {args.seeds} (LRCL + CRRL retrained per seed), {args.downstream_seeds} downstream "
             "seeds each; test NDCG@10, mean ± sample std over pipeline seeds.", "",
             "| table | " + " | ".join(f"{g} (users)" for g in GROUPS) + " |", "|---|" + "---:|" * len(GROUPS)]
    for name, entry in summary.items():
        cells = [f"{fmt(m, s)} ({n})" for m, s, n in (entry[g] for g in GROUPS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| comparison | mode | group | pipeline seeds better / worse / n.s. (Holm p < 0.05) | Holm p per seed |",
              "|---|---|---|---|---|"]
    for (kind, mode, group), t in sorted(verdicts.items()):
        ps = ", ".join(f"{p:.3g}" for p in t["p_holm"])
        lines.append(f"| {kind} | {mode} | {group} | {t['better']} / {t['worse']} / {t['n.s.']} | {ps} |")
    text = "\n".join(lines) + "\n"
    (args.output / "multiseed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
