"""Does CRRL fit the items it trains on, and does that carry over to the items it never sees?

The frozen yardstick (reaemb_trl.crrl_yardstick) scores held-out items. This script scores the same definition on
two item sets, before (the LRCL thought module) and after (the CRRL one): the held-out items and the training items
(every other item with a positive; a run of S steps x k items rolls out S*k / num_iterations distinct ones, each
once: TRL serves every rollout to num_iterations optimizer steps). One prefix pass serves both
thought modules (CRRL leaves the LLM as LRCL trained it). The held-out change is also split in two: the score with
only the held-out items' own rows moved to CRRL's, and with every other row moved but theirs.

    python -m experiments.crrl_fit_check --lrcl runs/ablation-crrl/recommended-seed42/lrcl \
        --crrl runs/ablation-crrl/recommended-seed42/crrl --output runs/ablation-crrl/recommended-fit.json

With `--train-config` it first trains CRRL from `--lrcl` into `--crrl` with a recipe config (its settings, on this
script's dataset, without evaluations or intermediate checkpoints; `--max-steps` or `--train-minutes` shortens it,
`--set FIELD=VALUE` overrides a field), and also scores the items that run actually rolled out:

    OMP_NUM_THREADS=2 python -m experiments.crrl_fit_check --lrcl runs/quickstart/lrcl --crrl runs/fit/crrl \
        --train-config recipes/configs/crrl_smollm2_ml100k_aligned.yaml --train-minutes 7 \
        --data-cache runs/quickstart --output runs/fit/aligned.json

The must-show before any downstream seed is spent: the training items gain >= +0.02.

Runs of the same recipe over several CRRL seeds, one table (a row per run, then mean ± std of the changes):

    python -m experiments.crrl_fit_check --summarise runs/fit-s42.json runs/fit-s1.json runs/fit-s2.json

If the training items gain and the held-out items do not, CRRL learns but does not generalise; if neither gains,
the policy does not fit its own reward's items. Each set also gets a paired Wilcoxon test over its items on the
primary anchor reward (popularity-normalised positive, centred cosine): LRCL's thought vs CRRL's, item by item.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments.pipeline import HELD_OUT_FRACTION, base_settings, load_data, write_json

KEYS = ("anchor_normalized_centered_cosine", "anchor_normalized_cosine", "anchor_count_centered_cosine",
        "anchor_count_dot")


def train_crrl(args, data) -> dict:
    """CRRL from `args.lrcl` into `args.crrl` with the recipe config `args.train_config`; returns the run's facts and
    the items it rolled out."""
    from reaemb_trl.builders import DataArguments, build_crrl_trainer
    from reaemb_trl.crrl_config import CRRLConfig
    from reaemb_trl.preflight import parse_recipe_args

    overrides = ["--config", str(args.train_config), "--lrcl_checkpoint", str(args.lrcl), "--output_dir",
                 str(args.crrl), "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end",
                 "false", "--report_to", "none"]
    if args.max_steps is not None:
        overrides += ["--max_steps", str(args.max_steps)]
    for setting in args.set:
        name, _, value = setting.partition("=")
        overrides += [f"--{name}", value]
    data_args, config = parse_recipe_args(DataArguments, CRRLConfig, args=overrides)
    if config.eval_item_fraction != HELD_OUT_FRACTION or config.eval_item_seed != 0:
        raise SystemExit(f"{args.train_config}: eval_item_fraction must be {HELD_OUT_FRACTION} with seed 0 (the "
                         "items this script scores as held out)")
    trainer = build_crrl_trainer(data_args, config, data=data)
    rolled: list[str] = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: (
        rolled.extend(str(x["item_id"]) for x in inputs[:: trainer.num_generations]) or generate(inputs))
    spreads = []  # noise_scale_mode=spread: each measurement of the per-coordinate std of mu over training items
    measure = trainer.encoder.thought_spread
    trainer.encoder.thought_spread = lambda items: spreads.append(measure(items)) or spreads[-1]
    start = time.time()
    if args.train_minutes is not None:
        from transformers import TrainerCallback

        class StopAfter(TrainerCallback):  # a wall-clock budget: the run ends at the first step past it
            def on_step_end(self, train_args, state, control, **kwargs):
                control.should_training_stop |= time.time() - start > 60 * args.train_minutes

        trainer.add_callback(StopAfter())
    trainer.train()
    trainer.save_model(str(args.crrl))
    run = {"config": str(args.train_config), "steps": trainer.state.global_step,
           "seconds": round(time.time() - start, 1), "training_items": len(trainer.train_dataset),
           "rollouts": len(rolled), "rolled_out": sorted(set(rolled))}
    logged = [h for h in trainer.state.log_history if "thought/mu_norm" in h]
    if logged:
        run["mu_norm_first_log"] = logged[0]["thought/mu_norm"]
        run["sigma_rms_first_log"] = logged[0]["thought/sigma"]
    if spreads:  # the items' spread around their mean (sqrt of the total variance) and how many coordinates carry it
        variance = spreads[0].double() ** 2
        run["spread_norm_start"] = float(variance.sum().sqrt())
        run["spread_participation_ratio_start"] = float(variance.sum() ** 2 / (variance**2).sum())
    return run, trainer


def tables_from_trainer(trainer, lrcl: Path):
    """(item ids, {"lrcl", "crrl": table}) from the run's own prefix store: only the thought module and the 2-token
    suffix run per table (the same numbers as a fresh encoding: tests/test_crrl_policy.py)."""
    from reaemb_trl.crrl_policy import swapped_thought_module

    embedder, tables = trainer.embedder, {}
    for name, module in (("lrcl", embedder.thought_module_from(lrcl)), ("crrl", embedder.thought_module)):
        with swapped_thought_module(embedder, module):
            ids, tables[name] = trainer.catalogue_table()
        tables[name] = tables[name].cpu()
    return ids, tables


def decomposition_tables(tables: dict, table_ids: list[str], items: list[str]) -> dict:
    """Two mixed tables that split a change of `items`' score: `own rows moved` is LRCL's table with only those
    items' rows taken from CRRL's (what the items' own embeddings changed), `other rows moved` is CRRL's table with
    those items' rows put back to LRCL's (what their candidates' rows changed). Each table is first centred on its
    own mean row: centred cosine subtracts the mean anyway, and a shift every row shares is no change of geometry,
    but mixing rows of two tables shifted apart would score the shift."""
    import torch

    wanted = set(items)
    chosen = torch.tensor([i in wanted for i in table_ids])
    lrcl, crrl = (tables[name] - tables[name].mean(0) for name in ("lrcl", "crrl"))
    own = lrcl.clone()
    own[chosen] = crrl[chosen]
    other = crrl.clone()
    other[chosen] = lrcl[chosen]
    return {"own rows moved": own, "other rows moved": other}


def table_change(tables: dict) -> dict:
    """How CRRL's table differs from LRCL's: the shift of the mean row and the mean change of a centred row, each
    relative to LRCL's mean centred-row norm, and the ratio of the centred tables' mean row norms."""
    lrcl, crrl = tables["lrcl"].double(), tables["crrl"].double()
    centred = {name: t - t.mean(0) for name, t in (("lrcl", lrcl), ("crrl", crrl))}
    scale = float(centred["lrcl"].norm(dim=1).mean())
    return {"mean_row_shift": float((crrl.mean(0) - lrcl.mean(0)).norm()) / scale,
            "centred_row_change": float((centred["crrl"] - centred["lrcl"]).norm(dim=1).mean()) / scale,
            "centred_norm_ratio": float(centred["crrl"].norm(dim=1).mean()) / scale}


def summarise(paths: list[Path]) -> str:
    """A markdown table of fit-check results (one row per JSON file) and the mean ± std of their changes."""
    import json
    import statistics

    results = [json.loads(Path(p).read_text()) for p in paths]
    sets = [s for s in ("held_out", "trained") if all(s in r for r in results)]
    lines = ["| run | " + " | ".join(f"{s.replace('_', '-')} ({results[0][s]['paired_wilcoxon']['items']}): "
                                     "LRCL -> CRRL, change, paired p" for s in sets) + " |",
             "|---|" + "---|" * len(sets)]
    for path, r in zip(paths, results):
        cells = []
        for s in sets:
            row, test = r[s]["anchor_normalized_centered_cosine"], r[s]["paired_wilcoxon"]
            cells.append(f"{row['lrcl']:.4f} -> {row['crrl']:.4f}, {row['gain']:+.4f}, p = {test['p']:.2g}")
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    cells = []
    for s in sets:
        gains = [r[s]["anchor_normalized_centered_cosine"]["gain"] for r in results]
        spread = statistics.stdev(gains) if len(gains) > 1 else float("nan")
        cells.append(f"change {statistics.mean(gains):+.4f} ± {spread:.4f} ({len(gains)} runs)")
    lines.append("| mean ± std | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    import torch

    from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.evaluation.significance import wilcoxon_signed_rank
    from reaemb_trl.hardware import fast_bf16_available

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="FIT_JSON",
                        help="only print one table of these finished fit checks (no other option needed)")
    parser.add_argument("--lrcl", type=Path, help="the LRCL checkpoint CRRL started from")
    parser.add_argument("--crrl", type=Path,
                        help="the CRRL checkpoint (written there first with --train-config)")
    parser.add_argument("--train-config", type=Path,
                        help="train CRRL first with this recipe config (e.g. crrl_smollm2_ml100k_aligned.yaml)")
    parser.add_argument("--max-steps", type=int, help="with --train-config: override its max_steps")
    parser.add_argument("--train-minutes", type=float,
                        help="with --train-config: stop training at the first step after this many minutes")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="with --train-config: override one of its fields (repeatable)")
    parser.add_argument("--output", type=Path, help="JSON results")
    parser.add_argument("--data-cache", type=Path, default=Path("runs/ablation-crrl/shared"),
                        help="where the canonical dataset is (fetched there if missing)")
    args = parser.parse_args()
    if args.summarise:
        print(summarise(args.summarise))
        return
    missing = [f"--{name}" for name in ("lrcl", "crrl", "output") if getattr(args, name) is None]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --summarise FIT_JSON ...)")

    data = load_data(base_settings(args.data_cache))
    ids = data.item_ids
    held = held_out_items(ids, HELD_OUT_FRACTION)
    trained = sorted(set(ids) - set(held))
    run, table_ids = None, ids
    if args.train_config:
        run, trainer = train_crrl(args, data)
        table_ids, tables = tables_from_trainer(trainer, args.lrcl)
    else:
        embedder = ThoughtEmbedder.from_pretrained(args.crrl).eval()
        if not embedder.same_adapter_as(args.lrcl):
            raise SystemExit(f"{args.crrl} and {args.lrcl} carry different LoRA weights: not a CRRL run from that LRCL")
        dtype = torch.bfloat16 if fast_bf16_available(embedder.device) else None
        tables = embedder.encode_with_thought_modules(
            [r["attributes"] for r in data.items],
            {"lrcl": embedder.thought_module_from(args.lrcl), "crrl": embedder.thought_module}, progress=True,
            dtype=dtype)
    result = {"lrcl": str(args.lrcl), "crrl": str(args.crrl)}
    sets = [("held_out", held), ("trained", trained)]
    if run is not None:
        result["training_run"] = {k: v for k, v in run.items() if k != "rolled_out"}
        sets.append(("rolled_out", run["rolled_out"]))
    for label, items in sets:
        yardstick = CRRLYardstick(data.sequences, ids, items)  # the catalogue order fixes the yardstick's draws
        scores = {name: yardstick.score(table, table_ids) for name, table in tables.items()}
        result[label] = {key: {"lrcl": scores["lrcl"][key], "crrl": scores["crrl"][key],
                               "gain": scores["crrl"][key] - scores["lrcl"][key]} for key in KEYS}
        result[label]["anchor_items"] = scores["lrcl"].get("anchor_items")
        per_item = {name: yardstick.anchor_rewards(table, table_ids) for name, table in tables.items()}
        common = sorted(set(per_item["lrcl"]) & set(per_item["crrl"]))
        _, p_value, differing = wilcoxon_signed_rank([per_item["crrl"][i] for i in common],
                                                     [per_item["lrcl"][i] for i in common])
        result[label]["paired_wilcoxon"] = {"items": len(common), "items_changed": differing, "p": p_value}
        if label == "held_out":
            result[label]["decomposition"] = {
                name: yardstick.score(table, table_ids)[KEYS[0]]
                for name, table in decomposition_tables(tables, list(table_ids), items).items()}
    result["table_change"] = table_change(tables)
    write_json(args.output, result)
    for label, _ in sets:
        row = result[label]["anchor_normalized_centered_cosine"]
        test = result[label]["paired_wilcoxon"]
        print(f"{label:9s} anchor (normalised, centred cos): {row['lrcl']:.4f} -> {row['crrl']:.4f} "
              f"({row['gain']:+.4f}; paired Wilcoxon p = {test['p']:.3g}, {test['items_changed']} of "
              f"{test['items']} items changed)")
    parts = result["held_out"]["decomposition"]
    print("held-out, split: " + ", ".join(f"{name} {value:.4f}" for name, value in parts.items()))
    print("table change (relative to LRCL's mean centred-row norm): " + ", ".join(
        f"{name} {value:.3f}" for name, value in result["table_change"].items()))


if __name__ == "__main__":
    main()
