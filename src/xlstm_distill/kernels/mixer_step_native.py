"""One decoding step of the whole hybrid mixer (operation ``mixer_step``), native PyTorch: the reference.

A decode step (T = 1, continuing a cache) of a layer with both branches (``mlstm_swa``, ``linear_swa``) is

    fq, fk = softmax(q W_q + b_q), softmax(k W_k + b_k)           per query head (k of a GQA group is shared)
    h      = mLSTM step of (fq, fk, v, i, f) on the state (C, n, m)   (``mlstm_step``; no gates: linear attention)
    a      = softmax attention of q over the sinks + ring buffer + the new key, window rule   (``swa_cached``)
    y      = lerp(a, h, sigmoid(o))                               o: the output gate pre-activation

This module computes it from the operations the model used before the fused kernel existed (the feature map below,
``ops.mlstm_step``, ``ops.swa_cached``, ``torch.lerp``), in the same order and dtypes: the native implementation is
exactly the unfused decode step, and every other implementation (``mixer_step_triton.py``) is tested against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from xlstm_distill.kernels.mlstm_native import MLSTMState
from xlstm_distill.kernels.registry import register_kernel

if TYPE_CHECKING:
    from xlstm_distill.kernels.options import KernelOptions


def feature_map(
    x: torch.Tensor,  # (B, NH, T, DH)
    weight: torch.Tensor,  # (NH, DH, DF)
    bias: torch.Tensor,  # (NH, DF)
) -> torch.Tensor:  # (B, NH, T, DF)
    """softmax(x W_h + b_h): one batched matmul with the bias as its addend, then the softmax in the input's dtype:
    its kernels sum 16-bit inputs in float32, so a bf16 model (inference) makes no float32 copy of the features;
    under autocast the softmax runs in float32 (docs/decisions.md)."""
    B, NH, T, DH = x.shape
    z = torch.baddbmm(bias.to(x.dtype).repeat(B, 1).unsqueeze(1),  # (B*NH, 1, DF)
                      x.reshape(B * NH, T, DH), weight.to(x.dtype).repeat(B, 1, 1))  # (B*NH, T, DF)
    return torch.softmax(z, dim=-1).view(B, NH, T, -1)


def check_mixer_step_inputs(q, k, v, gates, maps, state, sink_k, sink_v, ring_k, ring_v, key_pos, position,
                            gated: bool) -> None:
    """Shapes of a ``mixer_step`` call (Python integers only: no device sync). Raises ValueError naming the problem."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"mixer_step takes q (B, NH, DH) and k, v (B, NKV, DH) of one token; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)} (take the token axis out: q[:, :, 0]).")
    B, NH, DH = q.shape
    NKV = k.shape[1]
    if k.shape[0] != B or k.shape[2] != DH or NH % NKV:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: the batch and head size must match and "
                         "the query heads must be a multiple of the key-value heads (GQA).")
    expected = "(B, 3 * NH): the input, forget and output gates'" if gated else "(B, NH): the output gate's"
    if gates.shape != (B, (3 if gated else 1) * NH):
        raise ValueError(f"gates must be {expected} pre-activations ({'gated' if gated else 'ungated'} memory, NH = "
                         f"{NH}), got {tuple(gates.shape)}.")
    wq, bq, wk, bk = maps
    DF = wq.shape[-1]
    for name, w, bias in (("q", wq, bq), ("k", wk, bk)):
        if w.shape != (NH, DH, DF) or bias.shape != (NH, DF):
            raise ValueError(f"the {name} feature map must have weight (NH, DH, DF) = ({NH}, {DH}, {DF}) and bias "
                             f"(NH, DF); got {tuple(w.shape)} and {tuple(bias.shape)}.")
    C, n, m = state
    if C.shape != (B, NH, DF, DH) or n.shape != (B, NH, DF) or m.shape != (B, NH):
        raise ValueError(f"the mLSTM state must be C (B, NH, DF, DH) = ({B}, {NH}, {DF}, {DH}), n (B, NH, DF), "
                         f"m (B, NH); got {tuple(C.shape)}, {tuple(n.shape)}, {tuple(m.shape)}.")
    S, W = sink_k.shape[2], ring_k.shape[2]
    for name, x, slots in (("sink_k", sink_k, S), ("sink_v", sink_v, S), ("ring_k", ring_k, W), ("ring_v", ring_v, W)):
        if x.shape != (B, NKV, slots, DH):
            raise ValueError(f"{name} must be (B, NKV, slots, DH) = ({B}, {NKV}, {slots}, {DH}), got {tuple(x.shape)}.")
    if key_pos.shape != (B, S + W) or position.shape != (B,):
        raise ValueError(f"key_pos must be (B, sinks + ring slots) = ({B}, {S + W}) and position (B,) = ({B},); got "
                         f"{tuple(key_pos.shape)} and {tuple(position.shape)}.")


def mixer_step_reference(
    q: torch.Tensor,  # (B, NH, DH) the new token's queries, after RoPE
    k: torch.Tensor,  # (B, NKV, DH) its keys, after RoPE
    v: torch.Tensor,  # (B, NKV, DH)
    gates: torch.Tensor,  # (B, 3 * NH) input, forget, output gate pre-activations; (B, NH) output only if not gated
    maps: tuple[torch.Tensor, ...],  # q weight (NH, DH, DF), q bias (NH, DF), k weight (NH, DH, DF), k bias (NH, DF)
    state: MLSTMState,  # C (B, NH, DF, DH), n (B, NH, DF), m (B, NH), float32
    sink_k: torch.Tensor,  # (B, NKV, S, DH) cached sink keys
    sink_v: torch.Tensor,  # (B, NKV, S, DH)
    ring_k: torch.Tensor,  # (B, NKV, W, DH) cached ring-buffer keys
    ring_v: torch.Tensor,  # (B, NKV, W, DH)
    key_pos: torch.Tensor,  # (B, S + W) positions held by the sink then ring slots, -1 = empty
    position: torch.Tensor,  # (B,) the new token's position in its document
    *,
    gated: bool,
    window: int,
    num_sinks: int,
    scale: float,
    softcap: float | None,
    options: KernelOptions,
) -> tuple[torch.Tensor, MLSTMState]:
    """The decode step as the model computed it unfused (see the module docstring). Returns the mixer output
    (B, NH, DH) in v's dtype and the new state (new tensors)."""
    from xlstm_distill.kernels.ops import mlstm_step, swa_cached  # ops imports the registry this module fills

    check_mixer_step_inputs(q, k, v, gates, maps, state, sink_k, sink_v, ring_k, ring_v, key_pos, position, gated)
    NH = q.shape[1]
    keys = torch.cat([sink_k, ring_k, k[:, :, None]], dim=2)  # (B, NKV, S + W + 1, DH)
    values = torch.cat([sink_v, ring_v, v[:, :, None]], dim=2)
    positions = torch.cat([key_pos, position[:, None]], dim=1)  # (B, S + W + 1)
    swa = swa_cached(q[:, :, None], position[:, None], keys, values, positions, window=window, num_sinks=num_sinks,
                     scale=scale, softcap=softcap, options=options)[:, :, 0]  # (B, NH, DH)
    group = NH // k.shape[1]
    k, v = k[:, :, None].repeat_interleave(group, dim=1), v[:, :, None].repeat_interleave(group, dim=1)  # (B, NH, 1, DH)
    fq, fk = feature_map(q[:, :, None], *maps[:2]), feature_map(k, *maps[2:])  # (B, NH, 1, DF)
    i, f = (gates[:, :NH], gates[:, NH:2 * NH]) if gated else (None, None)  # (B, NH)
    h, state = mlstm_step(fq[:, :, 0], fk[:, :, 0], v[:, :, 0], i, f, state, options=options)  # (B, NH, DH)
    o = torch.sigmoid(gates[:, -NH:].float()).unsqueeze(-1).to(swa.dtype)  # (B, NH, 1)
    return torch.lerp(swa, h.to(swa.dtype), o), state


# The registered implementation (xlstm_distill.kernels.ops has the signature).
@register_kernel("mixer_step", "native")
def _native(q, k, v, gates, maps, state, sink_k, sink_v, ring_k, ring_v, key_pos, position, gated: bool, window: int,
            num_sinks: int, scale: float, softcap: float | None, options: KernelOptions):
    return mixer_step_reference(q, k, v, gates, maps, state, sink_k, sink_v, ring_k, ring_v, key_pos, position,
                                gated=gated, window=window, num_sinks=num_sinks, scale=scale, softcap=softcap,
                                options=options)
