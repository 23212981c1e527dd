"""The gated mLSTM as our own Triton kernels, forward and backward, with the exact gradient of the normalizer.

Same function as :func:`xlstm_distill.kernels.mlstm_native.mlstm_chunkwise` with gates (tested against its autograd):
per head, with b_t the cumulative log forget gate and the log weight of token s at token t
``a_ts = b_t - b_s + i_s`` (s <= t, same document; the initial state enters as a source with ``b_t + m0``),

    m_t = max_s a_ts                      (the stabilizer: a running max; its argmax s*(t) is the "source" of m_t)
    N_t = sum_s e^(a_ts - m_t) (q_t.k_s) v_s,   s_t = sum_s e^(a_ts - m_t) (q_t.k_s)       (stabilized q C, q.n)
    h_t = N_t / den_t,   den_t = max(|s_t|, e^(-m_t)) + eps   (e^(-m) clamped at e^80, as the reference)

Exact gradient (g_t = dL/dh_t). Unstabilized, h_t = Ñ_t / (max(|s̃_t|, 1) + eps e^(m_t)) with Ñ = e^m N, s̃ = e^m s:
the function depends on m_t through eps (and, where -m_t > 80, through the clamp). Differentiating h = N / den:

    delta_t = g_t / den_t                                         gradient of N_t
    gamma_t = -(g_t.h_t) / den_t sign(s_t) [|s_t| > e^(-m_t)]     gradient of s_t (0 on the e^(-m) branch)
    mu_t    = -(g_t.h_t) eps / den_t                              gradient of m_t, N and s following it (~ e^(-m_t));
              (-(g_t.h_t) where the clamped e^(-m) is the normalizer)

Then N, s are linear attention with weights e^(a_ts - m_t): P_ts = e^(a_ts - m_t) (q_t.k_s) (delta_t.v_s + gamma_t) is
the gradient of a_ts, and m_t = a_{t s*(t)} passes mu_t to its source. So

    dq_t = sum_s e^(a_ts - m_t) (delta_t.v_s + gamma_t) k_s (+ the state: e^(b_t + m0 - m_t) (C0 delta_t + gamma_t n0))
    dk_s = sum_t e^(a_ts - m_t) (delta_t.v_s + gamma_t) q_t,      dv_s = sum_t e^(a_ts - m_t) (q_t.k_s) delta_t
    R_t = q_t.dq_t + mu_t  (all gradient reaching row t),   Q_s = k_s.dk_s + sum_{t: s*(t)=s} mu_t  (column s)
    di_s = Q_s,   dlf_r = sum_{t>=r} (R_t - Q_t)   (a_ts contains lf_r for s < r <= t)

(dlf_r is 0 at a document's first token: nothing crosses a reset.) Across chunks the same sums run through the
chunk states: C_c before chunk c is stabilized by m_c, and its gradient G_c = dL/dC_c obeys
G_c = sum_{t in c} e^(b_t + m_c - m_t) q_t delta_t^T + [chunk continues the state] e^(m_c + B_c - m_{c+1}) G_{c+1}
(g_c for n likewise with gamma_t), every exponent <= 0. The final state (C, n, m) is differentiable too: G after the
last chunk is dC_last, the final m (source s*_last) gets mu_last = dm_last - <dC_last, C> - <dn_last, n>, and the
final state is one more row after the last token with R = dm_last. The initial state's gradients are G_0, g_0 and
dm0 = <G_0, C0> + <g_0, n0> + the mu of the m whose source is the initial state (m0 scales the state: C0 e^m0;
equal to sum_t (R_t - Q_t), which cancels in float32).

Kernels (``mlstm_triton_fw.py``, ``mlstm_triton_bw.py``, imported on first use):
forward: the chunk states (sequential over chunks, float32; kept for the backward in q's dtype, which the kernels'
dots read anyway: (DHQK, DHV) per chunk and head, in bf16 at 32 heads of 128 1 MB per chunk of 64 tokens per layer,
537 MB at 32K tokens) and the outputs with each token's m, q.n and source of m; backward: gamma, mu and the
normalizer per token, the state gradients (sequential, from the last chunk; as much memory again while it runs),
then dq, dk, dv and q.dq, k.dk per chunk; the gate and initial-state gradients are the sums above (PyTorch, O(S)).
Nothing of the forward is computed again. Chunk: the model's ``chunk_size`` rounded up to a power of two, 16 to 64.

Both passes are ``torch.library`` custom operators (``xlstm_distill::mlstm_triton_forward`` / ``_backward``) with fake
implementations: one opaque call each under torch.compile. Ungated memories (linear attention) run ``native``.
"""

from __future__ import annotations

import os

import torch
from torch.nn.functional import logsigmoid

from xlstm_distill.kernels import mlstm_native as ref
from xlstm_distill.kernels.mlstm_native import MLSTMState
from xlstm_distill.kernels.options import KernelOptions
from xlstm_distill.kernels.registry import register_kernel

# stands for m = -inf (no state yet) inside the kernels: exp(-1e30 + anything finite) is 0, never nan
NO_STATE_M = -1e30
# at 128 tokens the per-chunk kernels spill heavily (bf16, heads of 128) or, in float32, need more shared memory than
# an H100 / H200 block has (ptxas for sm_90)
MIN_CHUNK, MAX_CHUNK = 16, 64
BLOCK = 64  # largest block of DHQK / DHV columns per program


def chunk_length(chunk_size: int) -> int:
    """The kernel's chunk: ``chunk_size`` rounded up to a power of two, at least 16 (tl.dot's smallest tile), at
    most 64."""
    return min(MAX_CHUNK, max(MIN_CHUNK, 1 << (max(1, chunk_size) - 1).bit_length()))


def mlstm_triton(
    q: torch.Tensor,  # (B, NH, S, DHQK)
    k: torch.Tensor,  # (B, NH, S, DHQK)
    v: torch.Tensor,  # (B, NH, S, DHV)
    i: torch.Tensor,  # (B, NH, S) input gate pre-activations
    f: torch.Tensor,  # (B, NH, S) forget gate pre-activations (logsigmoid applied here)
    state: MLSTMState | None = None,
    reset: torch.Tensor | None = None,  # (B, S) bool, True at each document's first token
    chunk_size: int = 64,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise gated mLSTM on the Triton kernels. Returns h (B, NH, S, DHV) in v's dtype and the final state
    (float32; float64 for float64 inputs). q, k and v are computed in v's dtype (under CUDA autocast in autocast's
    dtype, as TFLA gets them); gates and states in float32."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"mlstm triton: q, k must be (B, NH, S, DHQK) and v (B, NH, S, DHV) with the same B, NH, S; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if i is None or f is None or i.shape != q.shape[:3] or f.shape != q.shape[:3]:
        raise ValueError("mlstm triton: gated mLSTM only, i and f must be (B, NH, S) pre-activations (an ungated "
                         "memory runs the native kernel: kernels.mlstm='native' or 'auto').")
    B, NH, S, DHQK = q.shape
    if S == 0:
        raise ValueError("mlstm triton: the sequence is empty (S = 0); call it with at least one token.")
    out_dtype = dtype = v.dtype
    if q.is_cuda and torch.is_autocast_enabled("cuda"):  # q, k, v in autocast's dtype, as TFLA gets them
        dtype = torch.get_autocast_dtype("cuda")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    i, lf = i.to(acc), logsigmoid(f.to(acc))
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels.mlstm='triton' on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before importing triton (slow; for tests), or use kernels.mlstm='native'.")
    # each token's document index (int32); without a state the first token starts a document: nothing before it
    # (then its forget gate gets an exact zero gradient, not a rounding residue)
    starts = torch.zeros(B, S, dtype=torch.bool, device=q.device) if reset is None else reset.bool()
    if state is None:
        starts = torch.cat([torch.ones_like(starts[:, :1]), starts[:, 1:]], 1)
    seg = torch.cumsum(starts.to(torch.int32), dim=1, dtype=torch.int32)
    if state is None:
        C0 = q.new_zeros(B, NH, DHQK, v.shape[-1], dtype=acc)
        n0 = q.new_zeros(B, NH, DHQK, dtype=acc)
        m0 = q.new_full((B, NH), NO_STATE_M, dtype=acc)
    else:
        C0, n0 = state.C.to(acc), state.n.to(acc)
        m0 = torch.where(torch.isfinite(state.m), state.m.to(acc), NO_STATE_M)
    forward = torch.ops.xlstm_distill.mlstm_triton_forward
    h, C, n, m = forward(q, k, v, i, lf, seg, C0, n0, m0, chunk_length(chunk_size))[:4]
    return h.to(out_dtype), MLSTMState(C, n, m)


# ---------------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("xlstm_distill::mlstm_triton_forward", mutates_args=())
def _forward(
    q: torch.Tensor,  # (B, NH, S, DHQK)
    k: torch.Tensor,  # (B, NH, S, DHQK)
    v: torch.Tensor,  # (B, NH, S, DHV)
    i: torch.Tensor,  # (B, NH, S) float32 (float64)
    lf: torch.Tensor,  # (B, NH, S) log forget gates, as i
    seg: torch.Tensor,  # (B, S) int32 document index
    C0: torch.Tensor,  # (B, NH, DHQK, DHV) as i
    n0: torch.Tensor,  # (B, NH, DHQK)
    m0: torch.Tensor,  # (B, NH), NO_STATE_M for no state
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (B, NH, S, DHV) in v's dtype; the final C, n, m (as i); for the backward: the states before each chunk C
    (B, NH, NC, DHQK, DHV) in q's dtype (the kernels read them as tl.dot operands: a 16-bit copy loses nothing and
    halves their memory), n and m (B, NH, NC + 1, ...; the last: the final state's), each token's m and q.n
    (B, NH, S), the sources of the tokens' and the final m (int32)."""
    from xlstm_distill.kernels import mlstm_triton_fw as fw

    q, k, v, i, lf, seg, C0, n0, m0 = (x.contiguous() for x in (q, k, v, i, lf, seg, C0, n0, m0))
    seg = seg.to(torch.int32)  # the kernels' loop-carried document index is int32 (a compiled caller may pass int64)
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    acc = i.dtype
    NC = -(-S // chunk)
    C_states = q.new_empty(B, NH, NC, DK, DV)
    C_last = q.new_empty(B, NH, DK, DV, dtype=acc)
    n_states = q.new_empty(B, NH, NC + 1, DK, dtype=acc)
    m_states = q.new_empty(B, NH, NC + 1, dtype=acc)
    src_states = q.new_empty(B, NH, NC + 1, dtype=torch.int32)
    BDK, BDV = _pow2(DK), _pow2(DV)
    BK, BV = min(BLOCK, BDK), min(BLOCK, BDV)
    tl_acc, tl_dot = _tl_dtype(acc), _dot_dtype(q.dtype)
    fw.chunk_states_kernel[(B * NH, triton_cdiv(DK, BK), triton_cdiv(DV, BV))](
        k, v, i, lf, seg, C0, n0, m0, C_states, C_last, n_states, m_states, src_states, NH, S, NC,
        DK=DK, DV=DV, L=chunk, BK=BK, BV=BV, ACC=tl_acc, DOT=tl_dot, num_warps=_warps(BK, BV))
    h = torch.empty_like(v)
    m_tok = q.new_empty(B, NH, S, dtype=acc)
    qn_tok = q.new_empty(B, NH, S, dtype=acc)
    src_tok = q.new_empty(B, NH, S, dtype=torch.int32)
    fw.chunk_output_kernel[(B * NH, NC, triton_cdiv(DV, BV))](
        q, k, v, i, lf, seg, C_states, n_states, m_states, src_states, h, m_tok, qn_tok, src_tok, NH, S, NC,
        DK=DK, DV=DV, L=chunk, BDK=BDK, BV=BV, ACC=tl_acc, DOT=tl_dot, EPS=ref.EPS, MAX_NEG_M=ref.MAX_NEG_M,
        num_warps=_warps(chunk, max(BDK, BV)))
    last = (n_states[:, :, NC].clone(), m_states[:, :, NC].clone(), src_states[:, :, NC].clone())
    return h, C_last, *last[:2], C_states, n_states, m_states, m_tok, qn_tok, src_tok, last[2]


@_forward.register_fake
def _(q, k, v, i, lf, seg, C0, n0, m0, chunk):
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    NC = -(-S // chunk)
    acc = dict(dtype=i.dtype, device=q.device)
    per_token = q.new_empty(B, NH, S, **acc)
    return (torch.empty_like(v), q.new_empty(B, NH, DK, DV, **acc), q.new_empty(B, NH, DK, **acc),
            q.new_empty(B, NH, **acc), q.new_empty(B, NH, NC, DK, DV), q.new_empty(B, NH, NC + 1, DK, **acc),
            q.new_empty(B, NH, NC + 1, **acc), per_token, per_token.clone(),
            q.new_empty(B, NH, S, dtype=torch.int32), q.new_empty(B, NH, dtype=torch.int32))


# --------------------------------------------------------------------------------------------------- backward
@torch.library.custom_op("xlstm_distill::mlstm_triton_backward", mutates_args=())
def _backward(
    dh: torch.Tensor,  # (B, NH, S, DHV)
    dC_last: torch.Tensor,  # (B, NH, DHQK, DHV) gradients of the final state
    dn_last: torch.Tensor,  # (B, NH, DHQK)
    dm_last: torch.Tensor,  # (B, NH)
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, lf: torch.Tensor,  # as in the forward
    seg: torch.Tensor,  # (B, S) int32
    h: torch.Tensor,  # (B, NH, S, DHV) the forward's output
    C0: torch.Tensor, n0: torch.Tensor,  # the initial state
    C_last: torch.Tensor, n_last: torch.Tensor,  # the final state
    C_states: torch.Tensor,  # (B, NH, NC, DHQK, DHV)
    n_states: torch.Tensor, m_states: torch.Tensor,  # (B, NH, NC + 1, ...)
    m_tok: torch.Tensor, qn_tok: torch.Tensor, src_tok: torch.Tensor,  # (B, NH, S)
    src_last: torch.Tensor,  # (B, NH) int32
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Gradients of q, k, v (their dtype), i, lf, and of the initial C0, n0, m0 (float32; float64)."""
    from xlstm_distill.kernels import mlstm_triton_bw as bw

    dh, q, k, v, i, lf, seg = (x.contiguous() for x in (dh, q, k, v, i, lf, seg))
    seg = seg.to(torch.int32)
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    acc = i.dtype
    NC = C_states.shape[2]
    BDK, BDV = _pow2(DK), _pow2(DV)
    tl_acc, tl_dot = _tl_dtype(acc), _dot_dtype(q.dtype)
    # per token: the normalizer and the gradients of q.n (gamma) and of m (mu), module docstring
    den, gam, mu = (torch.empty_like(m_tok) for _ in range(3))  # (B, NH, S)
    BT = max(16, 4096 // BDV)
    bw.token_grads_kernel[(triton_cdiv(B * NH * S, BT),)](
        dh, h.contiguous(), m_tok, qn_tok, den, gam, mu, B * NH * S, DV=DV, BT=BT, BDV=BDV, ACC=tl_acc,
        EPS=ref.EPS, MAX_NEG_M=ref.MAX_NEG_M, num_warps=4)

    BK, BV = min(BLOCK, BDK), min(BLOCK, BDV)
    # value columns per program of the per-chunk backward: 32 for 4-byte operands (64 needs 256 KB of shared memory
    # at heads of 128, more than an H100 / H200 block has)
    BV_chunk = min(BLOCK if q.element_size() == 2 else BLOCK // 2, BDV)
    NV = triton_cdiv(DV, BV_chunk)
    G = q.new_empty(B, NH, NC, DK, DV)  # after each chunk, in q's dtype (read as tl.dot operands, as C_states)
    dC0 = q.new_empty(B, NH, DK, DV, dtype=acc)
    g = q.new_empty(B, NH, NC + 1, DK, dtype=acc)
    bw.chunk_state_grads_kernel[(B * NH, triton_cdiv(DK, BK), triton_cdiv(DV, BV))](
        q, dh, den, gam, lf, seg, m_tok, m_states, dC_last.to(acc).contiguous(), dn_last.to(acc).contiguous(), G, dC0,
        g, NH, S, NC, DK=DK, DV=DV, L=chunk, BK=BK, BV=BV, ACC=tl_acc, DOT=tl_dot, num_warps=_warps(BK, BV))
    dq = q.new_empty(NV, B, NH, S, DK, dtype=acc)
    dk = q.new_empty(NV, B, NH, S, DK, dtype=acc)
    dv = q.new_empty(B, NH, S, DV, dtype=acc)
    qdq, kdk = (q.new_empty(NV, B, NH, S, dtype=acc) for _ in range(2))
    bw.chunk_grads_kernel[(B * NH, NC, NV)](
        q, k, v, dh, den, gam, i, lf, seg, m_tok, C_states, n_states, m_states, G, g, dq, dk, dv, qdq, kdk,
        NH, S, NC, B * NH,
        DK=DK, DV=DV, L=chunk, BDK=BDK, BV=BV_chunk, ACC=tl_acc, DOT=tl_dot, num_warps=_warps(chunk, BDK))
    # the gates and the initial stabilizer: row and column sums (module docstring)
    R = qdq.sum(0) + mu  # (B, NH, S)
    Q = kdk.sum(0)
    Q = Q.scatter_add(-1, src_tok.clamp(min=0).long(), torch.where(src_tok >= 0, mu, 0.0))
    mu_last = dm_last.to(acc) - (dC_last.to(acc) * C_last).sum((-2, -1)) - (dn_last.to(acc) * n_last).sum(-1)
    Q = Q.scatter_add(-1, src_last.clamp(min=0).long().unsqueeze(-1),
                      torch.where(src_last >= 0, mu_last, 0.0).unsqueeze(-1))
    diff = (R - Q).double()
    dlf = diff.flip(-1).cumsum(-1).flip(-1) + dm_last.double().unsqueeze(-1)  # (B, NH, S)
    # m0 scales the initial state's every contribution (C0 e^m0, n0 e^m0) and is the source of the m it stays
    # (directly: the sum of R - Q is the same, up to its cancellation)
    dm0 = ((dC0 * C0).sum((-2, -1)) + (g[:, :, 0] * n0).sum(-1) + torch.where(src_tok < 0, mu, 0.0).sum(-1)
           + torch.where(src_last < 0, mu_last, 0.0))
    starts = torch.cat([seg[:, :1] > 0, seg[:, 1:] != seg[:, :-1]], 1)  # (B, S) a document's first token
    dlf = torch.where(starts[:, None, :], 0.0, dlf).to(acc)
    dq, dk = (x[0] if NV == 1 else x.sum(0) for x in (dq, dk))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), Q, dlf, dC0, g[:, :, 0].contiguous(), dm0


@_backward.register_fake
def _(dh, dC_last, dn_last, dm_last, q, k, v, i, lf, seg, h, C0, n0, C_last, n_last, C_states, n_states, m_states,
      m_tok, qn_tok, src_tok, src_last, chunk):
    B, NH, S, DK = q.shape
    acc = dict(dtype=i.dtype, device=q.device)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(i), torch.empty_like(lf),
            q.new_empty(B, NH, DK, v.shape[-1], **acc), q.new_empty(B, NH, DK, **acc), q.new_empty(B, NH, **acc))


def _setup_backward(ctx, inputs, output) -> None:
    q, k, v, i, lf, seg, C0, n0, m0, chunk = inputs
    h, C_last, n_last, _, C_states, n_states, m_states, m_tok, qn_tok, src_tok, src_last = output
    ctx.save_for_backward(q, k, v, i, lf, seg, h, C0, n0, C_last, n_last, C_states, n_states, m_states, m_tok,
                          qn_tok, src_tok, src_last)
    ctx.chunk = chunk


def _differentiate(ctx, dh, dC_last, dn_last, dm_last, *_):
    q, k, v, i, lf, seg, h, C0, n0, C_last, n_last, *rest = ctx.saved_tensors
    dh = torch.zeros_like(h) if dh is None else dh
    dC_last = torch.zeros_like(C_last) if dC_last is None else dC_last
    dn_last = torch.zeros_like(n_last) if dn_last is None else dn_last
    dm_last = n_last.new_zeros(n_last.shape[:2]) if dm_last is None else dm_last
    grads = torch.ops.xlstm_distill.mlstm_triton_backward(dh, dC_last, dn_last, dm_last, q, k, v, i, lf, seg, h,
                                                          C0, n0, C_last, n_last, *rest, ctx.chunk)
    return (*grads[:5], None, *grads[5:], None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("The triton mLSTM's backward is first-order only; use kernels.mlstm='native' for higher "
                       "derivatives.")


_forward.register_autograd(_differentiate, setup_context=_setup_backward)
_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _pow2(n: int) -> int:
    """The smallest power of two >= n and >= 16 (tl.dot's smallest tile)."""
    return max(16, 1 << (n - 1).bit_length())


def _warps(rows: int, columns: int) -> int:
    """Warps of a program whose largest tile is rows x columns: 8 from 64 x 64 (the state kernels' C block: no
    spills with 8 at heads of 128, ptxas for sm_90), and for larger tiles (q, k of 64 tokens x 128), else 4."""
    return 4 if rows * columns < 4096 else 8


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


def _dot_dtype(dtype: torch.dtype):
    """The operands' dtype of the kernels' tl.dot: the inputs' own, except in Triton's interpreter, whose 16-bit dots
    multiply the raw bits (Triton 3.6): float32 there (the loads, stores and casts stay 16-bit)."""
    if dtype in (torch.bfloat16, torch.float16) and os.environ.get("TRITON_INTERPRET") == "1":
        dtype = torch.float32
    return _tl_dtype(dtype)


# The registered implementation (xlstm_distill.kernels.ops has the signature).
@register_kernel("mlstm", "triton")
def _triton(q, k, v, i, f, state, reset, chunk_size: int, options: KernelOptions):
    return mlstm_triton(q, k, v, i, f, state, reset, chunk_size)
