"""Downstream evaluation: leave-one-out split, SASRec/GRU4Rec/BERT4Rec, HR/NDCG, reports.

Importing this package is light; torch is imported by the submodules that need it.
"""

from reaemb_trl.evaluation.metrics import (
    full_ranks,
    metrics_from_ranks,
    pessimistic_rank,
    sample_negatives,
    sampled_ranks,
)
from reaemb_trl.evaluation.report import aggregate, plot_ndcg10, render_markdown, write_report
from reaemb_trl.evaluation.split import SplitData, leave_one_out
from reaemb_trl.evaluation.trainer import (
    EvalConfig,
    RankingEvaluator,
    RunResult,
    compare_tables,
    group_masks,
    train_and_evaluate,
)

__all__ = [
    "EvalConfig", "RankingEvaluator", "RunResult", "SplitData", "aggregate", "compare_tables", "full_ranks",
    "group_masks", "leave_one_out", "metrics_from_ranks", "pessimistic_rank", "plot_ndcg10", "render_markdown",
    "sample_negatives", "sampled_ranks", "train_and_evaluate", "write_report",
]
