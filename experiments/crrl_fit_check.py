"""Does CRRL fit the items it trains on, and does that carry over to the items it never sees?

The frozen yardstick (reaemb_trl.crrl_yardstick) scores held-out items. This script scores the same definition on
two item sets, before (the LRCL thought module) and after (the CRRL one): the held-out items and the training items
(every other item with a positive; a run of S steps x k items rolls out S*k of them). One prefix pass serves both
thought modules (CRRL leaves the LLM as LRCL trained it).

    python -m experiments.crrl_fit_check --lrcl runs/ablation-crrl/recommended-seed42/lrcl \
        --crrl runs/ablation-crrl/recommended-seed42/crrl --output runs/ablation-crrl/recommended-fit.json

If the training items gain and the held-out items do not, CRRL learns but does not generalise; if neither gains,
the policy does not fit its own reward's items. Each set also gets a paired Wilcoxon test over its items on the
primary anchor reward (popularity-normalised positive, centred cosine): LRCL's thought vs CRRL's, item by item.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.pipeline import HELD_OUT_FRACTION, base_settings, load_data, write_json

KEYS = ("anchor_normalized_centered_cosine", "anchor_normalized_cosine", "anchor_count_centered_cosine",
        "anchor_count_dot")


def main() -> None:
    import torch

    from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.evaluation.significance import wilcoxon_signed_rank
    from reaemb_trl.hardware import fast_bf16_available

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrcl", required=True, type=Path, help="the LRCL checkpoint CRRL started from")
    parser.add_argument("--crrl", required=True, type=Path, help="the CRRL checkpoint")
    parser.add_argument("--output", required=True, type=Path, help="JSON results")
    parser.add_argument("--data-cache", type=Path, default=Path("runs/ablation-crrl/shared"),
                        help="where the canonical dataset is (fetched there if missing)")
    args = parser.parse_args()

    data = load_data(base_settings(args.data_cache))
    ids = data.item_ids
    held = held_out_items(ids, HELD_OUT_FRACTION)
    trained = sorted(set(ids) - set(held))
    embedder = ThoughtEmbedder.from_pretrained(args.crrl).eval()
    if not embedder.same_adapter_as(args.lrcl):
        raise SystemExit(f"{args.crrl} and {args.lrcl} carry different LoRA weights: not a CRRL run from that LRCL")
    dtype = torch.bfloat16 if fast_bf16_available(embedder.device) else None
    tables = embedder.encode_with_thought_modules(
        [r["attributes"] for r in data.items],
        {"lrcl": embedder.thought_module_from(args.lrcl), "crrl": embedder.thought_module}, progress=True, dtype=dtype)
    result = {"lrcl": str(args.lrcl), "crrl": str(args.crrl)}
    for label, items in (("held_out", held), ("trained", trained)):
        yardstick = CRRLYardstick(data.sequences, ids, items)
        scores = {name: yardstick.score(table, ids) for name, table in tables.items()}
        result[label] = {key: {"lrcl": scores["lrcl"][key], "crrl": scores["crrl"][key],
                               "gain": scores["crrl"][key] - scores["lrcl"][key]} for key in KEYS}
        result[label]["anchor_items"] = scores["lrcl"].get("anchor_items")
        per_item = {name: yardstick.anchor_rewards(table, ids) for name, table in tables.items()}
        common = sorted(set(per_item["lrcl"]) & set(per_item["crrl"]))
        _, p_value, differing = wilcoxon_signed_rank([per_item["crrl"][i] for i in common],
                                                     [per_item["lrcl"][i] for i in common])
        result[label]["paired_wilcoxon"] = {"items": len(common), "items_changed": differing, "p": p_value}
    write_json(args.output, result)
    for label in ("held_out", "trained"):
        row = result[label]["anchor_normalized_centered_cosine"]
        test = result[label]["paired_wilcoxon"]
        print(f"{label:9s} anchor (normalised, centred cos): {row['lrcl']:.4f} -> {row['crrl']:.4f} "
              f"({row['gain']:+.4f}; paired Wilcoxon p = {test['p']:.3g}, {test['items_changed']} of "
              f"{test['items']} items changed)")


if __name__ == "__main__":
    main()
