"""LRCL training step, every variant in the same process with interleaved repeats:

- `literal`: two full passes per row (the method as written);
- `fast`: prefix pass + cached 2-token suffix, every row runs the whole prompt (the path before template sharing);
- `fast+template`: the batch's common prompt template runs once per step (same numbers);
- `fast+template, lora top k`: LoRA on the top k decoder layers only (`lora_layers`; the layers below keep no
  activations).

    python -m benchmarks.bench_lrcl --backbone tiny
    python -m benchmarks.bench_lrcl --backbone smollm2 --batch 12 --dtype bfloat16 --lora-layers 8 4
    python -m benchmarks.bench_lrcl --backbone qwen2.5-0.5b-random --device cuda --batch 64 --dtype bfloat16 \
        --prompts synthetic --tokens 128 --json out.json

Prompts: two attribute-dropout views of real MovieLens-100k items (`--prompts ml-100k`, the default when the
embedded data set is available), or synthetic items rendered by the same prompt formatter (`--prompts synthetic`:
the real template, random words as attribute values, about `--tokens` tokens). A step is: embed B items x 2 views,
soft contrastive loss, backward, AdamW step. Prints the median step time, items/s, peak memory, the memory autograd
keeps for backward ("saved"), the ratio to `fast` and, on CUDA, the model-FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import numpy as np
import torch

from benchmarks.common import bf16_peak_tflops, build_embedder, machine, peak_memory, print_table, timed
from reaemb_trl.hardware import cpu_model

WORDS = ("drama comedy action thriller romance war western crime family music night city river story love "
         "house return dark star game man woman secret last first world summer winter king island road").split()


def ml100k_items(count: int) -> list | None:
    try:
        from reaemb_trl.assets import resolve_dataset
        from reaemb_trl.data.canonical import load_items

        items = load_items(resolve_dataset("ml-100k"))
    except Exception as error:  # noqa: BLE001 (not cached, no network): fall back to synthetic prompts
        print(f"MovieLens-100k unavailable ({error}); using synthetic prompts", file=sys.stderr)
        return None
    return list(items["attributes"][:count]) if count else list(items["attributes"])


def synthetic_items(embedder, count: int, tokens: int, seed: int = 0) -> list:
    """Items with random-word values whose rendered prompt is about `tokens` tokens (thought and EOS included)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        attrs = [("title", ""), ("genres", "")]
        while len(embedder.formatter.prefix_ids(attrs, embedder.tokenizer)) < tokens - 2:
            key = int(rng.integers(2))
            attrs[key] = (attrs[key][0], (attrs[key][1] + " " + str(rng.choice(WORDS))).strip())
        items.append(attrs)
    return items


def saved_mib(fn) -> float:
    """MiB of distinct tensors autograd keeps for backward during `fn()` (the activation memory of a step)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="items per step (x2 views)")
    parser.add_argument("--prompts", default="ml-100k", choices=["ml-100k", "synthetic"])
    parser.add_argument("--tokens", type=int, default=58, help="synthetic prompt length (ML-100k prompts: ~58)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast precision")
    parser.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="precision of the frozen backbone weights (LoRA and the thought module stay float32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-layers", type=int, nargs="*", default=[8, 4], help="k values for top-k LoRA rows")
    parser.add_argument("--no-literal", action="store_true", help="skip the literal rows (slow on big batches)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 keeps timings sane on a machine shared with other jobs")
    parser.add_argument("--json", metavar="PATH", help="also write the rows (and the settings) as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig

    from reaemb_trl.lrcl_loss import contrastive_loss
    from reaemb_trl.lrcl_trainer import draw_views
    from reaemb_trl.prompt import normalise_attributes

    autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    if args.model_dtype == "bfloat16" and args.dtype != "bfloat16":
        parser.error("--model-dtype bfloat16 needs --dtype bfloat16 (autocast)")
    base = build_embedder(args.backbone, args.device, lora=False, dtype=getattr(torch, args.model_dtype))
    items = ml100k_items(args.batch) if args.prompts == "ml-100k" else None
    prompts = "ml-100k" if items is not None else "synthetic"
    if items is None:
        items = synthetic_items(base, args.batch, args.tokens)
    rng = np.random.default_rng(0)
    views = [draw_views(normalise_attributes(a), 0.4, rng) for a in items]
    prefixes = [base.formatter.prefix_ids(v[0], base.tokenizer) for v in views]
    prefixes += [base.formatter.prefix_ids(v[1], base.tokenizer) for v in views]
    tokens = sum(len(p) + 2 for p in prefixes) / len(prefixes)

    def with_lora(layers: int | None):
        embedder = copy.deepcopy(base)
        total = embedder.model.config.get_text_config().num_hidden_layers
        embedder.attach_lora(LoraConfig(
            r=8, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            layers_to_transform=None if layers is None else list(range(total - layers, total)),
        ))
        embedder.train()
        if args.gradient_checkpointing:
            embedder.model.gradient_checkpointing_enable()
        params = [p for p in embedder.parameters() if p.requires_grad]
        return embedder, torch.optim.AdamW(params, lr=1e-5)

    every = with_lora(None)
    variants = [] if args.no_literal else [("literal", every, "literal", False)]
    variants += [("fast", every, "fast", False), ("fast+template", every, "fast", True)]
    for k in args.lora_layers:
        variants.append((f"fast+template, lora top {k}", with_lora(k), "fast", True))
    del base
    tau = torch.tensor(1.0, device=args.device)
    n_params = sum(p.numel() for n, p in every[0].model.named_parameters() if "embed_tokens" not in n)
    shared = every[0].template_length(prefixes)

    def step(embedder, optimizer, method, share):
        def run():
            embedder.share_template = share
            with torch.autocast(args.device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = embedder(prefixes, method=method)
                loss = contrastive_loss(out[: args.batch], out[args.batch :], tau)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    runs = [step(embedder, optimizer, method, share) for _, (embedder, optimizer), method, share in variants]
    peaks, saved = [], []
    for run in runs:  # one untimed step each: warm-up, peak memory, saved activations
        with peak_memory(args.device) as mem:
            saved.append(saved_mib(run))
        peaks.append(mem["peak_mib"])
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(args.repeats):  # interleaved: a load change on a shared machine hits every variant alike
        for i, run in enumerate(runs):
            times[i].append(timed(run, args.device, repeats=1, warmup=0))
    medians = [float(np.median(t)) for t in times]
    reference = medians[[v[0] for v in variants].index("fast")]
    rows = []
    for (label, _, _, share), seconds, peak, kept in zip(variants, medians, peaks, saved):
        row = {"path": label, "step_ms": round(seconds * 1e3, 1), "items_per_s": round(args.batch / seconds, 3),
               "peak_mib": round(peak), "saved_mib": round(kept, 1), "vs_fast": round(reference / seconds, 3)}
        peak_tflops = bf16_peak_tflops() if args.device.startswith("cuda") else None
        if peak_tflops:  # 6 x parameters x the tokens the path runs (a shared template counts once)
            run_tokens = 2 * args.batch * tokens - (2 * args.batch - 1) * shared * share
            row["mfu"] = round(6 * n_params * run_tokens / seconds / (peak_tflops * 1e12), 4)
        rows.append(row)
    where = machine() if args.device.startswith("cuda") else f"{cpu_model() or 'unknown CPU'}; {machine()}"
    title = (f"LRCL step | {args.backbone} | {prompts} | {args.batch} items x 2 views, {tokens:.1f} tokens/prompt, "
             f"template {shared} tokens | autocast {args.dtype}, weights {args.model_dtype} | {where}")
    print(title)
    print_table([{**r, "vs_fast": f"{r['vs_fast']:.2f}x"} for r in rows],
                ["path", "step_ms", "items_per_s", "peak_mib", "saved_mib", "vs_fast", "mfu"])
    if args.json:
        report = {"benchmark": "lrcl_step", "command": " ".join(["python"] + sys.argv), "machine": where,
                  "title": title, "settings": {**vars(args), "prompts": prompts, "tokens_per_prompt": tokens,
                                               "template_tokens": shared}, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
