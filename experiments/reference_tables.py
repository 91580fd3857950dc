"""Text reference tables on the frozen CRRL yardstick: how much collaborative signal a linear read of the item text
carries (reaemb_trl.cooccurrence_projection), the bar a trained thought should clear.

    python -m experiments.reference_tables --data ml-100k --seeds 0 1 2
    python -m experiments.reference_tables --data runs/quickstart/data --tables runs/quickstart/tables/*.safetensors

Rows (held-out items: the yardstick's, `held_out_items(ids, --fraction, seed=0)`; scores: the held-out anchor
reward with the popularity-normalised positive and centred cosine, random ~0.454, and the validation pairs):
- bag: the mean of the backbone's input token embeddings of each item's text, no training;
- strict: bag + linear map, the held-out items removed from every part of its training (positives, negatives,
  feature statistics) - what `reaemb export --cooccurrence-projection` does with cold items, and the fair bar;
- non-strict: anchors are training items only, but held-out items may be their positives and negatives;
- all anchors: held-out items are anchors too, so the map sees the yardstick's own answers (an upper bound, not a
  reference);
each with `--pos-num` positives per anchor (default 5, the export's) and 1; mean ± sample std over `--seeds` (the
map's seed), and the fit's wall time. `--tables` adds existing table files (e.g. raw, LRCL, LRCL+CRRL) as rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from reaemb_trl.cooccurrence_projection import (
    bag_of_token_embeddings,
    cooccurrence_positives,
    fit_linear_map,
    item_texts,
    projection_table,
)

ANCHOR = "anchor_normalized_centered_cosine"
PAIRS = "pairs_centered_cosine"


def variants(sequences, ids, held: set[str], pos_num: int) -> dict[str, tuple[str, list, list[int]]]:
    """{name: (description, training pairs, training rows)} of the maps fitted with `pos_num` positives."""
    held_rows = {n for n, item in enumerate(ids) if item in held}
    every_row = list(range(len(ids)))
    all_pairs = cooccurrence_positives(sequences, ids, pos_num=pos_num)
    return {
        f"strict_p{pos_num}": (f"bag + map, held-out items excluded everywhere (pos_num {pos_num})",
                               cooccurrence_positives(sequences, ids, exclude=held, pos_num=pos_num),
                               [n for n in every_row if n not in held_rows]),
        f"non_strict_p{pos_num}": (f"bag + map, training anchors; held-out items as positives/negatives "
                                   f"(pos_num {pos_num})", [p for p in all_pairs if p[0] not in held_rows],
                                   every_row),
        f"all_anchors_p{pos_num}": (f"bag + map, held-out items as anchors too, sees the answers (pos_num {pos_num})",
                                    all_pairs, every_row),
    }  # fmt: skip


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items
    from reaemb_trl.export_inputs import load_backbone, load_dataset
    from reaemb_trl.item_table import read_table
    from reaemb_trl.provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="ml-100k", help="canonical dataset folder or ml-100k")
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--fraction", type=float, default=0.2, help="held-out share (CRRL's eval_item_fraction)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the map")
    parser.add_argument("--pos-num", type=int, nargs="+", default=[5, 1], help="positives per anchor, one run each")
    parser.add_argument("--tables", type=Path, nargs="*", default=[], help="table files to score alongside")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    data = load_dataset(args.data)
    ids = data.item_ids
    held = set(held_out_items(ids, args.fraction, seed=0))
    yardstick = CRRLYardstick(data.sequences, ids, sorted(held))
    embedder = load_backbone(args.backbone, "mean")
    began = time.time()
    features = bag_of_token_embeddings(embedder.model, embedder.tokenizer,
                                       item_texts([item["attributes"] for item in data.items], embedder.formatter))
    bag_seconds = time.time() - began
    rows = {"bag": row("bag of input token embeddings, no training",
                       [{**_scores(yardstick, features, ids), "seconds": bag_seconds}])}
    for pos_num in args.pos_num:
        for name, (what, pairs, train) in variants(data.sequences, ids, held, pos_num).items():
            runs = []
            for seed in args.seeds:
                began = time.time()
                weight = fit_linear_map(features, pairs, train, seed=seed)
                seconds = time.time() - began
                runs.append({**_scores(yardstick, projection_table(features, weight, train), ids), "seconds": seconds})
            rows[name] = {**row(what, runs), "pairs": len(pairs)}
    for path in args.tables:
        rows[path.stem] = row(f"table {path}", [{**_scores(yardstick, read_table(path).aligned(ids), ids)}])
    print(render(rows, len(yardstick.anchor_tasks["normalized"].item_ids), args))
    if args.output:
        result = {"rows": rows, "held_out_items": len(held), "provenance": provenance("float32"), "args": vars(args)}
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")


def _scores(yardstick, table: torch.Tensor, ids) -> dict[str, float]:
    scores = yardstick.score(table, ids)
    return {ANCHOR: scores[ANCHOR], PAIRS: scores[PAIRS]}


def row(what: str, runs: list[dict]) -> dict:
    """One row: the scores (and fit seconds, where timed) of each run, as lists."""
    keys = (ANCHOR, PAIRS, "seconds")
    return {"what": what, **{key: [run[key] for run in runs if key in run] for key in keys}}


def render(rows: dict, anchor_items: int, args) -> str:
    lines = [f"Held-out anchor ({anchor_items} scorable held-out items; popularity-normalised positive, centred "
             f"cosine; random ~0.454) and validation pairs (centred cosine); map seeds {args.seeds}; "
             f"torch threads: {torch.get_num_threads()}", "",
             "| row | what | held-out anchor | validation pairs | fit seconds |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for name, entry in rows.items():
        seconds = f"{statistics.mean(entry['seconds']):.1f}" if entry["seconds"] else ""
        scores = f"{mean_std(entry[ANCHOR])} | {mean_std(entry[PAIRS])}"
        lines.append(f"| {name} | {entry['what']} | {scores} | {seconds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
