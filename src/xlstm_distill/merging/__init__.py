"""Stage III: merge independently distilled experts in weight space (``theta = sum_i lambda_i theta_i``), with the
weights given or chosen on held-out data (:mod:`xlstm_distill.merging.sweep`)."""

from xlstm_distill.merging.merge import MergeError, merge, normalize_weights
from xlstm_distill.merging.sweep import SweepConfig, merge_with_sweep, sweep_batches, sweep_weights

__all__ = ["MergeError", "SweepConfig", "merge", "merge_with_sweep", "normalize_weights", "sweep_batches", "sweep_weights"]
