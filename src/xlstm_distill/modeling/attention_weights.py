"""A mixer layer's heads read as weights over the keys: the teacher's softmax attention and the student's memory.

The memory's output at query p is sum_j a_pj v_j with a_pj = phi(q_p).phi(k_j) D_pj / max(|sum_j phi(q_p).phi(k_j)
D_pj|, exp(-m_p)) (``kernels/mlstm_native.py``: D the input and forget gates' decay, m its stabilizer), so both
branches can be compared key by key: Stage I's attention transfer (``stages/align.py``) trains the memory's weights
on the keys beyond the window toward the teacher's, and ``benchmarks/memory_selectivity.py`` measures how much of
each head's weight lands on a hidden fact. Every function takes the mixer's own projections, so with the teacher's
projections untouched (Stage I's default) the "teacher" weights are the teacher's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from xlstm_distill.kernels.swa_native import soft_cap


class HeadInputs(NamedTuple):
    """One layer's per-head inputs (every query head; the GQA keys repeated)."""

    q: torch.Tensor  # (B, NH, T, DH) after RoPE (unless head_inputs was asked otherwise)
    k: torch.Tensor  # (B, NH, T, DH)
    log_input: torch.Tensor | None  # (B, NH, T) input gate pre-activations; None: a memory without gates
    log_forget: torch.Tensor | None  # (B, NH, T) log forget gates
    output_gate: torch.Tensor | None  # (B, NH, T) the output gate, the memory's share of the mix; None: no mix


def head_inputs(
    mixer: torch.nn.Module,  # a HybridAttention
    hidden: torch.Tensor,  # (B, T, HIDDEN) the layer's input
    rope: tuple[torch.Tensor, torch.Tensor],
    apply_rope: bool = True,  # False: q and k before RoPE (a diagnostic read; the mixer itself uses them after)
) -> HeadInputs:
    """q, k and gates of every head, as ``HybridAttention.forward`` computes them (without the exact-within-reach
    override of the output gate)."""
    B, T, _ = hidden.shape
    H, KV, D = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    q, k, v = mixer.project(hidden)
    gates = mixer.gate_proj(torch.cat([q, k, v], dim=-1)).transpose(1, 2) if mixer.num_gates else None  # (B, G*NH, T)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, KV, D).transpose(1, 2)
    if apply_rope:
        q, k = mixer.apply_rope(q, k, *rope)
    i = f = o = None
    if gates is not None and mixer.gated_memory:
        i, f = gates[:, :H], F.logsigmoid(gates[:, H:2 * H].float())
    if gates is not None and mixer.uses_swa and mixer.uses_memory:
        o = torch.sigmoid(gates[:, -H:].float())
    return HeadInputs(q, k.repeat_interleave(H // KV, dim=1), i, f, o)


def gather_queries(x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """x (B, NH, T, ...) at the query indices ``queries`` (B, P): (B, NH, P, ...)."""
    index = queries[:, None].expand(x.shape[0], x.shape[1], queries.shape[1])
    if x.dim() == 4:
        return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))
    return x.gather(2, index)


def key_masks(
    doc_start: torch.Tensor,  # (B, T) index of every token's document start
    queries: torch.Tensor,  # (B, P) query indices
    T: int,
    window: int,
    num_sinks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P, T) bool: the keys each query's softmax attention sees (its document's prefix), and of those the ones
    neither the window (itself and the W - 1 before) nor the sinks (the document's first S tokens) cover."""
    j = torch.arange(T, device=queries.device)[None, None, :]
    start = doc_start.gather(1, queries)[..., None]  # (B, P, 1)
    p = queries[..., None]
    visible = (j >= start) & (j <= p)
    return visible, visible & (j <= p - window) & (j >= start + num_sinks)


def teacher_log_weights(
    mixer: torch.nn.Module,
    inputs: HeadInputs,
    queries: torch.Tensor,  # (B, P)
    visible: torch.Tensor,  # (B, P, T) keys the query attends to
) -> torch.Tensor:  # (B, NH, P, T) log softmax weights, -inf where not visible
    """The teacher's attention weights (its scale and soft-capping) of the queries over the keys."""
    q = gather_queries(inputs.q, queries).float()
    scores = (q @ inputs.k.float().transpose(-1, -2)) * mixer.scaling
    if mixer.softcap is not None:
        scores = soft_cap(scores, mixer.softcap)
    return torch.log_softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)


def memory_log_scores(
    mixer: torch.nn.Module,
    inputs: HeadInputs,
    queries: torch.Tensor,  # (B, P)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory's unnormalized weights of the queries over every key, in log space and in two parts:
    log phi(q_p).phi(k_j) and the log decay log D_pj = i_j + sum_{j < t <= p} log f_t (0 for a memory without gates),
    each (B, NH, P, T); keys after the query or in another document are the caller's to mask."""
    qm, km = mixer.q_feature_map, mixer.k_feature_map
    fq = torch.softmax(gather_queries(inputs.q, queries).float() @ qm.weight.float() + qm.bias.float()[:, None], -1)
    fk = torch.softmax(inputs.k.float() @ km.weight.float() + km.bias.float()[:, None], -1)  # (B, NH, T, DF)
    log_dot = torch.log((fq @ fk.transpose(-1, -2)).clamp_min(1e-30))  # (B, NH, P, T)
    if inputs.log_input is None:
        return log_dot, torch.zeros_like(log_dot)
    cum = torch.cumsum(inputs.log_forget, dim=-1)  # (B, NH, T)
    log_d = gather_queries(cum, queries)[..., None] - cum[:, :, None, :] + inputs.log_input.float()[:, :, None, :]
    return log_dot, log_d


def memory_weights(
    mixer: torch.nn.Module,
    inputs: HeadInputs,
    queries: torch.Tensor,  # (B, P)
    visible: torch.Tensor,  # (B, P, T) the query's document prefix
) -> torch.Tensor:  # (B, NH, P, T)
    """The weights a_pj with which the memory's output at each query sums the values (a fresh state at each document
    start; the max normalizer of the gated memory, the sum normalizer of plain linear attention)."""
    log_dot, log_d = memory_log_scores(mixer, inputs, queries)
    log_d = log_d.masked_fill(~visible[:, None], float("-inf"))
    m = log_d.amax(dim=-1, keepdim=True)
    w = torch.exp(log_dot + log_d - m)
    if inputs.log_input is None:
        return w / (w.sum(-1, keepdim=True) + 1e-6)
    return w / torch.maximum(w.sum(-1, keepdim=True).abs(), torch.exp(-m))


def attention_transfer_loss(
    mixer: torch.nn.Module,
    inputs: HeadInputs,
    doc_start: torch.Tensor,  # (B, T)
    queries: torch.Tensor,  # (B, P) query indices whose document prefix reaches beyond the window
    query_weight: torch.Tensor,  # (B, P) 0 for padding queries, else 1
    head_weight: torch.Tensor,  # (NH,) 0 for heads that keep full attention, else 1
) -> torch.Tensor:
    """Cross-entropy from the teacher's attention weights on the keys beyond the window and the sinks (renormalized
    there) to the memory's weights on the same keys, weighted per query and head by the teacher's attention mass
    there: what the memory has to supply, and how much of it the head needs. The teacher's side carries no
    gradient."""
    visible, beyond = key_masks(doc_start, queries, inputs.k.shape[2], mixer.window, mixer.num_sinks)
    with torch.no_grad():
        teacher = torch.exp(teacher_log_weights(mixer, inputs, queries, visible)) * beyond[:, None]
        mass = teacher.sum(-1)  # (B, NH, P)
        target = teacher / mass.clamp_min(1e-12)[..., None]
        weight = mass * query_weight[:, None, :] * head_weight[None, :, None]
    log_dot, log_d = memory_log_scores(mixer, inputs, queries)
    log_p = torch.log_softmax((log_dot + log_d).masked_fill(~beyond[:, None], float("-inf")), dim=-1)
    ce = -(target * log_p.masked_fill(~beyond[:, None], 0.0)).sum(-1)  # (B, NH, P)
    return (weight * ce).sum() / weight.sum().clamp_min(1e-12)
