"""The README's quickstart table and test lines, from a finished quickstart's results.json.

    python -m experiments.quickstart_table runs/quickstart/eval/results.json

One row per table (mean ± std over the downstream seeds): NDCG@10 and HR@10 over all users, NDCG@10 on the cold-,
tail- and head-item users; then every paired test against id and raw with its Holm-corrected p-value, per group.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GROUPS = ("all", "cold_item", "tail_item", "head_item")
LABELS = {"mostpop": "MostPop (training popularity)", "id": "learned item IDs",
          "raw": "raw SmolLM2 (no training)", "lrcl": "LRCL", "crrl": "LRCL + CRRL",
          "reference": "text reference (SmolLM2 input embeddings + co-occurrence linear map)"}


def label(name: str) -> str:
    base, _, mode = name.partition("@")
    if base.startswith("id+"):
        return f"ids + {LABELS.get(base[3:], base[3:])}, score ensemble"
    return LABELS.get(base, base) + (f", {mode}" if mode else "")


def cell(entry: dict | None, metric: str) -> str:
    if not entry or entry.get("size", 0) == 0 or metric not in entry:
        return "n/a"
    values = entry[metric]
    spread = "n/a" if len(values["values"]) < 2 else f"{values['std']:.4f}"
    return f"{values['mean']:.4f} ± {spread}"


def render(results: dict) -> str:
    tables = results["tables"]
    groups = [g for g in GROUPS if any(g in t.get("groups", {}) for t in tables.values())]
    size = {g: next(t["groups"][g]["size"] for t in tables.values() if g in t.get("groups", {})) for g in groups}
    head = ["table", "HR@10 all"] + [f"NDCG@10 {g.replace('_item', ' items')} ({size[g]})" for g in groups]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, table in tables.items():
        row = [label(name), cell(table["groups"].get("all"), "HR@10")]
        row += [cell(table["groups"].get(g), "NDCG@10") for g in groups]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for test in results.get("comparisons", []):
        if test["group"] in groups:
            lines.append(f"- {test['a']} vs {test['b']} ({test['group']}): {test['mean_a']:.4f} vs {test['mean_b']:.4f}, "
                         f"Holm p = {test['p_holm']:.2g}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("results", type=Path)
    print(render(json.loads(parser.parse_args().results.read_text())))


if __name__ == "__main__":
    main()
