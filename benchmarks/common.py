"""Shared by the benchmark scripts: backbones, timing and peak-memory measurement. Run by hand, never in CI."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch

BACKBONES = ("tiny", "smollm2", "qwen2.5-0.5b-random")
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, matched against torch.cuda.get_device_name() in this order.
BF16_PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
                    ("A10G", 70.0), ("L4", 121.0))  # fmt: skip


def qwen2_5_0_5b_config(**overrides):
    """Qwen2.5-0.5B's architecture (from its published config.json), for random-weight models: nothing is fetched."""
    from transformers import Qwen2Config

    shape = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=32768, rms_norm_eps=1e-6)  # fmt: skip
    return Qwen2Config(**{**shape, **overrides})


def bf16_peak_tflops(device_name: str | None = None) -> float | None:
    """The card's dense bf16 peak, or None when the card is not in the table (or there is no GPU)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


def build_embedder(name: str, device: str, lora: bool = True, dtype: torch.dtype | None = None):
    """A ThoughtEmbedder over `tiny` (2-layer Llama, hidden 64), `smollm2` (embedded) or a Qwen2.5-0.5B-shaped model
    with random weights (no download)."""
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM

    from reaemb_trl.embedder import ThoughtEmbedder

    torch.manual_seed(0)
    assets = os.path.join(os.path.dirname(__file__), "..", "tests", "assets", "tiny_tokenizer")
    if name == "smollm2":
        embedder = ThoughtEmbedder.from_backbone("smollm2", dtype=dtype)
    else:
        if name == "tiny":
            model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        elif name == "qwen2.5-0.5b-random":
            # Initialised on the target device: 494M random numbers take seconds on a CPU, nothing on a GPU.
            with torch.device(device):
                model = Qwen2ForCausalLM(qwen2_5_0_5b_config())
        else:
            raise SystemExit(f"unknown backbone {name!r}; choose from {BACKBONES}")
        if dtype is not None:
            model = model.to(dtype)
        embedder = ThoughtEmbedder(model, AutoTokenizer.from_pretrained(assets), backbone=None)
    if lora:
        embedder.attach_lora(LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"]))
    return embedder.to(device)


def random_prefixes(embedder, count: int, tokens: int, seed: int = 0, jitter: int = 0) -> list[list[int]]:
    """`count` prefixes of `tokens - 2` random ids (the thought token and EOS make `tokens`); optional length jitter."""
    gen = torch.Generator().manual_seed(seed)
    vocab = min(len(embedder.tokenizer), 30000) - 10
    lengths = [tokens - 2 - (int(torch.randint(0, jitter + 1, (1,), generator=gen)) if jitter else 0)
               for _ in range(count)]
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in lengths]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: str):
    """Yields a dict that gets `peak_mib`: CUDA peak allocated, or peak resident-set growth sampled every 2 ms."""
    result: dict[str, float] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    import gc

    gc.collect()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mib"] = (max(peak[0], _rss_bytes()) - base) / 2**20


def timed(fn, device: str, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def write_json(path: str, benchmark: str, title: str, settings: dict, rows: list[dict], **extra) -> None:
    """The printed rows as JSON, in the layout every benchmark script writes: benchmark, command, machine, title,
    settings, rows (numbers as numbers), plus `extra`."""
    import json
    import sys

    report = {"benchmark": benchmark, "command": " ".join(["python", *sys.argv]), "machine": machine(),
              "title": title, "settings": settings, "rows": rows, **extra}
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def parse_table(text: str) -> tuple[str, list[dict]]:
    """The last table `print_table` wrote into `text`, back as (title line, rows of strings)."""
    lines = [line.rstrip() for line in text.splitlines()]
    seps = [i for i, line in enumerate(lines) if line and set(line.replace(" ", "")) <= {"-", "|"} and "|" in line]
    if not seps or seps[-1] < 1:
        raise ValueError("no table found in the output")
    sep = seps[-1]
    header = [c.strip() for c in lines[sep - 1].split(" | ")]
    rows = []
    for line in lines[sep + 1 :]:
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) != len(header):
            break
        rows.append({h: c for h, c in zip(header, cells) if c})
    return (lines[sep - 2] if sep >= 2 else ""), rows
