"""Sequence-mixing kernels of the student: mLSTM (parallel / chunkwise / recurrent) and SWA + sinks."""

from xlstm_distill.kernels.mlstm import MLSTMState, mlstm_chunkwise, mlstm_parallel, mlstm_recurrent, mlstm_recurrent_step
from xlstm_distill.kernels.swa import swa_sinks_attention, swa_sinks_attention_cached

__all__ = [
    "MLSTMState",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "mlstm_recurrent",
    "mlstm_recurrent_step",
    "swa_sinks_attention",
    "swa_sinks_attention_cached",
]
