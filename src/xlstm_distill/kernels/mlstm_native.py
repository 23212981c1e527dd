"""Native PyTorch mLSTM kernels: parallel (quadratic reference), chunkwise (training / prefill), recurrent (decode).

All three compute, per head, the stabilized mLSTM of PAPER.md section 1 with scalar gates:

    m_t = max(lf_t + m_{t-1}, i_t)                      lf_t = logsigmoid(forget pre-activation)
    C_t = exp(lf_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T
    n_t = exp(lf_t + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t
    h_t = q_t^T C_t / (max(|q_t^T n_t|, exp(-m_t)) + eps)     normalizer="max" (mLSTM)
    h_t = q_t^T C_t / (q_t^T n_t + eps)                       normalizer="sum" (linear attention: i = lf = 0)

q is *not* scaled by d^-0.5 here (the feature maps own the scale). An empty state is C = 0, n = 0, m = -inf.
``reset`` (B, S) marks tokens that start a new document: the state before them is discarded, which is how
padding runs and packed documents are kept apart. All math runs in float32; outputs have the dtype of v.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch.nn.functional import logsigmoid

from xlstm_distill.kernels.registry import register_kernel

if TYPE_CHECKING:
    from xlstm_distill.kernels.options import KernelOptions

Normalizer = Literal["max", "sum"]
EPS = 1e-6
# exp(-m) is clamped to exp(MAX_NEG_M): beyond it the state is numerically zero anyway, and an infinite
# normalizer would give 0 * inf = nan in the backward pass.
MAX_NEG_M = 80.0


class MLSTMState(NamedTuple):
    """Recurrent state of one mLSTM layer."""

    C: torch.Tensor  # (B, NH, DHQK, DHV)
    n: torch.Tensor  # (B, NH, DHQK)
    m: torch.Tensor  # (B, NH)


def empty_state(B: int, NH: int, DHQK: int, DHV: int, device: torch.device) -> MLSTMState:
    """The state before the first token: C = 0, n = 0, m = -inf (float32)."""
    f32 = dict(device=device, dtype=torch.float32)
    return MLSTMState(
        torch.zeros(B, NH, DHQK, DHV, **f32), torch.zeros(B, NH, DHQK, **f32), torch.full((B, NH), -math.inf, **f32)
    )


def _normalize(num: torch.Tensor, qn: torch.Tensor, m: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    # num (..., DHV), qn (...), m (...)
    if normalizer == "sum":
        return num / (qn + EPS).unsqueeze(-1)
    denom = torch.maximum(qn.abs(), torch.exp(torch.clamp(-m, max=MAX_NEG_M)))
    return num / (denom + EPS).unsqueeze(-1)


def mlstm_recurrent_step(
    q: torch.Tensor,  # (B, NH, DHQK)
    k: torch.Tensor,  # (B, NH, DHQK)
    v: torch.Tensor,  # (B, NH, DHV)
    i: torch.Tensor,  # (B, NH) input gate pre-activation (log space)
    lf: torch.Tensor,  # (B, NH) log forget gate
    state: MLSTMState,
    normalizer: Normalizer = "max",
) -> tuple[torch.Tensor, MLSTMState]:
    """One decoding step. Returns h (B, NH, DHV) and the new state."""
    q, k, v, i, lf = (x.float() for x in (q, k, v, i, lf))
    C, n, m = state
    m_new = torch.maximum(lf + m, i)  # (B, NH)
    f_act = torch.exp(lf + m - m_new)
    i_act = torch.exp(i - m_new)
    C = f_act[..., None, None] * C + i_act[..., None, None] * k.unsqueeze(-1) * v.unsqueeze(-2)
    n = f_act[..., None] * n + i_act[..., None] * k
    # products and sums, not einsums: torch.compile (the compiled decode step) fuses them with the update above,
    # where an einsum is a separate cuBLAS call per layer (a 12.9 us float32 GEMM for q C at the SmolLM2 shape)
    num = (q.unsqueeze(-1) * C).sum(-2)  # (B, NH, DHV)
    qn = (q * n).sum(-1)  # (B, NH)
    return _normalize(num, qn, m_new, normalizer), MLSTMState(C, n, m_new)


def mlstm_recurrent(
    q: torch.Tensor,  # (B, NH, S, DHQK)
    k: torch.Tensor,  # (B, NH, S, DHQK)
    v: torch.Tensor,  # (B, NH, S, DHV)
    i: torch.Tensor,  # (B, NH, S)
    lf: torch.Tensor,  # (B, NH, S)
    state: MLSTMState | None = None,
    reset: torch.Tensor | None = None,  # (B, S) bool
    normalizer: Normalizer = "max",
) -> tuple[torch.Tensor, MLSTMState]:
    """Token-by-token loop over :func:`mlstm_recurrent_step` (reference; slow). Returns h (B, NH, S, DHV)."""
    B, NH, S, DHQK = q.shape
    state = state or empty_state(B, NH, DHQK, v.shape[-1], q.device)
    empty = empty_state(B, NH, DHQK, v.shape[-1], q.device)
    hs = []
    for t in range(S):
        if reset is not None:
            r = reset[:, t]
            state = MLSTMState(*(torch.where(r.view(B, *[1] * (a.dim() - 1)), e, a) for a, e in zip(state, empty)))
        h, state = mlstm_recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], lf[:, :, t], state, normalizer)
        hs.append(h)
    return torch.stack(hs, dim=2).to(v.dtype), state


def _segment_ids(reset: torch.Tensor | None, B: int, S: int, device: torch.device) -> torch.Tensor:
    """(B, S) running document index: 0 until the first reset, +1 at every reset."""
    if reset is None:
        return torch.zeros(B, S, dtype=torch.long, device=device)
    return torch.cumsum(reset.long(), dim=1)


def _attend_with_state(
    q: torch.Tensor,  # (B, NH, NC, L, DHQK)
    k: torch.Tensor,  # (B, NH, NC, L, DHQK)
    v: torch.Tensor,  # (B, NH, NC, L, DHV)
    i: torch.Tensor,  # (B, NH, NC, L)
    lf: torch.Tensor,  # (B, NH, NC, L)
    seg: torch.Tensor,  # (B, NC, L) document index of every token
    C0: torch.Tensor,  # (B, NH, NC, DHQK, DHV) state before each chunk
    n0: torch.Tensor,  # (B, NH, NC, DHQK)
    m0: torch.Tensor,  # (B, NH, NC)
    seg0: torch.Tensor,  # (B, NC) document index the state before each chunk belongs to
    normalizer: Normalizer,
) -> torch.Tensor:
    """Outputs of every chunk from its intra-chunk (quadratic) part plus the state it starts from."""
    L = q.shape[-2]
    b = torch.cumsum(lf, dim=-1)  # (B, NH, NC, L) log decay from chunk start to t (inclusive)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    same_doc = seg.unsqueeze(-1) == seg.unsqueeze(-2)  # (B, NC, L, L)
    log_d = b.unsqueeze(-1) - b.unsqueeze(-2) + i.unsqueeze(-2)  # (B, NH, NC, L, L)
    log_d = log_d.masked_fill(~(causal & same_doc).unsqueeze(1), -math.inf)
    state_ok = (seg == seg0.unsqueeze(-1)).unsqueeze(1)  # (B, 1, NC, L) the query's document owns the state
    log_state = torch.where(state_ok, b + m0.unsqueeze(-1), -math.inf)  # (B, NH, NC, L)
    m = torch.maximum(log_d.amax(dim=-1), log_state)  # (B, NH, NC, L)
    d = torch.exp(log_d - m.unsqueeze(-1))  # (B, NH, NC, L, L)
    w_state = torch.exp(log_state - m)  # (B, NH, NC, L)
    scores = (q @ k.transpose(-1, -2)) * d
    num = scores @ v + w_state.unsqueeze(-1) * (q @ C0)
    qn = scores.sum(-1) + w_state * torch.einsum("bhcld,bhcd->bhcl", q, n0)
    return _normalize(num, qn, m, normalizer)


def mlstm_parallel(
    q: torch.Tensor,  # (B, NH, S, DHQK)
    k: torch.Tensor,  # (B, NH, S, DHQK)
    v: torch.Tensor,  # (B, NH, S, DHV)
    i: torch.Tensor,  # (B, NH, S)
    lf: torch.Tensor,  # (B, NH, S)
    state: MLSTMState | None = None,
    reset: torch.Tensor | None = None,  # (B, S) bool
    normalizer: Normalizer = "max",
) -> torch.Tensor:
    """Quadratic stabilized form over the whole sequence (reference; memory O(S^2)). Returns h (B, NH, S, DHV)."""
    B, NH, S, DHQK = q.shape
    state = state or empty_state(B, NH, DHQK, v.shape[-1], q.device)
    q, k, v, i, lf = (x.float().unsqueeze(2) for x in (q, k, v, i, lf))  # one chunk of length S
    seg = _segment_ids(reset, B, S, q.device).unsqueeze(1)  # (B, 1, S)
    h = _attend_with_state(
        q, k, v, i, lf, seg, state.C.unsqueeze(2), state.n.unsqueeze(2), state.m.unsqueeze(2),
        torch.zeros(B, 1, dtype=torch.long, device=q.device), normalizer,
    )
    return h.squeeze(2).to(v.dtype)


def mlstm_chunkwise(
    q: torch.Tensor,  # (B, NH, S, DHQK)
    k: torch.Tensor,  # (B, NH, S, DHQK)
    v: torch.Tensor,  # (B, NH, S, DHV)
    i: torch.Tensor,  # (B, NH, S)
    lf: torch.Tensor,  # (B, NH, S)
    state: MLSTMState | None = None,
    reset: torch.Tensor | None = None,  # (B, S) bool
    normalizer: Normalizer = "max",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise form: quadratic inside chunks of ``chunk_size``, recurrent across them (time and memory linear in S).

    Returns h (B, NH, S, DHV) and the state after the last token.
    """
    B, NH, S, DHQK = q.shape
    DHV = v.shape[-1]
    out_dtype = v.dtype
    state = state or empty_state(B, NH, DHQK, DHV, q.device)
    L = min(chunk_size, S)
    NC = -(-S // L)
    pad = NC * L - S
    seg = _segment_ids(reset, B, S, q.device)
    q, k, v, i, lf = (x.float() for x in (q, k, v, i, lf))
    if pad:  # padded tokens write nothing (i = -inf would risk nan gradients: use a huge negative) and keep the state
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        i = torch.nn.functional.pad(i, (0, pad), value=-1e30)
        lf = torch.nn.functional.pad(lf, (0, pad), value=0.0)
        seg = torch.nn.functional.pad(seg, (0, pad), mode="replicate")
    q, k, v = (x.view(B, NH, NC, L, -1) for x in (q, k, v))
    i, lf = i.view(B, NH, NC, L), lf.view(B, NH, NC, L)
    seg = seg.view(B, NC, L)

    # Each chunk's own contribution to the state at its end, stabilized by its own max m_loc.
    b = torch.cumsum(lf, dim=-1)  # (B, NH, NC, L)
    last_doc = (seg == seg[..., -1:]).unsqueeze(1)  # (B, 1, NC, L) tokens of the chunk's last document
    log_w = torch.where(last_doc, b[..., -1:] - b + i, -math.inf)  # (B, NH, NC, L)
    m_loc = log_w.amax(dim=-1)  # (B, NH, NC)
    w = torch.exp(log_w - m_loc.unsqueeze(-1))
    C_loc = (k * w.unsqueeze(-1)).transpose(-1, -2) @ v  # (B, NH, NC, DHQK, DHV)
    n_loc = (k * w.unsqueeze(-1)).sum(-2)  # (B, NH, NC, DHQK)
    keeps = (seg[..., :1] == seg[..., -1:]).squeeze(-1)  # (B, NC) the chunk continues the state's document

    # Recurrence across chunks (sequential, cheap): states before every chunk. The per-chunk tensors are unbound
    # once: indexing them inside the loop would make autograd write a full-size zero gradient per chunk (O(NC^2)).
    C, n, m = state
    seg_prev = torch.zeros(B, dtype=torch.long, device=q.device)  # the initial state belongs to document 0
    starts_C, starts_n, starts_m, starts_seg = [], [], [], []
    per_chunk = zip(C_loc.unbind(2), n_loc.unbind(2), m_loc.unbind(2), b[..., -1].unbind(2), keeps.unbind(1),
                    seg[..., 0].unbind(1), seg[..., -1].unbind(1))
    for C_c, n_c, m_c, b_c, keeps_c, first_doc, last_doc_c in per_chunk:
        starts_C.append(C), starts_n.append(n), starts_m.append(m), starts_seg.append(seg_prev)
        carry = (keeps_c & (first_doc == seg_prev)).view(B, 1)  # (B, 1)
        log_carry = torch.where(carry, b_c + m, -math.inf)  # (B, NH)
        m_new = torch.maximum(log_carry, m_c)
        a_carry, a_loc = torch.exp(log_carry - m_new), torch.exp(m_c - m_new)
        C = a_carry[..., None, None] * C + a_loc[..., None, None] * C_c
        n = a_carry[..., None] * n + a_loc[..., None] * n_c
        m, seg_prev = m_new, last_doc_c

    h = _attend_with_state(
        q, k, v, i, lf, seg,
        torch.stack(starts_C, 2), torch.stack(starts_n, 2), torch.stack(starts_m, 2), torch.stack(starts_seg, 1),
        normalizer,
    )
    h = h.reshape(B, NH, NC * L, DHV)[:, :, :S]
    return h.to(out_dtype), MLSTMState(C, n, m)


def _log_gates(i: torch.Tensor | None, f: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Normalizer]:
    """Input gates and log forget gates (float32) from the operations' pre-activations; no gates (None): linear
    attention, i = lf = 0 with the sum normalizer. ``like`` (B, NH, S) or (B, NH) gives the shape."""
    if i is None:
        zeros = torch.zeros(like.shape, device=like.device)
        return zeros, zeros, "sum"
    return i.float(), logsigmoid(f.float()), "max"


# The registered implementations (xlstm_distill.kernels.ops has the signatures).
@register_kernel("mlstm", "native")
def _native(q, k, v, i, f, state, reset, chunk_size: int, options: KernelOptions):
    i, lf, normalizer = _log_gates(i, f, q[..., 0])
    return mlstm_chunkwise(q, k, v, i, lf, state, reset, normalizer, chunk_size)


@register_kernel("mlstm", "recurrent")
def _recurrent(q, k, v, i, f, state, reset, chunk_size: int, options: KernelOptions):
    i, lf, normalizer = _log_gates(i, f, q[..., 0])
    return mlstm_recurrent(q, k, v, i, lf, state, reset, normalizer)


@register_kernel("mlstm_step", "native")
def _native_step(q, k, v, i, f, state, options: KernelOptions):
    i, lf, normalizer = _log_gates(i, f, q[..., 0])
    h, state = mlstm_recurrent_step(q, k, v, i, lf, state, normalizer)
    return h.to(v.dtype), state
