"""Stage III: merge independently distilled experts in weight space (``theta = sum_i lambda_i theta_i``)."""

from xlstm_distill.merging.merge import MergeError, merge, normalize_weights

__all__ = ["MergeError", "merge", "normalize_weights"]
