"""Evaluation of teacher, students and baselines with lm-evaluation-harness, and the recovery report.

``lm_eval`` is imported only when an evaluation runs; importing this package is cheap.
"""

from xlstm_distill.evaluation.harness import (
    DEFAULT_TASKS,
    PAPER_SHOTS,
    PRIMARY_METRICS,
    evaluate_models,
    load_model,
    task_manager,
    versions,
)
from xlstm_distill.evaluation.long_context import RULER_LENGTHS, RULER_TASKS, by_position, ruler_scores, write_long_context
from xlstm_distill.evaluation.offline import OFFLINE_TASKS, TASKS_DIR, OfflineTask
from xlstm_distill.evaluation.report import combine_results, compare, write_report

__all__ = [
    "DEFAULT_TASKS",
    "OFFLINE_TASKS",
    "PAPER_SHOTS",
    "PRIMARY_METRICS",
    "RULER_LENGTHS",
    "RULER_TASKS",
    "TASKS_DIR",
    "OfflineTask",
    "by_position",
    "combine_results",
    "compare",
    "evaluate_models",
    "load_model",
    "ruler_scores",
    "task_manager",
    "versions",
    "write_long_context",
    "write_report",
]
