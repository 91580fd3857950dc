"""Export: literal path (two full passes, unsorted batches) vs fast path (prefix + cached suffix, length-sorted),
the same batch size, same process.

    python benchmarks/bench_export.py --backbone tiny
    python benchmarks/bench_export.py --backbone smollm2 --items 256 --batch 16
    python benchmarks/bench_export.py --backbone qwen2.5-0.5b-random --device cuda --items 256 --batch 64
"""

from __future__ import annotations

import argparse

import torch

from common import build_embedder, machine, peak_memory, print_table, random_prefixes, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="longest prompt; lengths vary down to half of it")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from reaemb_trl.export import fast_bf16_available

    embedder = build_embedder(args.backbone, args.device).eval()
    prefixes = random_prefixes(embedder, args.items, args.tokens, jitter=args.tokens // 2)

    @torch.no_grad()
    def encode(method: str, sort: bool, dtype=None):
        order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i])) if sort else list(range(len(prefixes)))
        out = torch.empty(len(prefixes), embedder.thought.hidden_size)
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            for start in range(0, len(order), args.batch):
                rows = order[start : start + args.batch]
                out[rows] = embedder([prefixes[i] for i in rows], method=method).float().cpu()
        return out

    variants = [("literal, unsorted, fp32", "literal", False, None), ("fast, sorted, fp32", "fast", True, None)]
    if fast_bf16_available(torch.device(args.device)):
        variants.append(("fast, sorted, bf16", "fast", True, torch.bfloat16))
    rows, outputs = [], {}
    for label, method, sort, dtype in variants:
        with peak_memory(args.device) as mem:
            seconds = timed(lambda: outputs.__setitem__(label, encode(method, sort, dtype)), args.device, args.repeats)
        rows.append({"path": label, "seconds": f"{seconds:.2f}", "items_per_s": f"{args.items / seconds:.1f}",
                     "peak_mib": f"{mem['peak_mib']:.0f}", "_s": seconds})
    for row in rows[1:]:
        row["speedup"] = f"{rows[0]['_s'] / row['_s']:.2f}x"
    diff = (outputs[variants[0][0]] - outputs[variants[1][0]]).abs().max().item()
    print(f"export | {args.backbone} | {args.items} items, batch {args.batch}, <= {args.tokens} tokens | {machine()}")
    print_table(rows, ["path", "seconds", "items_per_s", "peak_mib", "speedup"])
    print(f"max |fast - literal| (fp32) = {diff:.2e}")


if __name__ == "__main__":
    main()
