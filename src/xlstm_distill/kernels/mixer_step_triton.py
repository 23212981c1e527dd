"""One decoding step of the whole hybrid mixer as one Triton kernel (operation ``mixer_step``, implementation
``triton``): feature maps, the mLSTM state update and readout, sliding-window + sinks attention over the cache and the
output gate's mix, for every head of a layer in one launch.

Same function as :func:`xlstm_distill.kernels.mixer_step_native.mixer_step_reference` (tested against it,
``tests/kernels/test_mixer_step.py``); the kernel is in ``mixer_step_kernel.py`` (imported on first use). It differs
from the reference only in rounding: everything runs in float32 in registers, where the unfused step rounds the
feature maps and the two branches to the model's dtype in between.

The launch is a ``torch.library`` custom operator (``torch.ops.xlstm_distill.mixer_step``) with a fake
implementation, so a compiled decode step (``modeling/decode.py``) keeps it as one opaque call and a CUDA graph
captures it: no host reads, no data-dependent Python, every shape check on Python integers. The operator is
functional: it writes the new state into new tensors (the cache then holds them; ``StaticDecoder`` copies them back
into its static buffers, as it does for the unfused step). Forward only: a step with gradients runs ``native``
(``registry.choose_kernel``).

One program per (batch row, query head), grid B x NH (docs/decisions.md, "Fused decode step"): each program owns its
head's state (DF x DH float32, the largest tensor of the step) and reads its KV group's cached keys and values, which
the G query heads of a group read again from L2.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

import torch

from xlstm_distill.kernels.mixer_step_native import check_mixer_step_inputs
from xlstm_distill.kernels.mlstm_native import EPS, MLSTMState
from xlstm_distill.kernels.registry import register_kernel

if TYPE_CHECKING:
    from xlstm_distill.kernels.options import KernelOptions

BLOCK_K = 32  # rows of a feature-map weight slice per iteration
BLOCK_N = 32  # cached slots per attention block
# the ring loop is unrolled up to this many blocks (1,024 slots at BLOCK_N = 32), for heads up to 128 (ptxas for
# sm_90 at 128 x 128, 16 warps: 124 registers, no spills; at 256 x 256 unrolling spills 1,084 bytes a thread)
MAX_UNROLLED_BLOCKS = 32


def mixer_step_triton(
    q: torch.Tensor,  # (B, NH, DH) after RoPE
    k: torch.Tensor,  # (B, NKV, DH) after RoPE
    v: torch.Tensor,  # (B, NKV, DH)
    gates: torch.Tensor,  # (B, 3 * NH) input, forget, output pre-activations; (B, NH) output only if not gated
    maps: tuple[torch.Tensor, ...],  # q weight (NH, DH, DF), q bias (NH, DF), k weight (NH, DH, DF), k bias (NH, DF)
    state: MLSTMState,  # C (B, NH, DF, DH), n (B, NH, DF), m (B, NH)
    sink_k: torch.Tensor,  # (B, NKV, S, DH)
    sink_v: torch.Tensor,  # (B, NKV, S, DH)
    ring_k: torch.Tensor,  # (B, NKV, W, DH)
    ring_v: torch.Tensor,  # (B, NKV, W, DH)
    key_pos: torch.Tensor,  # (B, S + W) positions of the sink then ring slots, -1 = empty
    position: torch.Tensor,  # (B,) the new token's position
    *,
    gated: bool,
    window: int,
    num_sinks: int,
    scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, MLSTMState]:
    """The fused decode step. Returns the mixer output (B, NH, DH) in v's dtype and the new state (float32)."""
    check_mixer_step_inputs(q, k, v, gates, maps, state, sink_k, sink_v, ring_k, ring_v, key_pos, position, gated)
    if window < 1:
        raise ValueError(f"mixer_step needs a window of at least 1 token (the query itself), got {window}.")
    y, C, n, m = torch.ops.xlstm_distill.mixer_step(q, k, v, gates, *maps, *state, sink_k, sink_v, ring_k, ring_v,
                                                    key_pos, position, gated, window, num_sinks, scale, softcap)
    return y, MLSTMState(C, n, m)


def _next_power_of_2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _num_warps(block_df: int, block_dh: int) -> int:
    """Warps per program: the state tile (DF x DH float32) is held in registers, 16 values a thread where 16 warps
    suffice (ptxas for sm_90: 128 x 128 at 16 warps uses 111 registers and no spills, at 8 warps 209; 64 x 64 at 8
    warps 103 registers; 256 x 256 at 16 warps spills 332 bytes a thread)."""
    return max(4, min(16, block_df * block_dh // 512))


def launch_constants(NH: int, NKV: int, DH: int, DF: int, S: int, W: int, gated: bool, softcap: bool) -> dict:
    """The kernel's compile-time constants and warps for one layer shape (``S`` sink slots, ``W`` ring slots)."""
    block_dh, block_df = _next_power_of_2(DH), _next_power_of_2(DF)
    return dict(NH=NH, NKV=NKV, DH=DH, DF=DF, S=S, W=W, GATED=gated, G=3 if gated else 1, SOFTCAP=softcap,
                BLOCK_DH=block_dh, BLOCK_DF=block_df, BLOCK_K=min(BLOCK_K, block_dh),
                BLOCK_S=_next_power_of_2(max(S, 1)), BLOCK_N=min(BLOCK_N, _next_power_of_2(W)),
                UNROLL_RING=block_dh <= 128 and -(-W // BLOCK_N) <= MAX_UNROLLED_BLOCKS,
                num_warps=_num_warps(block_df, block_dh))


@torch.library.custom_op("xlstm_distill::mixer_step", mutates_args=())
def _mixer_step(
    q: torch.Tensor,  # (B, NH, DH)
    k: torch.Tensor,  # (B, NKV, DH)
    v: torch.Tensor,  # (B, NKV, DH)
    gates: torch.Tensor,  # (B, G * NH)
    wq: torch.Tensor, bq: torch.Tensor,  # (NH, DH, DF), (NH, DF)
    wk: torch.Tensor, bk: torch.Tensor,  # (NH, DH, DF), (NH, DF)
    C: torch.Tensor, n: torch.Tensor, m: torch.Tensor,  # (B, NH, DF, DH), (B, NH, DF), (B, NH)
    sink_k: torch.Tensor, sink_v: torch.Tensor,  # (B, NKV, S, DH)
    ring_k: torch.Tensor, ring_v: torch.Tensor,  # (B, NKV, W, DH)
    key_pos: torch.Tensor,  # (B, S + W)
    position: torch.Tensor,  # (B,)
    gated: bool,
    window: int,
    num_sinks: int,
    scale: float,
    softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, NH, DH) in v's dtype and the new C, n, m (float32, new tensors)."""
    from xlstm_distill.kernels.mixer_step_kernel import mixer_step_kernel  # defines the kernel: Triton imported now

    B, NH, DH = q.shape
    NKV, DF, S, W = k.shape[1], wq.shape[-1], sink_k.shape[2], ring_k.shape[2]
    q, k, v, gates, wq, bq, wk, bk, sink_k, sink_v, ring_k, ring_v = (
        x.contiguous() for x in (q, k, v, gates, wq, bq, wk, bk, sink_k, sink_v, ring_k, ring_v))
    C, n, m = (x.float().contiguous() for x in (C, n, m))
    key_pos, position = key_pos.long().contiguous(), position.long().contiguous()
    y = torch.empty(B, NH, DH, dtype=v.dtype, device=q.device)
    C_out, n_out, m_out = torch.empty_like(C), torch.empty_like(n), torch.empty_like(m)
    launch = launch_constants(NH, NKV, DH, DF, S, W, gated, softcap is not None)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        mixer_step_kernel[(B * NH,)](
            q, k, v, gates, wq, bq, wk, bk, C, n, m, sink_k, sink_v, ring_k, ring_v, key_pos, position,
            y, C_out, n_out, m_out,
            float(scale), 1.0 if softcap is None else float(softcap), EPS, int(window), int(num_sinks), **launch)
    return y, C_out, n_out, m_out


@_mixer_step.register_fake
def _(q, k, v, gates, wq, bq, wk, bk, C, n, m, sink_k, sink_v, ring_k, ring_v, key_pos, position, gated, window,
      num_sinks, scale, softcap):
    f32 = dict(dtype=torch.float32, device=q.device)
    return (q.new_empty(q.shape, dtype=v.dtype), C.new_empty(C.shape, **f32), n.new_empty(n.shape, **f32),
            m.new_empty(m.shape, **f32))


# The registered implementation (xlstm_distill.kernels.ops has the signature).
@register_kernel("mixer_step", "triton")
def _triton(q, k, v, gates, maps, state, sink_k, sink_v, ring_k, ring_v, key_pos, position, gated: bool, window: int,
            num_sinks: int, scale: float, softcap: float | None, options: KernelOptions):
    return mixer_step_triton(q, k, v, gates, maps, state, sink_k, sink_v, ring_k, ring_v, key_pos, position,
                             gated=gated, window=window, num_sinks=num_sinks, scale=scale, softcap=softcap)
