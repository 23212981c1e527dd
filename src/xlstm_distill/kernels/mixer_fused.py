"""The fused mixer forward (``kernels.mixer: triton``) as a torch.library custom operator.

``torch.ops.xlstm_distill.mixer_forward`` runs the two Triton kernels of ``mixer_triton`` (imported at the first
call, so that Triton reads TRITON_INTERPRET then: without a GPU the tests run the kernels in Triton's interpreter on
CPU tensors). Its fake implementation gives the output shapes, so a torch.compile'd model traces it as one opaque
call. Forward only (prefill, evaluation): it has no autograd formula, and ``registry.choose_kernel`` sends every
call that needs gradients to the existing path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from xlstm_distill.kernels.mlstm_native import MLSTMState
from xlstm_distill.kernels.registry import register_kernel

if TYPE_CHECKING:
    from xlstm_distill.kernels.options import KernelOptions


@torch.library.custom_op("xlstm_distill::mixer_forward", mutates_args=())
def _mixer_forward(
    q: torch.Tensor,  # (B, NH, T, DH) after RoPE
    k: torch.Tensor,  # (B, NKV, T, DH) after RoPE
    v: torch.Tensor,  # (B, NKV, T, DH)
    gates: torch.Tensor,  # (B, 3 NH, T) input, forget, output gate pre-activations
    wq: torch.Tensor,  # (NH, DH, DF) q feature map
    bq: torch.Tensor,  # (NH, DF)
    wk: torch.Tensor,  # (NH, DH, DF) k feature map
    bk: torch.Tensor,  # (NH, DF)
    doc_start: torch.Tensor,  # (B, T) first token of each token's document
    reset: Optional[torch.Tensor],  # (B, T) bool
    c0: Optional[torch.Tensor],  # (B, NH, DF, DH) initial state (all three or none)
    n0: Optional[torch.Tensor],  # (B, NH, DF)
    m0: Optional[torch.Tensor],  # (B, NH)
    window: int,
    num_sinks: int,
    scale: float,
    softcap: Optional[float],
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, NH, T, DH) in v's dtype (laid out as (B, T, NH, DH)) and the final C, n, m (float32)."""
    from xlstm_distill.kernels.mixer_triton import mixer_forward

    state = None if c0 is None else MLSTMState(c0, n0, m0)
    y, (C, n, m) = mixer_forward(q, k, v, gates, wq, bq, wk, bk, doc_start, reset, state, window, num_sinks, scale,
                                 softcap, chunk_size)
    return y, C, n, m


@_mixer_forward.register_fake
def _(q, k, v, gates, wq, bq, wk, bk, doc_start, reset, c0, n0, m0, window, num_sinks, scale, softcap, chunk_size):
    B, NH, T, DH = q.shape
    DF = wq.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    y = q.new_empty(B, T, NH, DH, dtype=v.dtype).transpose(1, 2)
    return y, q.new_empty(B, NH, DF, DH, **f32), q.new_empty(B, NH, DF, **f32), q.new_empty(B, NH, **f32)


# The registered implementation (xlstm_distill.kernels.ops has the signature).
@register_kernel("mixer", "triton")
def _triton(q, k, v, gates, maps, doc_start, reset, state, window: int, num_sinks: int, scale: float,
            softcap: float | None, chunk_size: int, options: KernelOptions):
    if gates.shape[1] != 3 * q.shape[1]:
        raise ValueError(f"kernels.mixer='triton' computes the gated mLSTM: gates must be (B, 3*NH, T) = input, "
                         f"forget, output, got {tuple(gates.shape)} (the ungated memory runs kernels.mixer='native').")
    c0, n0, m0 = (None, None, None) if state is None else state
    y, C, n, m = torch.ops.xlstm_distill.mixer_forward(q, k, v, gates, *maps, doc_start, reset, c0, n0, m0, window,
                                                       num_sinks, float(scale), softcap, chunk_size)
    return y, MLSTMState(C, n, m)
