"""Build time of the CRRL co-occurrence candidate index on a synthetic log (default 100k items, 3M interactions).

    python -m benchmarks.bench_candidates                       # 100k items, ~3M interactions
    python -m benchmarks.bench_candidates --items 10000 --interactions 300000

Prints the index build time (from `{user: [items]}`, training interactions only) and the time to draw the
candidates of one training batch and of a whole epoch's worth of items (extrapolated from batches).
Item popularity is Zipf-like (exponent 0.8) and user lengths geometric, so popular items co-occur with a large
share of the catalogue, as in real logs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from reaemb_trl.candidates import CooccurrenceCandidates


def synthetic_log(num_items: int, num_interactions: int, mean_length: int, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    num_users = max(1, num_interactions // mean_length)
    lengths = np.maximum(rng.geometric(1 / mean_length, num_users), 3)
    lengths = (lengths * num_interactions / lengths.sum()).astype(np.int64) + 1
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    items = rng.choice(num_items, int(lengths.sum()), p=popularity / popularity.sum())
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    names = np.asarray([f"i{i}" for i in range(num_items)], dtype=object)
    return {f"u{u}": names[items[bounds[u] : bounds[u + 1]]].tolist() for u in range(num_users)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=3_000_000)
    parser.add_argument("--mean-length", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="items per candidate draw (one training batch)")
    parser.add_argument("--batches", type=int, default=20, help="batches timed for the epoch estimate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    log = synthetic_log(args.items, args.interactions, args.mean_length, args.seed)
    t1 = time.perf_counter()
    total = sum(len(s) for s in log.values())
    print(f"synthetic log: {len(log):,} users, {args.items:,} items, {total:,} interactions ({t1 - t0:.1f} s)")

    t0 = time.perf_counter()
    index = CooccurrenceCandidates.from_sequences(log, [f"i{i}" for i in range(args.items)], candidate_num=10, pos_num=1)
    build = time.perf_counter() - t0
    print(f"index build (training interactions only): {build:.2f} s")

    t0 = time.perf_counter()
    trainable = index.items_with_positives()
    print(f"items with a co-occurring positive: {len(trainable):,} ({time.perf_counter() - t0:.2f} s)")

    rng = np.random.default_rng(args.seed)
    times = []
    for b in range(args.batches):
        batch = [trainable[i] for i in rng.choice(len(trainable), args.batch, replace=False)]
        t0 = time.perf_counter()
        index.candidates(batch, epoch=b)
        times.append(time.perf_counter() - t0)
    per_batch = float(np.mean(times))
    print(
        f"candidates for a batch of {args.batch} items: {1000 * per_batch:.1f} ms "
        f"(max {1000 * max(times):.1f} ms); one epoch over {len(trainable):,} items ~ "
        f"{per_batch * len(trainable) / args.batch:.1f} s, spread over the training steps"
    )


if __name__ == "__main__":
    main()
