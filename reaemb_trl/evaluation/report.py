"""Aggregate runs over seeds, run the paired tests, and write results.json, results.md, ndcg10.png and the
per-user test ranks (test_ranks.npz) as one set."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
from pathlib import Path

import numpy as np

from reaemb_trl.evaluation.config import FIXED_TABLES
from reaemb_trl.evaluation.ensemble import ensemble_parts
from reaemb_trl.evaluation.significance import default_pairs, ndcg_at, paired_tests, verdict
from reaemb_trl.evaluation.split import group_masks

GROUP_LABELS = {"all": "all", "tail_user": "tail users", "head_user": "head users",
                "tail_item": "tail items", "head_item": "head items", "cold_item": "cold items"}
RANKS_FILE = "test_ranks.npz"


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def history_sentence(results: dict) -> str:
    rule, requested = results["history"], results.get("history_requested", results["history"])
    why = ""
    if requested == "auto":
        why = " (auto: no sequence repeats an item)" if rule == "exclude" else " (auto: some sequences repeat items)"
    if rule == "exclude":
        return f"History excluded{why}: a user's earlier items are neither ranked nor trained on as candidates."
    return f"History kept{why}: a user's earlier items stay candidates in training and ranking."


def cold_items_note(split, config) -> dict | None:
    """What results.json says about the cold items (None without them)."""
    if not split.cold:
        return None
    count = len(split.cold)
    return {"share": config.cold_items, "seed": config.cold_item_seed, "count": count,
            "item_ids": [split.item_ids[i - 1] for i in split.cold],
            "note": f"{count} of {split.num_items} items are cold (share {config.cold_items}, seed "
                    f"{config.cold_item_seed}): their interactions were removed from every training sequence and "
                    "validation history, and no model saw them as a training candidate. The id model ranks them "
                    "from its untrained, randomly initialised rows (hybrid: those rows plus the table's view), the "
                    "table modes from their text; MostPop gives them training popularity 0. Group `cold items`: "
                    "users whose test target is cold."}


def ensemble_sentence(name: str, table: dict) -> str:
    weights = ", ".join(f"{w:g}" for w in table["ensemble_weights"])
    return (f"{name}: score ensemble of id and {table['ensemble_of'][1]} (per user z-scored scores, (1 - w) id + "
            f"w table, w chosen on validation from 0, 0.1, ..., 1; per seed w = {weights}).")


def aggregate(runs: dict, config, split, specs, compare=(), baseline_pairs: bool = True) -> dict:
    """runs: {table name: [RunResult, ...]} -> the results dict (per table and group: mean, sample std and
    per-seed values with the group size; paired tests; provenance)."""
    from reaemb_trl.provenance import provenance

    by_name = {spec.name: spec for spec in specs}
    ensembles = ensemble_parts(specs)
    out = {
        "model": config.model, "protocol": config.protocol, "loss": config.loss,
        "history": split.resolve_history(config.history), "history_requested": config.history,
        "seeds_note": "Seeds vary the downstream model (initialisation, batch order, negatives, dropout); "
                      "each item table was trained once and is the same in every seed. MostPop is deterministic.",
        "config": config.as_dict(), "provenance": provenance(), "tables": {},
        "test_users": [split.users[u] for u, _, _ in split.test],
    }
    cold = cold_items_note(split, config)
    if cold is not None:
        out["cold_items"] = cold
    per_user = {}
    for name, results in runs.items():
        groups = {}
        for group, size in results[0].group_sizes.items():
            entry = {"size": size}
            for metric in results[0].metrics[group]:
                values = [r.metrics[group][metric] for r in results]
                finite = [v for v in values if not math.isnan(v)]
                entry[metric] = {
                    "mean": _clean(float(np.mean(finite))) if finite else None,
                    # sample std (ddof=1) over seeds; 0 with a single seed
                    "std": (float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0) if finite else None,
                    "values": [_clean(v) for v in values],
                }
            groups[group] = entry
        spec = by_name[name]
        out["tables"][name] = {
            "source": spec.source, "mode": None if spec.source in FIXED_TABLES else spec.mode,
            "seeds": [r.seed for r in results], "best_epochs": [r.best_epoch for r in results],
            "epochs_run": [r.epochs_run for r in results], "seconds": [r.seconds for r in results],
            "valid_ndcg10": [_clean(r.best_valid_ndcg10) for r in results],  # the early-stopping (validation) score
            "groups": groups, "test_ranks": [r.test_ranks for r in results],
        }
        if name in ensembles:
            out["tables"][name].update(ensemble_of=[part.name for part in ensembles[name]],
                                       ensemble_weights=[r.ensemble_weight for r in results],
                                       valid_ndcg10_per_weight=[r.history for r in results])
        per_user[name] = ndcg_at(np.array([r.test_ranks for r in results])).mean(axis=0)
    masks = group_masks(split, split.test, config.tail_user_threshold, config.tail_item_threshold)
    pairs = default_pairs(list(runs), compare, baseline_pairs, references=list(ensembles))
    out["comparisons"] = paired_tests(per_user, pairs, {g: m for g, m in masks.items() if m.any()})
    out["wall_seconds"] = round(sum(s for t in out["tables"].values() for s in t["seconds"]), 1)
    return out


def render_markdown(results: dict, metrics=("HR@10", "NDCG@10"), groups=None) -> str:
    """The results table (one row per table and group, "mean ± std" over seeds), the paired tests and one verdict
    line per comparison on all users. A value measured once (one seed, MostPop) has no std: "n/a"."""
    metrics = list(metrics)
    lines = [f"# {results['model']}: {results['protocol']} ranking, {results.get('loss', 'bce')} loss", "",
             history_sentence(results) if "history" in results else "", results.get("seeds_note", ""), "",
             "| table | group | users | " + " | ".join(metrics) + " |",
             "|---|---|---:|" + "---:|" * len(metrics)]
    for name, table in results["tables"].items():
        for group, entry in table["groups"].items():
            if groups is not None and group not in groups:
                continue
            cells = []
            for metric in metrics:
                m = entry.get(metric, {})
                cells.append(_mean_std(m))
            lines.append(f"| {name} | {GROUP_LABELS.get(group, group)} | {entry['size']} | " + " | ".join(cells) + " |")
    notes = [results["cold_items"]["note"]] if results.get("cold_items") else []
    notes += [ensemble_sentence(name, table) for name, table in results["tables"].items()
              if "ensemble_weights" in table]
    if notes:
        lines += [""] + notes
    comparisons = results.get("comparisons") or []
    if comparisons:
        lines += ["", "## Paired tests", "",
                  "Wilcoxon signed-rank on per-user NDCG@10 (averaged over seeds), two-sided; Holm-corrected over "
                  "the comparisons of each user group. * = significant at 0.05 after correction.", "",
                  "| A vs B | group | users | NDCG@10 A | NDCG@10 B | A - B | p | p (Holm) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in comparisons:
            if groups is not None and row["group"] not in groups:
                continue
            mark = " *" if row["significant"] else ""
            lines.append(f"| {row['a']} vs {row['b']} | {GROUP_LABELS.get(row['group'], row['group'])} | "
                         f"{row['users']} | {row['mean_a']:.4f} | {row['mean_b']:.4f} | {row['diff']:+.4f} | "
                         f"{row['p']:.3g} | {row['p_holm']:.3g}{mark} |")
        lines += ["", "Verdicts (all users):", ""]
        lines += [f"- {verdict(row)}" for row in comparisons if row["group"] == "all"]
    prov = results.get("provenance")
    if prov:
        cpu = prov["cpu"]
        lines += ["", f"Made with commit {prov['commit']}, torch {prov['packages'].get('torch')}, "
                      f"{cpu['model']} ({', '.join(cpu['flags']) or 'no bf16 flags'}), "
                      f"{prov['torch_threads']} threads{', GPU ' + ', '.join(prov['gpu']) if prov['gpu'] else ''}; "
                      f"{results.get('wall_seconds', 0):.0f} s of training and ranking."]
    return "\n".join(lines) + "\n"


def _mean_std(entry: dict) -> str:
    """"mean ± std"; "n/a" for an empty group; "mean ± n/a" for a single measured value (no spread to show)."""
    if entry.get("mean") is None:
        return "n/a"
    values = entry.get("values")
    single = values is not None and sum(v is not None for v in values) < 2
    return f"{entry['mean']:.4f} ± " + ("n/a" if single else f"{entry['std']:.4f}")


def plot_ndcg10(results: dict, path: str | Path) -> Path:
    """Grouped bar plot: NDCG@10 per group (x) and table (bars), error bars = std over seeds. A bar is marked
    with the tables it beats (▲name) or trails (▼name) significantly (Holm p < 0.05) in that group."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    names = list(results["tables"])
    groups = list(next(iter(results["tables"].values()))["groups"]) if names else []
    marks: dict[tuple[str, str], list[str]] = {}
    for row in results.get("comparisons") or []:
        if row["significant"]:
            marks.setdefault((row["a"], row["group"]), []).append(("▲" if row["diff"] > 0 else "▼") + row["b"])
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.8 * max(3, len(groups)) + 1.5, 4.5))
    for n, name in enumerate(names):
        entries = [results["tables"][name]["groups"][g]["NDCG@10"] for g in groups]
        means = [e["mean"] or 0.0 for e in entries]
        stds = [e["std"] or 0.0 for e in entries]
        xs = np.arange(len(groups)) + (n - (len(names) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=name)
        for x, mean, std, group in zip(xs, means, stds, groups):
            if marks.get((name, group)):
                ax.text(x, mean + std, "\n".join(marks[(name, group)]), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(np.arange(len(groups)))
    sizes = results["tables"][names[0]]["groups"] if names else {}
    ax.set_xticklabels([f"{GROUP_LABELS.get(g, g)}\n(n={sizes[g]['size']})" for g in groups])
    ax.set_ylabel("NDCG@10")
    ax.set_title(f"{results['model']} ({results['protocol']} ranking); ▲/▼: Holm p < 0.05")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


REPORT_FILES = {"json": "results.json", "markdown": "results.md", "plot": "ndcg10.png", "ranks": RANKS_FILE}


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json (without the per-user ranks), test_ranks.npz (per table: seeds x test users), results.md,
    ndcg10.png, as one set: all four are written into a hidden staging folder in `out_dir`, then renamed into
    place with SIGINT/SIGTERM held back, results.json last. An interrupted report leaves the previous set whole."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".report.tmp-{secrets.token_hex(6)}"  # named here, made inside the `try`: always removed
    try:
        staging.mkdir()
        staged = {key: staging / name for key, name in REPORT_FILES.items()}
        _write_report_files(results, staged)
        _commit(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {key: out / name for key, name in REPORT_FILES.items()}


def _write_report_files(results: dict, paths: dict[str, Path]) -> None:
    ranks = {name: np.asarray(t.get("test_ranks") or [], dtype=np.int64) for name, t in results["tables"].items()}
    np.savez_compressed(paths["ranks"], users=np.asarray(results.get("test_users", []), dtype=str), **ranks)
    slim = {**results, "tables": {n: {k: v for k, v in t.items() if k != "test_ranks"}
                                  for n, t in results["tables"].items()}, "ranks_file": RANKS_FILE}
    slim.pop("test_users", None)
    paths["json"].write_text(json.dumps(slim, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(results), encoding="utf-8")
    plot_ndcg10(results, paths["plot"])


def _commit(staged: dict[str, Path], out: Path) -> None:
    """Rename the staged files into `out`, results.json last; a signal arriving meanwhile is delivered after."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        for key in sorted(staged, key=lambda k: k == "json"):
            os.replace(staged[key], out / staged[key].name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
