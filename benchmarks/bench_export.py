"""Export (`ThoughtEmbedder.encode`), every variant in the same process with interleaved repeats:

- `literal, unsorted, fp32`: two full passes per item, batches in input order (the method as written);
- `fast`: prefix pass + cached 2-token suffix, length-sorted batches, every row runs the whole prompt (the path
  before template sharing);
- `fast+template`: the prompt template runs once, its keys/values serve every batch (same numbers).

    python -m benchmarks.bench_export --backbone tiny
    python -m benchmarks.bench_export --backbone smollm2 --items 0 --batch 32 --dtypes bfloat16 --no-literal
    python -m benchmarks.bench_export --backbone qwen2.5-0.5b-random --device cuda --items 1024 --batch 64 \
        --prompts synthetic --json out.json

Prompts: MovieLens-100k items (`--prompts ml-100k`, default when available; `--items 0` = all 1,682) or synthetic
items rendered by the same formatter (`--prompts synthetic`, up to `--tokens` tokens, lengths varying down to half).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from benchmarks.bench_lrcl import ml100k_items, synthetic_items
from benchmarks.common import build_embedder, machine, peak_memory, print_table, timed
from reaemb_trl.hardware import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", default="ml-100k", choices=["ml-100k", "synthetic"])
    parser.add_argument("--items", type=int, default=256, help="items to export; 0: all (ML-100k)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128, help="longest synthetic prompt")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"],
                        help="precisions of the fast rows (default: float32, plus bfloat16 where it is fast)")
    parser.add_argument("--no-literal", action="store_true", help="skip the literal row (slow for many items)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 keeps timings sane on a machine shared with other jobs")
    parser.add_argument("--json", metavar="PATH", help="also write the rows (and the settings) as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from reaemb_trl.hardware import fast_bf16_available

    embedder = build_embedder(args.backbone, args.device).eval()
    items = ml100k_items(args.items) if args.prompts == "ml-100k" else None
    prompts = "ml-100k" if items is not None else "synthetic"
    if items is None:
        rng = np.random.default_rng(1)
        lengths = rng.integers(args.tokens // 2, args.tokens + 1, size=args.items or 256)
        items = [synthetic_items(embedder, 1, int(n), seed=i)[0] for i, n in enumerate(lengths)]
    ids = embedder.prefix_ids(items)
    dtypes = args.dtypes or ["float32"] + (["bfloat16"] if fast_bf16_available(torch.device(args.device)) else [])

    variants = [] if args.no_literal else [("literal, unsorted, fp32", "literal", False, None, False)]
    for name in dtypes:
        dtype = getattr(torch, name) if name != "float32" else None
        short = "fp32" if name == "float32" else "bf16"
        variants += [(f"fast, {short}", "fast", True, dtype, False),
                     (f"fast+template, {short}", "fast", True, dtype, True)]

    outputs: dict[str, torch.Tensor] = {}

    def encode(label, method, sort, dtype, share):
        def run():
            embedder.share_template = share
            outputs[label] = embedder.encode(items, batch_size=args.batch, method=method, sort_by_length=sort,
                                             dtype=dtype)

        return run

    runs = [encode(*v) for v in variants]
    peaks = []
    for run in runs:  # one untimed run each: warm-up and peak memory
        with peak_memory(args.device) as mem:
            run()
        peaks.append(mem["peak_mib"])
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(args.repeats):  # interleaved: a load change on a shared machine hits every variant alike
        for i, run in enumerate(runs):
            times[i].append(timed(run, args.device, repeats=1, warmup=0))
    medians = [float(np.median(t)) for t in times]
    rows = []
    for (label, _, _, dtype, share), seconds, peak in zip(variants, medians, peaks):
        row = {"path": label, "seconds": round(seconds, 2), "items_per_s": round(len(items) / seconds, 2),
               "peak_mib": round(peak)}
        if share:  # against the same precision without template sharing
            row["vs_fast"] = round(medians[[v[0] for v in variants].index(label.replace("+template", ""))] / seconds, 3)
        if not args.no_literal:
            row["vs_literal"] = round(medians[0] / seconds, 3)
        rows.append(row)
    relative = lambda a, b: (a - b).abs().max().item() / b.abs().max().item()  # noqa: E731
    differences = {}
    for name in dtypes:
        short = "fp32" if name == "float32" else "bf16"
        differences[f"max |template - fast| {short} (relative to max |value|)"] = relative(
            outputs[f"fast+template, {short}"], outputs[f"fast, {short}"])
    if not args.no_literal and "float32" in dtypes:
        differences["max |template - literal| fp32 (relative)"] = relative(
            outputs["fast+template, fp32"], outputs["literal, unsorted, fp32"])

    shared = embedder.template_length(ids)
    where = machine() if args.device.startswith("cuda") else f"{cpu_model() or 'unknown CPU'}; {machine()}"
    title = (f"export | {args.backbone} | {prompts} | {len(items)} items, batch {args.batch}, "
             f"{np.mean([len(i) + 2 for i in ids]):.1f} tokens/prompt (max {max(len(i) for i in ids) + 2}), "
             f"template {shared} tokens | {where}")
    print(title)
    fmt = lambda v: f"{v:.2f}x" if isinstance(v, float) else ""  # noqa: E731
    print_table([{**r, "vs_fast": fmt(r.get("vs_fast")), "vs_literal": fmt(r.get("vs_literal"))} for r in rows],
                ["path", "seconds", "items_per_s", "peak_mib", "vs_fast", "vs_literal"])
    for name, value in differences.items():
        print(f"{name} = {value:.1e}")
    if args.json:
        report = {"benchmark": "export", "command": " ".join(["python"] + sys.argv), "machine": where, "title": title,
                  "settings": {**vars(args), "prompts": prompts, "items": len(items), "template_tokens": shared},
                  "rows": rows, "differences": differences}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
