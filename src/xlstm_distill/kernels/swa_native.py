"""Native PyTorch sliding-window attention with sink tokens (SWA + sinks).

A query at position p (inside its document) attends to the keys of its own document at positions
p - W < pos <= p (the window) and to the first ``num_sinks`` positions of the document (the sinks).
GQA: query head h uses key/value head h // (NH // NKV), as in transformers' ``repeat_kv``.
Softmax runs in float32; outputs have the dtype of v. ``softcap`` (Gemma 2's attention-logit soft-capping): the
scaled scores s become ``softcap * tanh(s / softcap)`` before the softmax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from xlstm_distill.kernels.registry import register_kernel

if TYPE_CHECKING:
    from xlstm_distill.kernels.options import KernelOptions


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` (None: the scores as they are)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _softmax_attend(
    scores: torch.Tensor,  # (..., T, K) float32 logits
    mask: torch.Tensor,  # broadcastable to scores, True = attend
) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def swa_sinks_attention(
    q: torch.Tensor,  # (B, NH, T, D)
    k: torch.Tensor,  # (B, NKV, T, D)
    v: torch.Tensor,  # (B, NKV, T, DV)
    doc_start: torch.Tensor,  # (B, T) index of the first token of each token's document
    window: int,
    num_sinks: int,
    scale: float,
    block_size: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Full-sequence SWA + sinks in query blocks: time and memory O(T * (W + block + sinks)). Returns (B, NH, T, DV)."""
    B, NH, T, D = q.shape
    NKV = k.shape[1]
    G = NH // NKV
    block = block_size or max(window, 64)
    qg = q.view(B, NKV, G, T, D)
    arange = torch.arange(T, device=q.device)
    outs = []
    for a in range(0, T, block):
        e = min(a + block, T)
        lo = max(0, a - window + 1)
        q_idx, k_idx = arange[a:e], arange[lo:e]  # (Tq,), (Kw,)
        start = doc_start[:, a:e]  # (B, Tq)
        # Window part: keys lo..e-1 of the query's document, excluding its sinks (they come from the sink part).
        in_window = (k_idx <= q_idx[:, None]) & (q_idx[:, None] - k_idx < window)  # (Tq, Kw)
        own_doc = k_idx[None, None, :] >= start[..., None]  # (B, Tq, Kw)
        not_sink = k_idx[None, None, :] - start[..., None] >= num_sinks
        mask_w = (in_window & own_doc & not_sink)[:, None, None]  # (B, 1, 1, Tq, Kw)
        scores_w = soft_cap(torch.einsum("bhgtd,bhkd->bhgtk", qg[:, :, :, a:e].float(), k[:, :, lo:e].float()) * scale,
                            softcap)
        parts, masks = [scores_w], [mask_w]
        if num_sinks:
            sink_idx = start[..., None] + torch.arange(num_sinks, device=q.device)  # (B, Tq, S)
            mask_s = (sink_idx <= q_idx[None, :, None])[:, None, None]  # (B, 1, 1, Tq, S)
            ks, vs = (gather_tokens(x, sink_idx.clamp(max=T - 1)) for x in (k, v))  # (B, NKV, Tq, S, D)
            scores_s = soft_cap(torch.einsum("bhgtd,bhtsd->bhgts", qg[:, :, :, a:e].float(), ks.float()) * scale, softcap)
            parts, masks = [scores_s, scores_w], [mask_s, mask_w]
        p = _softmax_attend(torch.cat(parts, -1), torch.cat([m.expand_as(s) for m, s in zip(masks, parts)], -1))
        out = torch.einsum("bhgtk,bhkd->bhgtd", p[..., -scores_w.shape[-1]:], v[:, :, lo:e].float())
        if num_sinks:
            out = out + torch.einsum("bhgts,bhtsd->bhgtd", p[..., :num_sinks], vs.float())
        outs.append(out)
    return torch.cat(outs, dim=3).reshape(B, NH, T, -1).to(v.dtype)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, NKV, T, D) gathered at token positions idx (B, ...) -> (B, NKV, ..., D), e.g. (B, Tq, S) ->
    (B, NKV, Tq, S, D)."""
    B, NKV, _, D = x.shape
    flat = idx.reshape(B, 1, -1, 1).expand(B, NKV, -1, D)
    return torch.gather(x, 2, flat).view(B, NKV, *idx.shape[1:], D)


def swa_sinks_attention_cached(
    q: torch.Tensor,  # (B, NH, T, D) new queries
    q_pos: torch.Tensor,  # (B, T) their positions in the document
    k: torch.Tensor,  # (B, NKV, K, D) cached sinks + ring buffer + new keys
    v: torch.Tensor,  # (B, NKV, K, DV)
    k_pos: torch.Tensor,  # (B, K) key positions in the same document, -1 for empty slots
    window: int,
    num_sinks: int,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """SWA + sinks of a few new tokens over an explicit key set (decoding from the cache). Returns (B, NH, T, DV)."""
    B, NH, T, D = q.shape
    NKV = k.shape[1]
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]  # (B, T, 1), (B, 1, K)
    mask = (kp >= 0) & (kp <= qp) & ((kp < num_sinks) | (qp - kp < window))  # (B, T, K)
    dtype = v.dtype
    q, k, v = q.view(B, NKV, NH // NKV, T, D).float(), k.float(), v.float()  # (B, NKV, G, T, D), (B, NKV, K, D)
    if torch.compiler.is_compiling():  # products and sums: inductor fuses them (einsums: cuBLAS calls per layer)
        scores = soft_cap((q.unsqueeze(-2) * k[:, :, None, None]).sum(-1) * scale, softcap)  # (B, NKV, G, T, K)
        p = _softmax_attend(scores, mask[:, None, None])
        out = (p.unsqueeze(-1) * v[:, :, None, None]).sum(-2)  # (B, NKV, G, T, DV)
    else:  # eagerly those products would be materialized: (B, NKV, G, T, K, D)
        scores = soft_cap(torch.einsum("bhgtd,bhkd->bhgtk", q, k) * scale, softcap)
        out = torch.einsum("bhgtk,bhkd->bhgtd", _softmax_attend(scores, mask[:, None, None]), v)
    return out.reshape(B, NH, T, -1).to(dtype)


# The registered implementations (xlstm_distill.kernels.ops has the signatures).
@register_kernel("swa", "native")
def _native(q, k, v, doc_start, window: int, num_sinks: int, scale: float, softcap: float | None,
            single_document: bool, memo: dict, options: KernelOptions) -> torch.Tensor:
    return swa_sinks_attention(q, k, v, doc_start, window, num_sinks, scale, softcap=softcap)


@register_kernel("swa_cached", "native")
def _native_cached(q, q_pos, k, v, k_pos, window: int, num_sinks: int, scale: float, softcap: float | None,
                   options: KernelOptions) -> torch.Tensor:
    return swa_sinks_attention_cached(q, q_pos, k, v, k_pos, window, num_sinks, scale, softcap)
