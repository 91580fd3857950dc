"""Downstream evaluation: leave-one-out split, SASRec/GRU4Rec/BERT4Rec, HR/NDCG, paired tests, reports.

config (EvalConfig, TableSpec, RunResult) -> split (leave one out, user groups) -> training (one run: models,
tables, losses, ranking) -> compare (every table x seed, kept in run_store; score ensembles of finished runs,
ensemble) -> report (aggregate, write). Cold items (data.cold) are held out of training by the split.
Importing this package is light; torch is imported by the submodules that need it.
"""

from reaemb_trl.evaluation.compare import compare_tables, table_specs
from reaemb_trl.evaluation.config import EvalConfig, RunResult, TableSpec
from reaemb_trl.evaluation.metrics import (
    full_ranks,
    metrics_from_ranks,
    pessimistic_rank,
    sample_negatives,
    sampled_ranks,
)
from reaemb_trl.evaluation.ranking import RankingEvaluator
from reaemb_trl.evaluation.report import aggregate, plot_ndcg10, render_markdown, write_report
from reaemb_trl.evaluation.significance import holm, paired_tests, wilcoxon_signed_rank
from reaemb_trl.evaluation.split import SplitData, group_masks, leave_one_out, training_windows
from reaemb_trl.evaluation.training import train_and_evaluate

__all__ = [
    "EvalConfig", "RankingEvaluator", "RunResult", "SplitData", "TableSpec", "aggregate", "compare_tables",
    "full_ranks", "group_masks", "holm", "leave_one_out", "metrics_from_ranks", "paired_tests", "pessimistic_rank",
    "plot_ndcg10", "render_markdown", "sample_negatives", "sampled_ranks", "table_specs", "train_and_evaluate",
    "training_windows", "wilcoxon_signed_rank", "write_report",
]
