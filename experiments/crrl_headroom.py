"""Headroom of CRRL: how far can the thought move the frozen yardstick, next to simple references over the same text?

Every row plays one game (CRRL's with `reference_refresh_steps` > 0): an item is scored against the embeddings its
candidates have in the learner's *own* current table, centred on that table's mean row (`game_targets`). A learner
trains toward the targets of a table refreshed every `--refresh-steps` steps under its current weights, and the
score is the frozen yardstick (`CRRLYardstick`, held-out items `held_out_items(ids, 0.2, seed=0)`: anchor reward,
popularity-normalised positive, centred cosine) of its final re-encoded table, centre = that table's mean,
candidates = the yardstick's: the same function of the same table. Rows (run by hand; numbers in docs/ablations.md):

1. Per-item oracle: each held-out item's thought vector z optimised directly (Adam, exact gradients through the
   2-token suffix) to put its yardstick positive first among its own 10 candidates; the candidates' rows and the
   centre come from the table with the optimised rows, refreshed every `--refresh-steps` steps. It sees the
   answers, so it bounds from above what changing the thought of an item can do.
2. Supervised learner: the thought module (`--module-train module`), or with the LoRA adapter through mu only
   (`lora_via_thought`: what CRRL with `train_lora` can learn) or through every path (`lora_all`: plain supervised
   fine-tuning on co-occurrence, not CRRL), trained with the same softmax loss on the *training* items'
   co-occurrence candidates (never the held-out items), AdamW with `--weight-decay`, early-stopped on the
   validation slice: a seeded 10% of the training items (never trained on, never held out), scored at every
   refresh with the yardstick's definition; the best refresh's weights are kept.
3. References, no LLM pass (seconds): an attribute one-hot (genre multi-hot + 5-year release bucket) and the bag of
   the backbone's input-token embeddings of the item text, each alone and with a linear map trained on
   co-occurrence (reaemb_trl.cooccurrence_projection): non-strict (anchors are training items, positives and
   negatives any item) and strict (held-out items excluded everywhere: positives and negatives).

    python -m experiments.crrl_headroom --checkpoint runs/quickstart/lrcl --data ml-100k --output headroom.json
    python -m experiments.crrl_headroom --checkpoint runs/quickstart/lrcl --data ml-100k --skip-oracle \\
        --skip-learner    # the references only: no LLM pass, seconds after loading

Output: a markdown table on stdout (held-out anchor and training-item anchor, mean ± std over `--seeds`, wall
seconds) and the same rows as JSON (`--output`). If the per-item oracle barely beats the starting table, no policy
setting can; if the supervised learner does not move the held-out yardstick while a reference does, the signal is
in the text and the thought path does not pick it up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reaemb_trl.similarity import similarity_matrix

TEMPERATURE = 0.05
SCORE = "anchor_normalized_centered_cosine"  # THE score: the yardstick's normalised positive, centred cosine
MODULE_TRAIN = ("module", "lora_via_thought", "lora_all")
VALIDATION_SEED = 1  # held_out_items(..., seed=0) already picked the held-out items by the same hash: another seed


# ---- the game ------------------------------------------------------------------------------------------------
def game_targets(table: torch.Tensor, table_ids: Sequence[str], candidate_ids: Sequence[Sequence[str]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one game's targets: (the candidates' rows of `table`, (R, N, d); the centre of centred cosine, the
    table's mean row). The learners train toward these of their refreshed table; the yardstick scores the same
    function of the final table (its default centre is the table's mean)."""
    table = table.float()
    row = {str(item): n for n, item in enumerate(table_ids)}
    index = torch.tensor([[row[str(c)] for c in r] for r in candidate_ids], device=table.device)
    return table[index], table.mean(0)


def centred_cosine_logits(emb: torch.Tensor, cands: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """The learners' logits: centred cosine of each item (B, d) to its candidates (B, N, d) over TEMPERATURE."""
    return similarity_matrix(emb, cands, "centered_cosine", center) / TEMPERATURE


class EarlyStopping:
    """Keeps the snapshot of the best validation score seen (strictly better replaces it); `update` says when
    `patience` checks in a row did not improve on it."""

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"--patience must be >= 1, got {patience}")
        self.patience = patience
        self.best_step, self.best_score, self.best = -1, -math.inf, None
        self.history: list[tuple[int, float]] = []

    def update(self, step: int, score: float, snapshot) -> bool:
        self.history.append((step, score))
        if score > self.best_score:
            self.best_step, self.best_score, self.best = step, score, snapshot()
        return len(self.history) - 1 - [s for s, _ in self.history].index(self.best_step) >= self.patience


# ---- learner 1: the per-item oracle ----------------------------------------------------------------------------
def per_item_oracle(embedder, encoder, table, table_ids, task, steps, refresh_steps, lr_scale, batch_size, dtype):
    """The start `table` with each of `task`'s items' row replaced by the embedding of its optimised thought z
    (positive = candidate 0); targets from the current table, refreshed every `refresh_steps` steps. Also the mean
    ||z* - mu|| / ||mu||."""
    device = embedder.device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    row = {i: n for n, i in enumerate(table_ids)}
    batches = [task.item_ids[s:s + batch_size] for s in range(0, len(task.item_ids), batch_size)]
    candidate_rows = [task.candidate_ids[s:s + batch_size] for s in range(0, len(task.item_ids), batch_size)]
    current, thoughts, optimizers, mus = table.clone(), [], [], []
    for ids in batches:
        with torch.no_grad(), autocast:
            mu = embedder.thought_vector(encoder.encode_prefixes(ids)).float()
        z = mu.clone().requires_grad_(True)
        rms = (mu.norm(dim=-1, keepdim=True) / mu.shape[-1] ** 0.5).mean()
        thoughts.append(z)
        mus.append(mu)
        optimizers.append(torch.optim.Adam([z], lr=lr_scale * float(rms)))
    done = 0
    while done < steps:
        span = min(refresh_steps, steps - done)
        reference = current.clone()
        for ids, cand_ids, z, optimizer in zip(batches, candidate_rows, thoughts, optimizers):
            cands, center = game_targets(reference, table_ids, cand_ids)
            with torch.no_grad(), autocast:
                prefix = encoder.encode_prefixes(ids)
            target = torch.zeros(len(ids), dtype=torch.long, device=device)
            for _ in range(span):
                with autocast:
                    emb = embedder.embed_from_thought(prefix, z).float()
                loss = F.cross_entropy(centred_cosine_logits(emb, cands.to(device), center.to(device)), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad(), autocast:
                current[torch.tensor([row[i] for i in ids])] = embedder.embed_from_thought(prefix, z).float().cpu()
        done += span
    moved = torch.cat([((z.detach() - mu).norm(dim=-1) / mu.norm(dim=-1)).cpu() for z, mu in zip(thoughts, mus)])
    return current, float(moved.mean())


# ---- learner 2: the supervised thought module (and adapter) ----------------------------------------------------
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
    # with `module` the prefix carries no gradient; the item mask reaches the module (`thought_keys: item`)
    mu = embedder.thought_module(prefix.hidden, prefix.mask, prefix.pool_mask)
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


def game_encoder(embedder, catalogue: dict, batch_size: int = 32, prefix_cache_gb: float = 2.0,
                 train: str = "module"):
    """CRRL's RolloutEncoder over `catalogue` (id -> attributes): the learners' tables come from the code that
    makes CRRL's reference table, with the frozen LLM's prefixes kept across refreshes when only the module trains."""
    from reaemb_trl.crrl_config import CRRLConfig
    from reaemb_trl.crrl_rollout import RolloutEncoder

    with tempfile.TemporaryDirectory() as scratch:
        config = CRRLConfig(output_dir=scratch, report_to=[], use_cpu=embedder.device.type == "cpu",
                            embed_batch_size=batch_size, prefix_cache_gb=prefix_cache_gb, train_lora=train != "module")
    return RolloutEncoder(embedder, catalogue, config)


def catalogue_table(encoder, dtype) -> torch.Tensor:
    """The learner's own table of the whole catalogue (encoder order), float32 on the CPU."""
    autocast = torch.autocast(encoder.embedder.device.type, dtype=dtype, enabled=dtype is not None)
    with torch.no_grad(), autocast:
        _, table = encoder.catalogue_table()
    return table.float().cpu()


def train_learner(embedder, encoder, table_ids, train_ids, candidates, validation, *, train="module", steps=200,
                  batch_items=32, lr=1e-4, weight_decay=0.0, refresh_steps=10, patience=5, seed=0, dtype=None,
                  fit=None, fit_curve: list | None = None):
    """Train the supervised learner in the one game; returns (the table of its best validation check, the
    EarlyStopping record). `validation`: a CRRLYardstick over the validation slice, scored at every refresh; with
    `fit` (a CRRLYardstick over the learner's training items) each check also appends (step, its score) to
    `fit_curve`: how well the learner fits the items it trains on, whatever the validation slice says."""
    device = embedder.device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    module, lora = trainable_parameters(embedder, train)
    params = module + lora
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    stopper = EarlyStopping(patience)
    rng = np.random.default_rng(seed)
    for step in range(steps + 1):
        if step % refresh_steps == 0 or step == steps:
            table = catalogue_table(encoder, dtype)
            score = validation.score(table, table_ids)[SCORE]
            fitted = ""
            if fit is not None and fit_curve is not None:
                fit_curve.append((step, fit.score(table, table_ids)[SCORE]))
                fitted = f", training items {fit_curve[-1][1]:.4f}"
            snapshot = lambda t=table: (t, [p.detach().clone() for p in params])  # noqa: E731 (taken on a new best)
            stop = stopper.update(step, score, snapshot)
            print(f"step {step}: validation {score:.4f} (best {stopper.best_score:.4f} at step {stopper.best_step})"
                  f"{fitted}",
                  file=sys.stderr, flush=True)  # long runs on a CPU: the curve so far survives a kill
            if stop or step == steps:
                break
            reference = table
        batch = [train_ids[i] for i in rng.choice(len(train_ids), size=min(batch_items, len(train_ids)),
                                                  replace=False)]
        cand_ids, _ = candidates.candidates(batch, epoch=step)
        cands, center = game_targets(reference, table_ids, cand_ids)
        loss = supervised_loss(embedder, [encoder.prefix_ids(i) for i in batch], cands.to(device),
                               center.to(device), train, lora, autocast)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    best_table, best_params = stopper.best
    with torch.no_grad():
        for p, value in zip(params, best_params):
            p.copy_(value)
    for p in params:
        p.requires_grad_(False)
    return best_table, stopper


# ---- references ------------------------------------------------------------------------------------------------
def attribute_one_hot(items: Sequence, genre_key: str = "genres", year_key: str = "year", bucket: int = 5
                      ) -> tuple[torch.Tensor, list[str]]:
    """(N, F) float table: the whitespace-separated values of `genre_key` (multi-hot) and the `bucket`-year bucket of
    an integer `year_key`, one column per value seen; an item lacking an attribute (or with a year that is not an
    integer) has zeros there. Also the column names. `items`: attribute lists or mappings, as in items.jsonl."""
    from reaemb_trl.prompt import normalise_attributes

    rows = []
    for attrs in items:
        values = dict(normalise_attributes(attrs))
        names = {f"genre:{g}" for g in values.get(genre_key, "").split()}
        year = values.get(year_key, "").strip()
        if year.isdigit():
            start = int(year) // bucket * bucket
            names.add(f"year:{start}-{start + bucket - 1}")
        rows.append(names)
    columns = sorted(set().union(*rows))
    where = {c: n for n, c in enumerate(columns)}
    table = torch.zeros(len(rows), len(columns))
    for r, names in enumerate(rows):
        table[r, [where[c] for c in names]] = 1.0
    return table, columns


def map_training_signal(sequences, table_ids: Sequence[str], held: Sequence[str], strict: bool
                        ) -> tuple[list, list[int]]:
    """(co-occurrence positives, rows the map trains on) of the linear-map reference. Anchors are never held-out
    items; `strict` also removes the held-out items as positives and as negatives (the map's negatives are drawn
    from its training rows), so nothing of them enters the training signal."""
    from reaemb_trl.cooccurrence_projection import cooccurrence_positives

    held_set = set(map(str, held))
    held_rows = {n for n, i in enumerate(table_ids) if str(i) in held_set}
    positives = cooccurrence_positives(sequences, list(table_ids), exclude=sorted(held_set) if strict else ())
    positives = [p for p in positives if p[0] not in held_rows]
    rows = [n for n in range(len(table_ids)) if not strict or n not in held_rows]
    return positives, rows


def reference_tables(features: dict[str, tuple[torch.Tensor, float]], sequences, table_ids, held, seeds, map_dim,
                     map_steps) -> dict[str, list[tuple[torch.Tensor, float]]]:
    """{row name: [(table, seconds) per run]}: each feature table (`features`: name -> (table, seconds to make it))
    alone (deterministic: one run) and with the co-occurrence linear map, non-strict and strict, one run per seed
    (its seconds include the features')."""
    from reaemb_trl.cooccurrence_projection import fit_linear_map, projection_table

    signal = {strict: map_training_signal(sequences, table_ids, held, strict) for strict in (False, True)}
    out = {}
    for name, (table, seconds) in features.items():
        out[name] = [(table, seconds)]
        for strict, label in ((False, "non-strict"), (True, "strict")):
            positives, rows = signal[strict]
            runs = []
            for seed in seeds:
                began = time.time()
                W = fit_linear_map(table, positives, rows, dim=map_dim, steps=map_steps, seed=seed)
                runs.append((projection_table(table, W, rows), seconds + time.time() - began))
            out[f"{name} + co-occurrence map ({label})"] = runs
    return out


# ---- the report ------------------------------------------------------------------------------------------------
def summary_row(name: str, held_scores: list[float], train_scores: list[float], seconds: float, **extra) -> dict:
    def spread(values):
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    return {"row": name, "held_out_anchor": float(np.mean(held_scores)), "held_out_anchor_std": spread(held_scores),
            "training_anchor": float(np.mean(train_scores)), "training_anchor_std": spread(train_scores),
            "runs": len(held_scores), "seconds": round(seconds, 1), **extra}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| row | held-out anchor | training-item anchor | runs | wall s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['held_out_anchor']:.3f} ± {r['held_out_anchor_std']:.3f} | "
                     f"{r['training_anchor']:.3f} ± {r['training_anchor_std']:.3f} | {r['runs']} | {r['seconds']} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="LRCL (or CRRL) checkpoint folder")
    parser.add_argument("--data", default="ml-100k")
    parser.add_argument("--fraction", type=float, default=0.2, help="held-out share (CRRL's eval_item_fraction)")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="share of the training items kept out of training to early-stop on")
    parser.add_argument("--refresh-steps", type=int, default=10,
                        help="the targets' table is re-encoded every this many steps (CRRL's "
                             "reference_refresh_steps); the learner's validation check runs at every refresh")
    parser.add_argument("--patience", type=int, default=5, help="validation checks without improvement to stop")
    parser.add_argument("--oracle-steps", type=int, default=40)
    parser.add_argument("--oracle-lr", type=float, default=0.5, help="Adam lr as a multiple of RMS(mu)")
    parser.add_argument("--module-steps", type=int, default=200)
    parser.add_argument("--module-items", type=int, default=32)
    parser.add_argument("--module-lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    parser.add_argument("--module-train", choices=MODULE_TRAIN, default="module",
                        help="what the supervised learner changes (see the module docstring)")
    parser.add_argument("--negative-sampling", choices=("uniform", "popularity"), default="uniform",
                        help="the supervised learner's negatives (CRRL's negative_sampling)")
    parser.add_argument("--candidate-num", type=int, default=10, help="the supervised learner's candidates per item")
    parser.add_argument("--map-dim", type=int, default=64, help="output size of the references' linear map")
    parser.add_argument("--map-steps", type=int, default=300, help="training steps of the references' linear map")
    parser.add_argument("--skip-oracle", action="store_true", help="no per-item oracle")
    parser.add_argument("--skip-learner", action="store_true", help="no supervised learner")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prefix-cache-gb", type=float, default=2.0,
                        help="memory for the frozen LLM's prefix states across refreshes (module learner, oracle)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the learner and of the references' maps (mean ± std over them)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.refresh_steps < 1:
        parser.error(f"--refresh-steps must be >= 1, got {args.refresh_steps}")
    if not 0.0 < args.validation_fraction < 1.0:
        parser.error(f"--validation-fraction must be in (0, 1), got {args.validation_fraction}")
    return args


def main(argv=None) -> None:
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.candidates import CooccurrenceCandidates
    from reaemb_trl.cooccurrence_projection import bag_of_token_embeddings, item_texts
    from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items
    from reaemb_trl.data.canonical import load_interactions, read_items
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.hardware import fast_bf16_available
    from reaemb_trl.provenance import provenance

    args = parse_args(argv)
    began = time.time()
    folder = resolve_dataset(args.data)
    catalogue = {it["item_id"]: it["attributes"] for it in read_items(folder)}
    ids = list(catalogue)
    sequences = load_interactions(folder, item_ids=ids)
    held = held_out_items(ids, args.fraction)
    index = CooccurrenceCandidates.from_sequences(  # the learner's candidates; its negatives are seeded per run
        sequences, ids, candidate_num=args.candidate_num, pos_num=1, seed=0, positive_score="cosine",
        min_support=2, negative_sampling=args.negative_sampling)
    scorable = sorted(set(index.items_with_positives()) - set(held))
    validation_ids = set(held_out_items(scorable, args.validation_fraction, seed=VALIDATION_SEED))
    train_ids = [i for i in scorable if i not in validation_ids]
    yardstick = CRRLYardstick(sequences, ids, held)
    fit_yardstick = CRRLYardstick(sequences, ids, train_ids)
    validation = CRRLYardstick(sequences, ids, sorted(validation_ids))

    def scores(table):
        return yardstick.score(table, ids)[SCORE], fit_yardstick.score(table, ids)[SCORE]

    embedder = ThoughtEmbedder.from_pretrained(args.checkpoint, device=args.device).eval()
    embedder.requires_grad_(False)
    dtype = torch.bfloat16 if fast_bf16_available(embedder.device) else None
    encoder = game_encoder(embedder, catalogue, args.batch_size, args.prefix_cache_gb, args.module_train)
    rows = []
    if not (args.skip_oracle and args.skip_learner):  # the learners' start; the references need no LLM pass
        tic = time.time()
        start = catalogue_table(encoder, dtype)
        rows.append(summary_row("starting table (the checkpoint)", *([s] for s in scores(start)), time.time() - tic))

    def timed(make):
        tic = time.time()
        return make(), time.time() - tic

    texts = item_texts([catalogue[i] for i in ids], embedder.formatter)
    one_hot = timed(lambda: attribute_one_hot([catalogue[i] for i in ids])[0])
    features = {"bag of input-token embeddings": timed(
        lambda: bag_of_token_embeddings(embedder.model, embedder.tokenizer, texts))}
    if one_hot[0].shape[1]:  # a catalogue without genres or years has no one-hot row
        features = {"attribute one-hot (genres + 5-year bucket)": one_hot, **features}
    for name, runs in reference_tables(features, sequences, ids, held, args.seeds, args.map_dim,
                                       args.map_steps).items():
        held_scores, train_scores = zip(*(scores(table) for table, _ in runs))
        rows.append(summary_row(name, list(held_scores), list(train_scores), sum(s for _, s in runs) / len(runs)))

    if not args.skip_oracle:
        tic = time.time()
        task = yardstick.anchor_tasks["normalized"]
        table, moved = per_item_oracle(embedder, encoder, start, ids, task, args.oracle_steps, args.refresh_steps,
                                       args.oracle_lr, args.batch_size, dtype)
        rows.append(summary_row("per-item oracle (held-out thoughts optimised on their own candidates)",
                                *([s] for s in scores(table)), time.time() - tic,
                                relative_thought_change=moved, steps=args.oracle_steps))

    if not args.skip_learner:
        initial = {k: v.detach().clone() for k, v in embedder.state_dict().items()
                   if "lora_" in k or k.startswith("thought_module.")}
        held_scores, train_scores, runs, tic = [], [], [], time.time()
        for seed in args.seeds:
            embedder.load_state_dict(initial, strict=False)
            torch.manual_seed(seed)
            fit_curve = []
            table, stopper = train_learner(
                embedder, encoder, ids, train_ids, dataclasses.replace(index, seed=seed), validation,
                train=args.module_train, steps=args.module_steps, batch_items=args.module_items, lr=args.module_lr,
                weight_decay=args.weight_decay, refresh_steps=args.refresh_steps, patience=args.patience,
                seed=seed, dtype=dtype, fit=fit_yardstick, fit_curve=fit_curve)
            held_score, train_score = scores(table)
            held_scores.append(held_score)
            train_scores.append(train_score)
            runs.append({"seed": seed, "best_step": stopper.best_step, "validation": stopper.history,
                         "training_items": fit_curve})
        rows.append(summary_row(f"supervised learner ({args.module_train}, early-stopped)", held_scores,
                                train_scores, (time.time() - tic) / len(args.seeds), seed_runs=runs,
                                steps=args.module_steps, items_per_step=args.module_items, lr=args.module_lr,
                                weight_decay=args.weight_decay, negative_sampling=args.negative_sampling,
                                candidate_num=args.candidate_num))
    print(markdown_table(rows))
    result = {"checkpoint": str(args.checkpoint), "data": str(folder), "score": SCORE, "held_out_items": len(held),
              "training_items": len(train_ids), "validation_items": len(validation_ids),
              "refresh_steps": args.refresh_steps, "seeds": args.seeds, "rows": rows,
              "seconds": round(time.time() - began, 1), "provenance": provenance("bfloat16" if dtype else "float32")}
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
