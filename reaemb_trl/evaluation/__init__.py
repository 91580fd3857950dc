"""Downstream evaluation: leave-one-out split, SASRec/GRU4Rec/BERT4Rec, HR/NDCG, paired tests, reports.

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
from reaemb_trl.evaluation.runner import (
    EvalConfig,
    RankingEvaluator,
    RunResult,
    TableSpec,
    compare_tables,
    group_masks,
    table_specs,
    train_and_evaluate,
)
from reaemb_trl.evaluation.significance import holm, paired_tests, wilcoxon_signed_rank
from reaemb_trl.evaluation.split import SplitData, leave_one_out, training_windows

__all__ = [
    "EvalConfig", "RankingEvaluator", "RunResult", "SplitData", "TableSpec", "aggregate", "compare_tables",
    "full_ranks", "group_masks", "holm", "leave_one_out", "metrics_from_ranks", "paired_tests", "pessimistic_rank",
    "plot_ndcg10", "render_markdown", "sample_negatives", "sampled_ranks", "table_specs", "train_and_evaluate",
    "training_windows", "wilcoxon_signed_rank", "write_report",
]
