"""Sequence-mixing kernels of the student, one function per operation, implementations chosen by name.

    from xlstm_distill.kernels import KernelOptions, mlstm, swa
    h, state = mlstm(q, k, v, i, f, options=KernelOptions(mlstm="native"))

Operations: :func:`mlstm`, :func:`mlstm_step`, :func:`swa`, :func:`swa_cached`, :func:`mixer`, :func:`mixer_step`
(``ops.py``); implementations (``native`` PyTorch, ``tfla`` through NX-AI's mlstm_kernels, ``triton`` our own Triton
kernels: the mLSTM with the exact normalizer gradient, the fused mixer forward and the fused decode step, ``flex``
through FlexAttention, ``recurrent`` as a reference) are registered by name (``registry.py``: :func:`get_kernel`,
:func:`kernel_names`, :func:`choose_kernel`) and picked by :class:`KernelOptions`. The plain PyTorch references
(parallel, chunkwise and recurrent mLSTM, blocked SWA) are exported too: every fast path is tested against them.
"""

# the implementations first: importing a module registers its kernels
from xlstm_distill.kernels import mlstm_native, mlstm_tfla, mlstm_triton, swa_flex, swa_native  # noqa: F401
from xlstm_distill.kernels import mixer_fused, mixer_native, mixer_step_native, mixer_step_triton  # noqa: F401
from xlstm_distill.kernels.mlstm_native import MLSTMState, mlstm_chunkwise, mlstm_parallel, mlstm_recurrent, mlstm_recurrent_step
from xlstm_distill.kernels.options import KernelOptions
from xlstm_distill.kernels.ops import mixer, mixer_step, mlstm, mlstm_step, swa, swa_cached
from xlstm_distill.kernels.registry import OPERATIONS, choose_kernel, get_kernel, kernel_names, register_kernel
from xlstm_distill.kernels.swa_native import swa_sinks_attention, swa_sinks_attention_cached

__all__ = [
    "OPERATIONS",
    "KernelOptions",
    "MLSTMState",
    "choose_kernel",
    "get_kernel",
    "kernel_names",
    "mixer",
    "mixer_step",
    "mlstm",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "mlstm_recurrent",
    "mlstm_recurrent_step",
    "mlstm_step",
    "register_kernel",
    "swa",
    "swa_cached",
    "swa_sinks_attention",
    "swa_sinks_attention_cached",
]
