"""CRRL ablation on MovieLens-100k: from one LRCL checkpoint, change one thing at a time from the paper's CRRL and
measure it on items CRRL never trains on (the frozen yardstick, reaemb_trl.crrl_yardstick). The test split is never read.

    python -m experiments.crrl_ablation --lrcl runs/ablation-lrcl/base/lrcl --output runs/ablation-crrl
    python -m experiments.crrl_ablation --lrcl ... --output ... --rows paper recommended --seeds 0 1 2

Every row runs the same number of optimizer steps (`--steps`) on the same training items (80%: the quickstart's
held-out 20% never train) and reports, from the row's own evaluation before and after training:
- the held-out anchor reward with the popularity-normalised positive and centred cosine, and with the paper's raw
  count and dot product (before -> after, and the change);
- the validation-pair score (centred cosine);
- what the rollouts logged: frac_reward_zero_std, the clip region, |log ratio| at the second iteration, and
  ||delta mu|| / sigma at the second iteration.
With several seeds (`--seeds`, the CRRL seed: noise, negatives, item order), mean ± sample std over seeds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from experiments.pipeline import base_settings, fmt, load_data, run_crrl, write_json

# The paper's CRRL (CRRLConfig defaults) on the quickstart's item budget, plus the held-out items.
PAPER = dict(noise_scale=0.1, noise_scale_mode="absolute", learning_rate=1e-4, reward_funcs=["rank"],
             similarity="dot", advantage_baseline="group", positive_score="count", min_support=1,
             negative_sampling="uniform", candidate_num=10, reference_refresh_steps=0, antithetic=False,
             thought_trainable="all", reward_temperature=1.0, lr_scheduler_type="constant", warmup_steps=0)
# What the ablation supports, stacked (the quickstart's CRRL section mirrors it).
RECOMMENDED = dict(noise_scale=0.3, noise_scale_mode="relative", learning_rate=1e-5, reward_funcs=["log_softmax"],
                   reward_temperature=0.05, similarity="centered_cosine", advantage_baseline="noisy",
                   positive_score="cosine", min_support=2, negative_sampling="popularity", candidate_num=20,
                   reference_refresh_steps=20, antithetic=True)
ROWS = {
    "paper": ("the paper's CRRL", {}),
    "relative_sigma": ("sigma relative to ||mu|| (0.3 x RMS of mu)", dict(noise_scale=0.3, noise_scale_mode="relative")),
    "lr1e-5": ("learning rate 1e-5 (small per-update KL)", dict(learning_rate=1e-5)),
    "centered": ("centred cosine similarity", dict(similarity="centered_cosine", reference_refresh_steps=20)),
    "softmax": ("softmax reward (temperature 0.05) on centred cosine",
                dict(reward_funcs=["softmax"], reward_temperature=0.05, similarity="centered_cosine",
                     reference_refresh_steps=20)),
    "log_softmax": ("log-softmax reward (temperature 0.05) on centred cosine",
                    dict(reward_funcs=["log_softmax"], reward_temperature=0.05, similarity="centered_cosine",
                         reference_refresh_steps=20)),
    "normalized_positives": ("positives by cosine-normalised co-occurrence (support >= 2)",
                             dict(positive_score="cosine", min_support=2)),
    "popularity_negatives": ("popularity-matched negatives", dict(negative_sampling="popularity")),
    "noisy_baseline": ("anchor left out of the baseline", dict(advantage_baseline="noisy")),
    "antithetic": ("antithetic noise pairs", dict(antithetic=True)),
    "candidates20": ("20 candidates", dict(candidate_num=20)),
    "recommended": ("all of the above that helped, together", RECOMMENDED),
    "recommended_lr3e-5": ("recommended, learning rate 3e-5", {**RECOMMENDED, "learning_rate": 3e-5}),
    "recommended_1iter": ("recommended, one iteration per rollout (no reuse, no clipping)",
                          {**RECOMMENDED, "num_iterations": 1}),
    "recommended_1iter_lr3e-5": ("recommended, one iteration, learning rate 3e-5",
                                 {**RECOMMENDED, "num_iterations": 1, "learning_rate": 3e-5}),
    "recommended_1iter_lr1e-4": ("recommended, one iteration, learning rate 1e-4",
                                 {**RECOMMENDED, "num_iterations": 1, "learning_rate": 1e-4}),
    "recommended_lora": ("recommended, the LoRA adapter trains too (through mu)", {**RECOMMENDED, "train_lora": True}),
    "recommended_value": ("recommended, only the thought module's value projection trains",
                          {**RECOMMENDED, "thought_trainable": "value"}),
}
KEYS = {
    "anchor": "anchor_normalized_centered_cosine",
    "anchor_paper": "anchor_count_dot",
    "pairs": "pairs_centered_cosine",
}


def run_row(args, name: str, change: dict, seed: int, data) -> dict:
    settings = base_settings(args.output / f"{name}-seed{seed}", seed)
    settings.crrl = {**settings.crrl, **PAPER, **change, "max_steps": args.steps, "eval_item_fraction": 0.2,
                     "per_device_train_batch_size": args.items * 8, "num_generations": 8, "save_steps": args.steps}
    settings.output.mkdir(parents=True, exist_ok=True)
    link = settings.output / "lrcl"
    if not link.exists():
        link.symlink_to(Path(args.lrcl).resolve())
    info = run_crrl(settings, data)
    return info


def summarise(infos: list[dict]) -> dict:
    out = {}
    for short, key in KEYS.items():
        before = [i["yardstick_start"][f"start_{key}"] for i in infos]
        after = [i["yardstick_end"][f"end_{key}"] for i in infos]
        gains = [a - b for a, b in zip(after, before)]
        out[short] = {"before": statistics.mean(before), "after": statistics.mean(after),
                      "gain": statistics.mean(gains), "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0}
    for key in ("frac_reward_zero_std", "clip_region", "log_ratio_iter2", "delta_mu_iter2", "seconds"):
        values = [i.get(key) for i in infos if i.get(key) is not None]
        out[key] = statistics.mean(values) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrcl", required=True, help="the LRCL checkpoint every row starts from")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help=f"rows (default all): {list(ROWS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[42])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per row")
    parser.add_argument("--items", type=int, default=8, help="items per rollout (x 8 noisy copies)")
    args = parser.parse_args()

    data = load_data(base_settings(args.output / "shared"))
    report = {"lrcl": str(args.lrcl), "steps": args.steps, "items_per_rollout": args.items, "rows": {}}
    for name in args.rows:
        label, change = ROWS[name]
        infos = []
        for seed in args.seeds:
            infos.append(run_row(args, name, change, seed, data))
        report["rows"][name] = {"label": label, "change": change, "runs": infos, "summary": summarise(infos)}
        write_json(args.output / "ablation_crrl.json", report)

    lines = ["| row | change | held-out anchor, normalised pos., centred cos: before -> after (gain ± sd) | "
             "paper's anchor (count, dot) gain | pairs gain | zero-std groups | clip region | \\|log r\\| it. 2 | "
             "\\|Δμ\\|/σ it. 2 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in report["rows"].items():
        s = row["summary"]
        a = s["anchor"]
        lines.append(
            f"| {name} | {row['label']} | {a['before']:.4f} -> {a['after']:.4f} ({a['gain']:+.4f} ± {a['gain_std']:.4f}) | "
            f"{s['anchor_paper']['gain']:+.4f} | {s['pairs']['gain']:+.4f} | {fmt(s['frac_reward_zero_std'], digits=2)} | "
            f"{fmt(s['clip_region'], digits=3)} | {fmt(s['log_ratio_iter2'], digits=3)} | {fmt(s['delta_mu_iter2'], digits=3)} |")
    lines.append(f"\n{args.steps} optimizer steps x {args.items} items x 8 copies per row; seeds {args.seeds}; "
                 f"from {args.lrcl}.")
    text = "\n".join(lines) + "\n"
    (args.output / "ablation_crrl.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
