"""Aggregate runs over seeds and write results.json, results.md and ndcg10.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

GROUP_LABELS = {"all": "all", "tail_user": "tail users", "head_user": "head users",
                "tail_item": "tail items", "head_item": "head items"}


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def aggregate(runs: dict, config, tables: dict[str, str] | None = None) -> dict:
    """runs: {table name: [RunResult, ...]} -> the results dict (mean, sample std, per-seed values, sizes)."""
    out = {"model": config.model, "protocol": config.protocol, "config": config.as_dict(), "tables": {}}
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
        out["tables"][name] = {
            "source": (tables or {}).get(name, name),
            "seeds": [r.seed for r in results],
            "best_epochs": [r.best_epoch for r in results],
            "groups": groups,
        }
    return out


def render_markdown(results: dict, metrics=("HR@10", "NDCG@10")) -> str:
    """One row per (table, group), one column per metric, "mean ± std"."""
    metrics = list(metrics)
    lines = [f"# {results['model']} ({results['protocol']} ranking)", "",
             "| table | group | users | " + " | ".join(metrics) + " |",
             "|---|---|---:|" + "---:|" * len(metrics)]
    for name, table in results["tables"].items():
        for group, entry in table["groups"].items():
            cells = []
            for metric in metrics:
                m = entry.get(metric, {})
                cells.append("n/a" if m.get("mean") is None else f"{m['mean']:.4f} ± {m['std']:.4f}")  # n/a: empty group
            lines.append(f"| {name} | {GROUP_LABELS.get(group, group)} | {entry['size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ndcg10(results: dict, path: str | Path) -> Path:
    """Grouped bar plot: NDCG@10 per group (x) and table (bars), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    names = list(results["tables"])
    groups = list(next(iter(results["tables"].values()))["groups"]) if names else []
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.6 * max(3, len(groups)) + 1, 4))
    for n, name in enumerate(names):
        entries = [results["tables"][name]["groups"][g]["NDCG@10"] for g in groups]
        means = [e["mean"] or 0.0 for e in entries]
        stds = [e["std"] or 0.0 for e in entries]
        xs = np.arange(len(groups)) + (n - (len(names) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(np.arange(len(groups)))
    sizes = results["tables"][names[0]]["groups"] if names else {}
    ax.set_xticklabels([f"{GROUP_LABELS.get(g, g)}\n(n={sizes[g]['size']})" for g in groups])
    ax.set_ylabel("NDCG@10")
    ax.set_title(f"{results['model']} ({results['protocol']} ranking)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "ndcg10.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(results), encoding="utf-8")
    plot_ndcg10(results, paths["plot"])
    return paths
