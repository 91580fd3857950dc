"""LRCL training step: literal two-pass path vs the fast prefix + cached 2-token suffix path, same process.

    python benchmarks/bench_lrcl.py --backbone tiny
    python benchmarks/bench_lrcl.py --backbone smollm2 --batch 8 --tokens 128 --dtype bfloat16
    python benchmarks/bench_lrcl.py --backbone qwen2.5-0.5b-random --device cuda --batch 64 --tokens 128 --dtype bfloat16

A step is: embed B items x 2 views, soft contrastive loss, backward, AdamW step. Prints items/s, peak memory,
the fast/literal ratio and, on CUDA, the model-FLOPs utilisation (6 x parameters x tokens / time / peak).
"""

from __future__ import annotations

import argparse

import torch

from common import build_embedder, machine, peak_memory, print_table, random_prefixes, timed

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="items per step (x2 views)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    from reaemb_trl.losses import contrastive_loss

    autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    embedder = build_embedder(args.backbone, args.device)
    embedder.train()
    if args.gradient_checkpointing:
        embedder.model.gradient_checkpointing_enable()
    prefixes = random_prefixes(embedder, 2 * args.batch, args.tokens)
    params = [p for p in embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    tau = torch.tensor(1.0, device=args.device)
    n_params = sum(p.numel() for n, p in embedder.model.named_parameters() if "embed_tokens" not in n)

    def step(method: str):
        def run():
            with torch.autocast(args.device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = embedder(prefixes, method=method)
                loss = contrastive_loss(out[: args.batch], out[args.batch :], tau)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    rows = []
    for method in ("literal", "fast"):
        with peak_memory(args.device) as mem:
            seconds = timed(step(method), args.device, args.repeats)
        row = {"path": method, "step_ms": f"{seconds * 1e3:.0f}", "items_per_s": f"{args.batch / seconds:.2f}",
               "peak_mib": f"{mem['peak_mib']:.0f}", "_s": seconds}
        if args.device.startswith("cuda"):
            peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
            if peak:
                row["mfu"] = f"{6 * n_params * 2 * args.batch * args.tokens / seconds / (peak * 1e12):.1%}"
        rows.append(row)
    rows[1]["speedup"] = f"{rows[0]['_s'] / rows[1]['_s']:.2f}x"
    print(f"LRCL step | {args.backbone} | {args.batch} items x 2 views x {args.tokens} tokens | {args.dtype} | "
          f"{machine()}")
    print_table(rows, ["path", "step_ms", "items_per_s", "peak_mib", "speedup", "mfu"])


if __name__ == "__main__":
    main()
