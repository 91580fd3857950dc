"""Reader speed: `convert` of a synthetic LC-Rec file (run by hand; the target is under 30 s on 2 cores).

    python -m benchmarks.bench_readers                          # 100k users x 50k items, ~8 items per user
    python -m benchmarks.bench_readers --users 20000 --items 10000

The files are written (pretty-printed, as LC-Rec ships them) into a temporary folder, then `convert` reads them,
validates every id, and writes the canonical folder. Before the lcrec reader recorded line numbers while parsing,
it searched the whole text once per item and user: 20k users took 125 s, 100k about an hour.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def write_lcrec(folder: Path, users: int, items: int, mean_length: int, seed: int = 0) -> Path:
    """X.item.json {id: {title, description, brand, categories}} and X.inter.json {user: [ids]}; returns the
    interaction file."""
    rng = random.Random(seed)
    catalogue = {str(i): {"title": f"Item number {i}", "description": f"A synthetic item, the {i}th of {items}.",
                          "brand": f"brand {i % 997}", "categories": ["Synthetic", f"group {i % 50}"]}
                 for i in range(items)}  # fmt: skip
    sequences = {f"A{u:08d}": [rng.randrange(items) for _ in range(rng.randint(3, 2 * mean_length - 3))]
                 for u in range(users)}  # fmt: skip
    (folder / "Synth.item.json").write_text(json.dumps(catalogue, indent=4), encoding="utf-8")
    inter = folder / "Synth.inter.json"
    inter.write_text(json.dumps(sequences, indent=4), encoding="utf-8")
    return inter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--mean-length", type=int, default=8, help="Mean interactions per user.")
    args = parser.parse_args()

    from reaemb_trl.data import convert

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        began = time.perf_counter()
        inter = write_lcrec(folder, args.users, args.items, args.mean_length)
        written = time.perf_counter() - began
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        began = time.perf_counter()
        dataset = convert("lcrec", inter, folder / "canonical")
        seconds = time.perf_counter() - began
    interactions = sum(len(s) for s in dataset.sequences.values())
    print(json.dumps({"users": len(dataset.sequences), "items": len(dataset.items), "interactions": interactions,
                      "input_mib": round(size, 1), "generate_s": round(written, 1),
                      "convert_s": round(seconds, 1)}, indent=2))


if __name__ == "__main__":
    main()
