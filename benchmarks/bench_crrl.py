"""CRRL step: literal per-copy path (full passes for every noisy copy and every candidate, the policy loss re-runs
pass 1) vs the fast path (each prefix encoded once, shared by all copies and iterations; only the 2-token suffix per
action; the policy loss runs no LLM pass). Same process, same data.

    python -m benchmarks.bench_crrl --backbone tiny
    python -m benchmarks.bench_crrl --backbone smollm2 --items 4 --generations 8 --candidates 10
    python -m benchmarks.bench_crrl --backbone qwen2.5-0.5b-random --device cuda --dtype bfloat16 --json crrl.json

A step = generate and score (embed B x G actions and B x N candidates, rewards, advantages) + num_iterations
policy-loss evaluations with backward, as TRL's buffering does with num_iterations=2.
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import build_embedder, machine, peak_memory, print_table, random_prefixes, timed, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--items", type=int, default=4, help="items (groups) per step")
    parser.add_argument("--generations", type=int, default=8, help="G")
    parser.add_argument("--candidates", type=int, default=10, help="N")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="backbone weights (the paper's CRRL config freezes the LLM in bfloat16)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows (and the settings) as JSON")
    args = parser.parse_args()

    from datasets import Dataset

    from reaemb_trl.crrl_config import CRRLConfig
    from reaemb_trl.crrl_trainer import CRRLTrainer

    import torch

    embedder = build_embedder(args.backbone, args.device, dtype=getattr(torch, args.dtype))
    embedder.thought_module.float()  # the policy (thought module) trains in float32, as in CRRL's recipe
    n_items = args.items * (args.candidates + 1)
    tokenizer = embedder.tokenizer
    prefixes = random_prefixes(embedder, n_items, args.tokens, jitter=args.tokens // 4)
    # Items are given as text that tokenises back to roughly these prefixes' lengths.
    catalogue = {str(i): [("text", tokenizer.decode(p[: args.tokens // 2]))] for i, p in enumerate(prefixes)}
    rows = []
    for i in range(args.items):
        cands = [str(args.items + i * args.candidates + j) for j in range(args.candidates)]
        rows.append({"item_id": str(i), "attributes": [{"key": "text", "value": catalogue[str(i)][0][1]}],
                     "candidate_ids": cands, "positive_weights": [1.0] + [0.0] * (args.candidates - 1)})
    dataset = Dataset.from_list(rows)
    full_catalogue = Dataset.from_list([{"item_id": k, "attributes": [{"key": "text", "value": v[0][1]}]}
                                        for k, v in catalogue.items()])
    inputs = [row for row in rows for _ in range(args.generations)]

    results = []
    for method in ("literal", "fast"):
        with tempfile.TemporaryDirectory() as out:
            config = CRRLConfig(output_dir=out, forward_method=method, num_generations=args.generations,
                                per_device_train_batch_size=args.items * args.generations,
                                candidate_num=args.candidates, use_cpu=args.device == "cpu", report_to="none",
                                reward_funcs=["softmax"], max_steps=1)
            trainer = CRRLTrainer(embedder, config, train_dataset=dataset, catalogue=full_catalogue)
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise

            def step():
                batch = trainer._generate_and_score_completions(inputs)
                for _ in range(args.iterations):
                    trainer._compute_loss(trainer.model, batch).backward()

            with peak_memory(args.device) as mem:
                seconds = timed(step, args.device, args.repeats)
        results.append({"path": method, "step_ms": round(seconds * 1e3, 1),
                        "actions_per_s": round(args.items * args.generations / seconds, 2),
                        "peak_mib": round(mem["peak_mib"]), "seconds": seconds})
    for row in results:
        row["vs_literal"] = round(results[0]["seconds"] / row["seconds"], 3)
    title = (f"CRRL step | {args.backbone} | {args.items} items x G {args.generations}, N {args.candidates}, "
             f"{args.iterations} iterations | {args.dtype} | {machine()}")
    print(title)
    print_table([{**r, "vs_literal": f"{r['vs_literal']:.2f}x"} for r in results],
                ["path", "step_ms", "actions_per_s", "peak_mib", "vs_literal"])
    if args.json:
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in results]
        write_json(args.json, "crrl_step", title, vars(args), rows)


if __name__ == "__main__":
    main()
