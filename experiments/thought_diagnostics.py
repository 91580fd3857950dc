"""What the thought module reads and how much the thought decides the table (run by hand; numbers for
docs/ablations.md):

- attention mass of the thought module's query on the item's own tokens vs the shared prompt template (and the
  item tokens' share of the keys: what uniform attention would give them), on the query token itself, on the most
  attended token, and where that token most often sits (real-token index);
- ||mu|| against the median norm of the backbone's input-token embeddings (the scale of what the LLM reads);
- the share of ||mu||^2 that varies between items: mean ||mu_i - mean mu||^2 / mean ||mu_i||^2;
- the leverage of the thought on the embedding for every pooling (the thought-swap test,
  reaemb_trl/thought_leverage.py).

    python -m experiments.thought_diagnostics --checkpoint runs/quickstart/lrcl --data ml-100k --items 200
    python -m experiments.thought_diagnostics --backbone smollm2 --thought-keys item --thought-scale token

`--backbone` measures the raw backbone with a fresh (untrained, seeded) thought module built with the given options;
`--checkpoint` a trained one as saved (its own options and pooling).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from reaemb_trl.thought_leverage import thought_swap_leverage


@torch.no_grad()
def thought_statistics(embedder, prefix_ids, batch_size: int = 32) -> dict:
    """Attention masses, ||mu|| and its between-item share over the items of `prefix_ids`."""
    from reaemb_trl.thought_module import median_token_norm

    embedder.eval()
    module, table = embedder.thought_module, embedder.model.get_input_embeddings()
    mus, item_mass, item_share, query_mass, top_mass, top_at, token_norms = [], [], [], [], [], [], []
    for start in range(0, len(prefix_ids), batch_size):
        ids = prefix_ids[start : start + batch_size]
        prefix = embedder.encode_prefix(ids, use_cache=False)
        weights = module.attention_weights(prefix.hidden, prefix.mask, prefix.pool_mask)
        item = prefix.pool_mask
        item_mass.append((weights * item).sum(-1))
        item_share.append(item.sum(-1) / prefix.mask.sum(-1))
        last = torch.where(prefix.mask, torch.arange(prefix.mask.shape[1]), -1).argmax(-1)
        query_mass.append(weights[torch.arange(len(ids)), last])
        top = weights.max(-1)
        top_mass.append(top.values)
        top_at.append((prefix.mask.long().cumsum(-1) - 1).gather(1, top.indices[:, None])[:, 0])  # real-token index
        mus.append(embedder.thought_vector(prefix).float())
        token_norms.append(table(torch.tensor([t for row in ids for t in row])).float().norm(dim=-1))
    mu = torch.cat(mus)
    norms = mu.norm(dim=-1)
    squared = mu.pow(2).sum(-1).mean()
    between = (mu - mu.mean(0)).pow(2).sum(-1).mean()
    item_mass = torch.cat(item_mass)
    return {
        "attention_on_item_tokens": item_mass.mean().item(),
        "attention_on_template_tokens": 1 - item_mass.mean().item(),
        "attention_on_query_token": torch.cat(query_mass).mean().item(),
        "attention_on_top_token": torch.cat(top_mass).mean().item(),
        "top_token_index_mode": float(torch.cat(top_at).mode().values),
        "item_share_of_keys": torch.cat(item_share).mean().item(),
        "mu_norm_mean": norms.mean().item(),
        "mu_norm_median": norms.median().item(),
        "median_token_norm_vocabulary": median_token_norm(embedder.model, (embedder.thought_token_id,)),
        "median_token_norm_in_prompts": torch.cat(token_norms).median().item(),
        "between_item_share_of_mu_squared": (between / squared).item(),
    }


def markdown(result: dict) -> str:
    lines = ["| measure | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["statistics"].items()]
    lines += ["", "| pooling | leverage (1 - centred cosine after a thought swap) |", "|---|---:|"]
    lines += [f"| {p}{' (as trained)' if p == result['pooling'] else ''} | {v:.4f} |"
              for p, v in result["leverage"].items()]
    return "\n".join(lines)


def main() -> None:
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.data.canonical import read_items
    from reaemb_trl.embedder import POOLINGS, ThoughtEmbedder
    from reaemb_trl.provenance import provenance
    from reaemb_trl.thought_module import THOUGHT_KEYS, THOUGHT_SCALES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="LRCL (or CRRL) checkpoint folder")
    source.add_argument("--backbone", help="a raw backbone (`smollm2`, hub id, folder) with a fresh thought module")
    parser.add_argument("--thought-keys", choices=THOUGHT_KEYS, default="all", help="with --backbone")
    parser.add_argument("--thought-scale", choices=THOUGHT_SCALES, default="none", help="with --backbone")
    parser.add_argument("--pooling", choices=POOLINGS, default="item_mean", help="with --backbone")
    parser.add_argument("--data", default="ml-100k")
    parser.add_argument("--items", type=int, default=200, help="how many items (a seeded random sample)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("thought_diagnostics.json"))
    args = parser.parse_args()

    began = time.time()
    torch.manual_seed(args.seed)
    if args.checkpoint:
        embedder = ThoughtEmbedder.from_pretrained(args.checkpoint)
    else:
        embedder = ThoughtEmbedder.from_backbone(args.backbone, pooling=args.pooling, thought_keys=args.thought_keys,
                                                 thought_scale=args.thought_scale)
    items = read_items(resolve_dataset(args.data))
    sample = random.Random(args.seed).sample(items, min(args.items, len(items)))
    prefix_ids = embedder.prefix_ids([it["attributes"] for it in sample])
    result = {
        "source": args.checkpoint or args.backbone,
        "pooling": embedder.pooling,
        "thought_options": embedder.thought_module.options(),
        "items": len(sample),
        "statistics": thought_statistics(embedder, prefix_ids, args.batch_size),
        "leverage": thought_swap_leverage(embedder, prefix_ids, POOLINGS, args.batch_size, args.seed),
    }
    result["seconds"] = round(time.time() - began, 1)
    result["provenance"] = provenance("float32")
    print(markdown(result))
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
