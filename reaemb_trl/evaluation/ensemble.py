"""The score-ensemble reference: the `id` model and a frozen-table model of the same seed, combined after training.

Per user, each model's scores over the catalogue are z-scored (mean 0, std 1 over items 1..N) and combined as
s = (1 - w) z_id + w z_table, with w from WEIGHT_GRID chosen on the validation split alone (best NDCG@10; the
smallest w on a tie) and then applied to the test split. w = 0 and w = 1 are the two models' own scores, not
normalised, so the grid's ends reproduce their ranks exactly.

Nothing is retrained: each run an ensemble combines keeps its best epoch's `ranking.Scoring` (user states and
item vectors: users x hidden + items x hidden floats, written to the run store), and the scores are rebuilt one
chunk of `eval_batch_size` users at a time, so memory grows with eval_batch_size x catalogue, as in the ranking.
"""

from __future__ import annotations

import time

import numpy as np

from reaemb_trl.evaluation.config import ENSEMBLE, FIXED_TABLES, EvalConfig, RunResult, TableSpec
from reaemb_trl.evaluation.metrics import metrics_from_ranks
from reaemb_trl.evaluation.ranking import RankingEvaluator, Scoring
from reaemb_trl.evaluation.split import SplitData, group_masks

WEIGHT_GRID = tuple(k / 10 for k in range(11))  # the table model's weight w


def ensemble_parts(specs: list[TableSpec]) -> dict[str, tuple[TableSpec, TableSpec]]:
    """{ensemble name: (the id spec, the frozen spec of its file)}: the runs each score ensemble combines."""
    ids = [spec for spec in specs if spec.source == "id"]
    parts = {}
    for spec in specs:
        if spec.mode != ENSEMBLE:
            continue
        if spec.source in FIXED_TABLES:
            raise ValueError(f"table {spec.name!r}: a score ensemble combines id with a table file, not "
                             f"{spec.source!r}")
        frozen = [other for other in specs if other.source == spec.source and other.mode == "frozen"]
        if not ids or not frozen:
            raise ValueError(f"table {spec.name!r} is the score ensemble of 'id' and {spec.source} in frozen mode; "
                             f"add {'id' if not ids else spec.source + ' (frozen mode)'} to the tables")
        parts[spec.name] = (ids[0], frozen[0])
    return parts


def standardized(scores):
    """(B, N + 1) scores z-scored per row over the items (column 0, padding, is ignored)."""
    items = scores[:, 1:]
    return (scores - items.mean(1, keepdim=True)) / items.std(1, keepdim=True).clamp_min(1e-12)


def combined_scores(evaluator: RankingEvaluator, part: str, id_scoring: Scoring, table_scoring: Scoring,
                    weight: float):
    """The ensemble's (B, N + 1) scores of each chunk of `part` ("valid" or "test")."""
    chunks = zip(evaluator.chunk_scores(getattr(id_scoring, f"{part}_states"), id_scoring.items),
                 evaluator.chunk_scores(getattr(table_scoring, f"{part}_states"), table_scoring.items))
    for id_scores, table_scores in chunks:
        if weight == 0.0:
            yield id_scores
        elif weight == 1.0:
            yield table_scores
        else:
            yield (1.0 - weight) * standardized(id_scores) + weight * standardized(table_scores)


def ensemble_ranks(evaluator: RankingEvaluator, part: str, id_scoring: Scoring, table_scoring: Scoring,
                   weight: float) -> np.ndarray:
    return evaluator.ranks_from_scores(combined_scores(evaluator, part, id_scoring, table_scoring, weight))


def choose_weight(valid_eval: RankingEvaluator, id_scoring: Scoring, table_scoring: Scoring,
                  grid=WEIGHT_GRID) -> tuple[float, list[float]]:
    """(the weight with the best validation NDCG@10, the smallest on a tie; validation NDCG@10 per weight)."""
    ndcgs = [metrics_from_ranks(ensemble_ranks(valid_eval, "valid", id_scoring, table_scoring, w), (10,))["NDCG@10"]
             for w in grid]
    best = max(range(len(grid)), key=lambda k: (ndcgs[k], -k))
    return grid[best], ndcgs


def ensemble_run(split: SplitData, spec: TableSpec, config: EvalConfig, id_run: RunResult,
                 table_run: RunResult) -> RunResult:
    """The ensemble of two finished runs of one seed (both with their `scoring`), as a RunResult: test metrics
    per group at the weight chosen on validation; `history` holds the validation NDCG@10 of every weight."""
    if id_run.scoring is None or table_run.scoring is None or id_run.seed != table_run.seed:
        raise ValueError(f"ensemble {spec.name!r} needs the scoring of the id run and of the table run of one seed")
    began, seed = time.time(), id_run.seed
    history = split.resolve_history(config.history)
    valid_eval = RankingEvaluator.for_part(split, "valid", config, history, seed)
    weight, ndcgs = choose_weight(valid_eval, id_run.scoring, table_run.scoring)
    test_eval = RankingEvaluator.for_part(split, "test", config, history, seed)
    ranks = ensemble_ranks(test_eval, "test", id_run.scoring, table_run.scoring, weight)
    masks = group_masks(split, split.test, config.tail_user_threshold, config.tail_item_threshold)
    return RunResult(seed=seed, table=spec.name, best_epoch=0, epochs_run=0, best_valid_ndcg10=max(ndcgs),
                     metrics={g: metrics_from_ranks(ranks[m], config.ks) for g, m in masks.items()},
                     group_sizes={g: int(m.sum()) for g, m in masks.items()}, history=ndcgs,
                     test_ranks=[int(r) for r in ranks], seconds=round(time.time() - began, 2), ensemble_weight=weight)
