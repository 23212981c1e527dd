"""The whole mixer forward over a sequence in native PyTorch: the reference of the fused kernel (``mixer_triton``).

It composes the operations the model runs one by one (``HybridAttention.mix`` -> ``_swa`` + ``memory_and_mix``):

    attention = SWA + sinks of q, k, v                                   (swa_native.swa_sinks_attention)
    memory    = mLSTM of phi_q(q), phi_k(k), v, per query head          (mlstm_native.mlstm_chunkwise)
                phi(x) = softmax(x W_h + b_h) (Hedgehog feature map); k, v repeated over the GQA group
    y         = attention + sigmoid(o) * (memory - attention)          (the output gate's lerp)

all in float32 (outputs in v's dtype), so it is the truth the fast kernel is compared with. Gates (B, G*NH, T):
G = 3 is [input, forget, output] of the gated mLSTM; G = 1 is the output gate of the ungated memory (linear
attention with the sum normalizer), which only this implementation computes (``registry.choose_kernel``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from xlstm_distill.kernels.mlstm_native import MLSTMState, _log_gates, mlstm_chunkwise
from xlstm_distill.kernels.registry import register_kernel
from xlstm_distill.kernels.swa_native import swa_sinks_attention

if TYPE_CHECKING:
    from xlstm_distill.kernels.options import KernelOptions


def feature_map_float32(
    x: torch.Tensor,  # (B, NH, T, DH)
    weight: torch.Tensor,  # (NH, DH, DF)
    bias: torch.Tensor,  # (NH, DF)
) -> torch.Tensor:  # (B, NH, T, DF) float32
    """phi(x) = softmax(x W_h + b_h) over the features, per head, in float32."""
    z = torch.einsum("bhtd,hdf->bhtf", x.float(), weight.float()) + bias.float()[:, None]
    return torch.softmax(z, dim=-1)


def mixer_reference(
    q: torch.Tensor,  # (B, NH, T, DH) after RoPE
    k: torch.Tensor,  # (B, NKV, T, DH) after RoPE
    v: torch.Tensor,  # (B, NKV, T, DH)
    gates: torch.Tensor,  # (B, G*NH, T) gate pre-activations: [input, forget, output] (G = 3) or [output] (G = 1)
    maps: tuple[torch.Tensor, ...],  # q weight (NH, DH, DF), q bias (NH, DF), k weight, k bias
    doc_start: torch.Tensor,  # (B, T) first token of each token's document
    reset: torch.Tensor | None,  # (B, T) bool, True at each document's first token
    state: MLSTMState | None,  # the state to continue from (None: empty)
    window: int,
    num_sinks: int,
    scale: float,
    softcap: float | None,
    chunk_size: int,
) -> tuple[torch.Tensor, MLSTMState]:
    """The mixer's output y (B, NH, T, DH) in v's dtype, laid out as (B, T, NH, DH) like the model's, and the mLSTM's
    final state (float32)."""
    H = q.shape[1]
    group = H // k.shape[1]
    attention = swa_sinks_attention(q.float(), k.float(), v.float(), doc_start, window, num_sinks, scale,
                                    softcap=softcap)  # (B, NH, T, DH) float32
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, NH, T, DH)
    fq, fk = feature_map_float32(q, *maps[:2]), feature_map_float32(k, *maps[2:])  # (B, NH, T, DF)
    gated = gates.shape[1] == 3 * H
    i, lf, normalizer = _log_gates(gates[:, :H] if gated else None, gates[:, H:2 * H] if gated else None, fq[..., 0])
    memory, state = mlstm_chunkwise(fq, fk, v.float(), i, lf, state, reset, normalizer, chunk_size)
    o = torch.sigmoid(gates[:, -H:].float()).unsqueeze(-1)  # (B, NH, T, 1)
    y = torch.lerp(attention, memory, o).to(v.dtype)
    return y.transpose(1, 2).contiguous().transpose(1, 2), state


# The registered implementation (xlstm_distill.kernels.ops has the signature).
@register_kernel("mixer", "native")
def _native(q, k, v, gates, maps, doc_start, reset, state, window: int, num_sinks: int, scale: float,
            softcap: float | None, chunk_size: int, options: KernelOptions):
    return mixer_reference(q, k, v, gates, maps, doc_start, reset, state, window, num_sinks, scale, softcap,
                           chunk_size)
