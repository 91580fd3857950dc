"""LRCL ablation on MovieLens-100k (SmolLM2-135M): one change at a time from the paper's objective, judged on the
validation split and the held-out items only (the test split is never read here).

    python -m experiments.lrcl_ablation --output runs/ablation-lrcl                # every row, 1 seed
    python -m experiments.lrcl_ablation --output runs/ablation-lrcl --rows base item_mean --seeds 3

Each row trains LRCL for the quickstart's budget (reaemb_trl/configs/quickstart.yaml: one epoch over the catalogue),
exports its table and reports:
- the frozen CRRL yardstick (reaemb_trl.crrl_yardstick) on the quickstart's held-out items: validation pairs (does the
  user's last training item rank the validation item first among 100?) and the anchor reward with the
  popularity-normalised positive, both with centred cosine;
- the downstream validation NDCG@10 (SASRec, the quickstart's protocol, frozen table + adapter), mean over seeds of
  the downstream model;
- LRCL's wall time.
The markdown table goes to OUTPUT/ablation_lrcl.md (docs/ablations.md quotes it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.pipeline import (
    base_settings, downstream, fmt, load_data, run_lrcl, table_of, validation_score, write_json, yardstick_for,
    yardstick_scores,
)

# The paper's objective (dot product, tau 1, mean pooling) with LoRA on the top 8 layers - the quickstart's CPU budget
# (every layer costs ~2.7x the time: row `all_layers`) - then one change per row.
BASE = dict(pooling="mean", normalize_embeddings=False, center_embeddings=False, init_temperature=1.0, lora_layers=8)
ROWS = {
    "base": ("paper objective, LoRA on the top 8 of 30 layers", {}),
    "all_layers": ("LoRA on every layer (the paper's)", dict(lora_layers=None)),
    "lora_top4": ("LoRA on the top 4 layers", dict(lora_layers=4)),
    "item_mean": ("pooling over the item's own tokens", dict(pooling="item_mean")),
    "last": ("last-token (EOS) pooling", dict(pooling="last")),
    "cosine": ("cosine similarity, learnable tau from 0.05", dict(normalize_embeddings=True, init_temperature=0.05)),
    "centered": ("centred cosine, learnable tau from 0.05",
                 dict(normalize_embeddings=True, center_embeddings=True, init_temperature=0.05)),
    "lr1e-3": ("learning rate 1e-3 (paper 2e-4)", dict(learning_rate=1e-3)),
    "epochs2": ("two views per item (2 epochs)", dict(num_train_epochs=2)),
    # the thought's own options (docs/ablations.md, "Where the thought looks"), each against `item_mean`
    "item_mean_item_keys": ("item_mean pooling; the thought module reads the item's tokens only",
                            dict(pooling="item_mean", thought_keys="item")),
    "item_mean_token_scale": ("item_mean pooling; the thought written at a token's norm",
                              dict(pooling="item_mean", thought_scale="token")),
    "thought": ("pooling = the state at the thought position", dict(pooling="thought")),
    "thought_item_keys": ("pooling = the thought's state; the module reads the item's tokens only",
                          dict(pooling="thought", thought_keys="item")),
    "thought_eos": ("pooling = the mean of the thought's and EOS's states", dict(pooling="thought_eos")),
    "thought_eos_item_keys": ("pooling = the mean of the thought's and EOS's states; item-only keys",
                              dict(pooling="thought_eos", thought_keys="item")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help=f"rows to run (default all): {list(ROWS)}")
    parser.add_argument("--combine", nargs="*", default=[], help="extra row = base + these rows' changes together")
    parser.add_argument("--seeds", type=int, default=1, help="downstream seeds per table")
    parser.add_argument("--lrcl-seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=2, help="downstream runs at once (1 thread each)")
    parser.add_argument("--skip-downstream", action="store_true", help="train and score the yardstick only")
    args = parser.parse_args()

    rows = {name: ROWS[name] for name in args.rows}
    if args.combine:
        merged = {k: v for name in args.combine for k, v in ROWS[name][1].items()}
        rows["+".join(args.combine)] = (" + ".join(ROWS[n][0] for n in args.combine), merged)
    shared = base_settings(args.output / "shared", args.lrcl_seed)
    data = load_data(shared)
    yardstick = yardstick_for(data)
    report = {"rows": {}, "settings": {**shared.lrcl, **BASE}, "evaluation": shared.evaluation}
    tables = {}
    for name, (label, change) in rows.items():
        settings = base_settings(args.output / name, args.lrcl_seed)
        settings.lrcl = {**settings.lrcl, **BASE, **change}
        info = run_lrcl(settings, data)
        tables[name] = table_of(settings.output / "lrcl", data, settings.output / "lrcl.safetensors", settings)
        if "raw" not in tables:  # the untrained backbone with the base row's prompt and pooling
            tables["raw"] = table_of(settings.output / "lrcl", data, args.output / "raw.safetensors", settings,
                                     without_thought=True)
        report["rows"][name] = {"label": label, "change": change, "lrcl": info,
                                "yardstick": yardstick_scores(tables[name], yardstick)}
        write_json(args.output / "ablation_lrcl.json", report)
    report["raw_yardstick"] = yardstick_scores(tables["raw"], yardstick)
    write_json(args.output / "ablation_lrcl.json", report)
    if args.skip_downstream:
        return
    results = downstream(tables, data, shared, seeds=args.seeds, workers=args.workers)
    for name in list(rows) + ["raw"]:
        mean, std = validation_score(results, name)
        target = report["rows"].get(name, report)
        target["valid_ndcg10" if name != "raw" else "raw_valid_ndcg10"] = [mean, std]
    report["reference_valid_ndcg10"] = {n: validation_score(results, n) for n in ("mostpop", "id")}
    write_json(args.output / "ablation_lrcl.json", report)

    lines = ["| row | change | valid NDCG@10 (SASRec, frozen) | pairs (centred cos) | held-out anchor (normalised, "
             "centred cos) | LRCL s |", "|---|---|---:|---:|---:|---:|"]
    raw = report["raw_yardstick"]
    lines.append(f"| raw | untrained backbone | {fmt(*report['raw_valid_ndcg10'])} | "
                 f"{fmt(raw['pairs_centered_cosine'])} | {fmt(raw['anchor_normalized_centered_cosine'])} | 0 |")
    for name, row in report["rows"].items():
        y = row["yardstick"]
        lines.append(f"| {name} | {row['label']} | {fmt(*row['valid_ndcg10'])} | {fmt(y['pairs_centered_cosine'])} | "
                     f"{fmt(y['anchor_normalized_centered_cosine'])} | {row['lrcl']['seconds']:.0f} |")
    ref = report["reference_valid_ndcg10"]
    lines.append(f"\nReference validation NDCG@10: MostPop {fmt(ref['mostpop'][0])}, ids {fmt(*ref['id'])}. "
                 f"Downstream seeds: {args.seeds}; LRCL seed {args.lrcl_seed}.")
    text = "\n".join(lines) + "\n"
    (args.output / "ablation_lrcl.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
