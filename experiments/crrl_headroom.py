"""Headroom of CRRL: how far can the thought alone move the frozen yardstick, with exact gradients?

CRRL changes only the thought vector that the LLM reads before EOS. Before tuning a policy, measure what any policy
could reach (run by hand; numbers in docs/ablations.md):

1. Per-item oracle: for every held-out item of the yardstick, optimise its thought vector z directly (Adam, through
   the 2-token suffix) to put the yardstick's own positive first among its own 10 candidates (softmax over centred
   cosine at temperature 0.05; candidates keep the starting table's embeddings). It sees the answers, so it bounds
   from above what changing the thought of an item can do.
2. Supervised module: train the thought module itself with the same exact-gradient loss on the *training* items'
   co-occurrence candidates (never the held-out items), then score the held-out items. What a learner with exact
   gradients reaches on unseen items in a given number of steps: CRRL estimates this gradient from noisy copies.
   `--module-train` widens what this learner may change: `module` (CRRL's default), `lora_via_thought` (the LoRA
   adapter as well, its gradient only through the thought vector mu: what CRRL with `train_lora` can learn), and
   `lora_all` (the adapter through every path: plain supervised fine-tuning on co-occurrence, not CRRL; it asks
   whether the held-out items can be reached from the item text at all).

    python -m experiments.crrl_headroom --checkpoint runs/quickstart/lrcl --data ml-100k --output headroom.json

If the per-item oracle barely beats the starting table, no policy setting can; if the supervised module does not
move the held-out yardstick, a noisy-gradient policy will not either.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reaemb_trl.similarity import similarity_matrix

TEMPERATURE = 0.05


def centred_cosine_logits(emb: torch.Tensor, cands: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """The learners' logits: centred cosine of each item (B, d) to its candidates (B, N, d) over TEMPERATURE."""
    return similarity_matrix(emb, cands, "centered_cosine", center) / TEMPERATURE


def per_item_oracle(embedder, prefix_ids, cand_emb, center, steps, lr_scale, batch_size, dtype):
    """Optimised embeddings (B, d) of items whose candidates' embeddings are `cand_emb` (B, N, d), positive first;
    also the mean ||z* - mu|| / ||mu||."""
    out, moved = [], []
    device = embedder.device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    for start in tqdm(range(0, len(prefix_ids), batch_size), desc="per-item oracle", unit="batch"):
        ids = prefix_ids[start:start + batch_size]
        cands = cand_emb[start:start + batch_size].to(device)
        with torch.no_grad(), autocast:
            prefix = embedder.encode_prefix(ids)
            mu = embedder.thought_vector(prefix).float()
        z = mu.clone().requires_grad_(True)
        rms = (mu.norm(dim=-1, keepdim=True) / mu.shape[-1] ** 0.5).mean()
        optimizer = torch.optim.Adam([z], lr=lr_scale * float(rms))
        target = torch.zeros(len(ids), dtype=torch.long, device=device)
        for _ in range(steps):
            with autocast:
                emb = embedder.embed_from_thought(prefix, z).float()
            loss = F.cross_entropy(centred_cosine_logits(emb, cands, center), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad(), autocast:
            out.append(embedder.embed_from_thought(prefix, z).float().cpu())
        moved.append(((z.detach() - mu).norm(dim=-1) / mu.norm(dim=-1)).cpu())
    return torch.cat(out), float(torch.cat(moved).mean())


MODULE_TRAIN = ("module", "lora_via_thought", "lora_all")


def trainable_parameters(embedder, train: str) -> tuple[list, list]:
    """(thought module parameters, LoRA parameters) that the supervised learner trains, with requires_grad set."""
    if train not in MODULE_TRAIN:
        raise ValueError(f"--module-train must be one of {MODULE_TRAIN}, got {train!r}")
    module = list(embedder.thought_module.parameters())
    for p in module:
        p.requires_grad_(True)
    if train == "module":
        return module, []
    if not embedder.has_adapter:
        raise ValueError(f"--module-train {train} needs a checkpoint with a LoRA adapter")
    lora = [p for n, p in embedder.model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    return module, lora


def supervised_loss(embedder, prefix_ids, cands, center, train: str, lora: list, autocast) -> torch.Tensor:
    """Cross-entropy of each item's positive (candidate 0 of `cands`, (B, N, d)) under the centred-cosine softmax,
    with the gradient paths `train` allows."""
    with torch.set_grad_enabled(train != "module"), autocast:
        prefix = embedder.encode_prefix(prefix_ids)
    mu = embedder.thought_module(prefix.hidden, prefix.mask)  # with `module`, the prefix carries no gradient
    if train == "lora_via_thought":
        # As in CRRL, the adapter learns only through mu: the pooled prefix, its keys/values and the suffix pass's
        # own use of the adapter are constants (a weight without requires_grad is a constant for autograd).
        prefix = type(prefix)(prefix.hidden.detach(), prefix.mask, prefix.lengths,
                              [(k.detach(), v.detach()) for k, v in prefix.past_key_values], prefix.pool_mask)
        for p in lora:
            p.requires_grad_(False)
    try:
        with autocast:
            emb = embedder.embed_from_thought(prefix, mu).float()
    finally:
        for p in lora:
            p.requires_grad_(True)
    target = torch.zeros(len(prefix_ids), dtype=torch.long, device=emb.device)
    return F.cross_entropy(centred_cosine_logits(emb, cands, center), target)


def supervised_module(embedder, catalogue, train_ids, candidates, table, table_ids, center, steps, batch_items,
                      lr, dtype, seed, train="module"):
    """Train the thought module (and with `train` != "module" the LoRA adapter) on training items with the
    exact-gradient loss; returns the loss curve."""
    import numpy as np

    row = {i: n for n, i in enumerate(table_ids)}
    device = embedder.device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    module, lora = trainable_parameters(embedder, train)
    optimizer = torch.optim.Adam(module + lora, lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    for step in tqdm(range(steps), desc="supervised module", unit="step"):
        batch = [train_ids[i] for i in rng.choice(len(train_ids), size=batch_items, replace=False)]
        cand_ids, _ = candidates.candidates(batch, epoch=step)
        cands = table[torch.tensor([[row[c] for c in r] for r in cand_ids])].to(device)
        loss = supervised_loss(embedder, embedder.prefix_ids([catalogue[i] for i in batch]), cands, center, train,
                               lora, autocast)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def main() -> None:
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.candidates import CooccurrenceCandidates
    from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items
    from reaemb_trl.data.canonical import load_interactions, read_items
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.hardware import fast_bf16_available
    from reaemb_trl.provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="LRCL (or CRRL) checkpoint folder")
    parser.add_argument("--data", default="ml-100k")
    parser.add_argument("--fraction", type=float, default=0.2, help="held-out share (CRRL's eval_item_fraction)")
    parser.add_argument("--oracle-steps", type=int, default=40)
    parser.add_argument("--oracle-lr", type=float, default=0.5, help="Adam lr as a multiple of RMS(mu)")
    parser.add_argument("--module-steps", type=int, default=200)
    parser.add_argument("--module-items", type=int, default=32)
    parser.add_argument("--module-lr", type=float, default=1e-4)
    parser.add_argument("--module-train", choices=MODULE_TRAIN, default="module",
                        help="what the supervised learner changes (see the module docstring)")
    parser.add_argument("--negative-sampling", choices=("uniform", "popularity"), default="uniform",
                        help="the supervised learner's negatives (CRRL's negative_sampling)")
    parser.add_argument("--candidate-num", type=int, default=10, help="the supervised learner's candidates per item")
    parser.add_argument("--skip-oracle", action="store_true", help="only the supervised learner")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    began = time.time()
    folder = resolve_dataset(args.data)
    items = read_items(folder)
    catalogue = {it["item_id"]: it["attributes"] for it in items}
    ids = list(catalogue)
    sequences = load_interactions(folder, item_ids=ids)
    held = held_out_items(ids, args.fraction)
    yardstick = CRRLYardstick(sequences, ids, held)
    embedder = ThoughtEmbedder.from_pretrained(args.checkpoint, device=args.device).eval()
    embedder.requires_grad_(False)
    dtype = torch.bfloat16 if fast_bf16_available(embedder.device) else None

    table = embedder.encode([catalogue[i] for i in ids], batch_size=args.batch_size, dtype=dtype, progress=True)
    center = table.mean(0).to(embedder.device)
    result = {"checkpoint": str(args.checkpoint), "held_out_items": len(held), "start": yardstick.score(table, ids)}

    row = {i: n for n, i in enumerate(ids)}
    for name, task in ({} if args.skip_oracle else yardstick.anchor_tasks).items():
        cand_emb = table[torch.tensor([[row[c] for c in r] for r in task.candidate_ids])]
        optimised, moved = per_item_oracle(
            embedder, embedder.prefix_ids([catalogue[i] for i in task.item_ids]), cand_emb, center,
            args.oracle_steps, args.oracle_lr, args.batch_size, dtype)
        oracle_table = table.clone()
        oracle_table[torch.tensor([row[i] for i in task.item_ids])] = optimised
        scores = yardstick.score(oracle_table, ids, center=center.cpu())
        result[f"oracle_{name}"] = {k: v for k, v in scores.items() if k.startswith(f"anchor_{name}")}
        result[f"oracle_{name}"]["relative_thought_change"] = moved

    train_index = CooccurrenceCandidates.from_sequences(
        sequences, ids, candidate_num=args.candidate_num, pos_num=1, seed=args.seed, positive_score="cosine",
        min_support=2, negative_sampling=args.negative_sampling)
    train_ids = sorted(set(train_index.items_with_positives()) - set(held))
    losses = supervised_module(embedder, catalogue, train_ids, train_index, table, ids, center, args.module_steps,
                               args.module_items, args.module_lr, dtype, args.seed, args.module_train)
    embedder.requires_grad_(False)
    embedder.eval()
    trained = embedder.encode([catalogue[i] for i in ids], batch_size=args.batch_size, dtype=dtype, progress=True)
    result["supervised_module"] = {**yardstick.score(trained, ids), "loss_first_10": sum(losses[:10]) / 10,
                                   "loss_last_10": sum(losses[-10:]) / 10, "steps": args.module_steps,
                                   "items_per_step": args.module_items, "lr": args.module_lr,
                                   "train": args.module_train, "negative_sampling": args.negative_sampling,
                                   "candidate_num": args.candidate_num}
    result["seconds"] = round(time.time() - began, 1)
    result["provenance"] = provenance("bfloat16" if dtype else "float32")
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
