"""Paired tests between item tables over the same test users.

Per user, NDCG@10 is averaged over the seeds of a table; two tables are compared with the Wilcoxon signed-rank
test on those per-user values (two-sided; users where both tables score the same are dropped, as the test
prescribes, and ties among the differences get average ranks). The p-values of one family (all pairs, within one
user group) are Holm-corrected.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from reaemb_trl.evaluation.config import FIXED_TABLES

ALPHA = 0.05


def ndcg_at(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k of a single relevant item at 1-based `ranks`."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def wilcoxon_signed_rank(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    """(statistic, two-sided p-value, number of non-zero differences) for paired samples x, y.

    Zero differences are dropped; p = 1 when nothing differs. scipy's implementation (exact for small samples
    without ties, normal approximation with tie correction otherwise)."""
    from scipy.stats import wilcoxon

    diff = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    nonzero = int(np.count_nonzero(diff))
    if nonzero == 0:
        return 0.0, 1.0, 0
    result = wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    return float(result.statistic), float(result.pvalue), nonzero


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given): step-down, monotone, capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def parse_pair(pair: str | Sequence[str]) -> tuple[str, str]:
    if isinstance(pair, str):
        a, sep, b = pair.partition(":")
        if not sep or not a or not b:
            raise ValueError(f"a comparison is written A:B (two table names), got {pair!r}")
        return a, b
    a, b = pair
    return str(a), str(b)


def default_pairs(names: Sequence[str], extra: Iterable[str | Sequence[str]] = (),
                  baselines: bool = True, references: Sequence[str] = ()) -> list[tuple[str, str]]:
    """With `baselines`: every table against `id`, and every LLM table (not id/mostpop/raw, nor one of the
    `references`: the score ensembles, tested against id only) against `raw` when a `raw` table exists; then the
    `extra` pairs (e.g. stage against stage: lrcl:raw, crrl:lrcl). Duplicates are dropped."""
    pairs: list[tuple[str, str]] = []
    llm = [n for n in names if n not in FIXED_TABLES and n.split("@")[0] != "raw" and n not in references]
    if baselines and "id" in names:
        pairs += [(n, "id") for n in names if n != "id"]
    if baselines and "raw" in names:
        pairs += [(n, "raw") for n in llm]
    for pair in extra:
        a, b = parse_pair(pair)
        for name in (a, b):
            if name not in names:
                raise ValueError(f"comparison {a}:{b} names table {name!r}, which is not among {list(names)}")
        pairs.append((a, b))
    seen, unique = set(), []
    for pair in pairs:
        if pair not in seen and (pair[1], pair[0]) not in seen:
            seen.add(pair)
            unique.append(pair)
    return unique


def paired_tests(per_user: dict[str, np.ndarray], pairs: Sequence[tuple[str, str]],
                 groups: dict[str, np.ndarray]) -> list[dict]:
    """For each group and pair: mean per-user NDCG@10 of A and B, the Wilcoxon p-value, the Holm-corrected p
    (family: every pair within the group) and whether A is significantly above or below B at ALPHA."""
    rows = []
    for group, mask in groups.items():
        family = []
        for a, b in pairs:
            x, y = per_user[a][mask], per_user[b][mask]
            statistic, p, nonzero = wilcoxon_signed_rank(x, y) if mask.any() else (0.0, 1.0, 0)
            family.append({"a": a, "b": b, "group": group, "users": int(mask.sum()), "differing_users": nonzero,
                           "mean_a": float(x.mean()) if mask.any() else math.nan,
                           "mean_b": float(y.mean()) if mask.any() else math.nan,
                           "statistic": statistic, "p": p})
        for row, adjusted in zip(family, holm([r["p"] for r in family])):
            row["p_holm"] = adjusted
            row["diff"] = row["mean_a"] - row["mean_b"]
            row["significant"] = bool(adjusted < ALPHA)
        rows.extend(family)
    return rows


def verdict(row: dict) -> str:
    """One plain sentence per comparison, e.g. "lrcl beats raw (NDCG@10 0.0412 vs 0.0351, Holm p = 0.003)"."""
    a, b = row["a"], row["b"]
    numbers = f"NDCG@10 {row['mean_a']:.4f} vs {row['mean_b']:.4f}, Holm p = {row['p_holm']:.3g}"
    if not row["significant"]:
        return f"{a} vs {b}: no significant difference ({numbers})"
    return f"{a} {'beats' if row['diff'] > 0 else 'is below'} {b} ({numbers})"
