"""The hybrid mixer's prefill forward as two Triton kernels (imported on first use: Triton reads TRITON_INTERPRET at
import, which the tests set on a machine without a GPU).

The function is :func:`xlstm_distill.kernels.mixer_native.mixer_reference` (gated mLSTM over Hedgehog feature maps +
sliding window / sink softmax attention, mixed by the output gate). The tokens are cut into query blocks of ``L``
tokens; ``STATE_EVERY`` (4) blocks make a state chunk, before which the mLSTM state is kept.

1. ``_chunk_states_kernel``, one program per (batch, head, block of value columns), walks the blocks in order and
   writes the mLSTM state *before* every state chunk once (C (DF, DH), n (DF), m, float32), and the final state:
   phi(k) = softmax(k W_k + b_k) is computed in the kernel, each block's own contribution stabilized by its own
   maximum and merged with the carried state (the state is dropped at a document start: ``seg``, the running count
   of resets, differs).
2. ``_mixer_kernel``, one program per (batch, head, query block): phi(q), phi(k) in the kernel; the mLSTM output from
   the state before the block's state chunk plus the chunk's tokens up to the block (key tiles with a running
   stabilizer, as an online softmax), with the normalizer max(|q.n|, exp(-m)) + eps of ``mlstm_native``; the window
   + sink softmax attention over the key tiles of the window (online softmax; GQA: key head h // (NH // NKV);
   optional soft-capping); the output-gate mix o * memory + (1 - o) * attention; y written once.

Sinks: a query block's rows see the keys of their document inside the window, and the document's first
``num_sinks`` tokens. Only the document of the block's first row can have sinks before the window's key tiles (any
later document in the block starts inside the block), so one extra tile holds them. Both kernels accumulate in
float32; with 16-bit inputs the dots of inputs run in their dtype and those of computed float32 values (features,
decays, states) in TF32; with float32 inputs every dot runs in full float32 precision (``ieee``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from xlstm_distill.kernels.mlstm_native import EPS, MAX_NEG_M, MLSTMState



def _interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with ``int(array)`` on a one-element array, which NumPy >=
    2.4 refuses ("only 0-dimensional arrays can be converted"): a loop over a runtime bound then fails there (only in
    the interpreter; compiled kernels are unaffected). Its scalars are converted with ``.item()`` instead."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    if getattr(interpreter, "_scalar_index_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch
    interpreter._scalar_index_patched = True


_interpreter_loop_bounds()

# module constants a kernel reads must be constexpr (Triton refuses other globals)
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
NEG = tl.constexpr(-1.0e30)  # a masked attention score: finite, so a fully masked tile gives no nan (weight zeroed)
NORM_EPS = tl.constexpr(EPS)  # mlstm_native's normalizer eps and exp(-m) clamp
NORM_MAX_NEG_M = tl.constexpr(MAX_NEG_M)
BLOCK_N = 64  # key tile of the window attention
# key tile of the mLSTM's chunk part: 32 halves the (L, key tile) float32 temporaries against 64, and the register
# spills with them (ptxas for sm_90, DH = DF = 128, bf16: 1.9 KB -> 1.1 KB spilled; not timed)
MLSTM_KEY_TILE = 32
STATE_EVERY = 4  # a state chunk is this many query blocks: one state (DF x DH float32) written per 4 L tokens


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b, float32 result. In Triton's interpreter 16-bit dots come out wrong (3.6: the raw bits are multiplied):
    there the operands are made float32 first (INTERPRETING is a compile-time constant, False on a GPU)."""
    if INTERPRETING:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _feature_map(
    x,  # (L, BLOCK_D) input rows, their own dtype
    w,  # (BLOCK_D, BLOCK_F) the head's weight
    bias,  # (BLOCK_F,) float32
    f_ok,  # (BLOCK_F,) bool, the columns that exist (DF may not be a power of two)
    PREC: tl.constexpr,
):
    """softmax(x W + b) over the feature columns, float32 (L, BLOCK_F)."""
    z = _dot(x, w.to(x.dtype), PREC) + bias[None, :]
    z = tl.where(f_ok[None, :], z, float("-inf"))
    z = tl.exp(z - tl.max(z, 1)[:, None])
    return z / tl.sum(z, 1)[:, None]


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _chunk_states_kernel(
    K, V, GATES,  # k (B, NKV, T, DH), v (B, NKV, T, DH), gates (B, 3 NH, T)
    WK, BK, SEG,  # (NH, DH, DF), (NH, DF), (B, T) int32
    C_INIT, N_INIT, M_INIT,  # (B, NH, DF, DH), (B, NH, DF), (B, NH) float32 (read when HAS_STATE)
    C_ALL, N_ALL, M_ALL,  # (B, NH, NCS, DF, DH), (B, NH, NCS, DF), (B, NH, NCS): the state before each state chunk
    C_LAST, N_LAST, M_LAST,  # (B, NH, DF, DH), (B, NH, DF), (B, NH) float32: the state after the last token
    T, NH, G, DH, DF, NC, NCS,
    skb, skh, skt, svb, svh, svt, sgb, sgh, sgt,
    HAS_STATE: tl.constexpr, L: tl.constexpr, S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_V: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)  # batch * NH + head
    pid_v = tl.program_id(1)  # block of value columns
    b = (pid // NH).to(tl.int64)
    h = pid % NH
    hk = (h // G).to(tl.int64)
    offs_t = tl.arange(0, L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    d_ok, f_ok, v_ok = offs_d < DH, offs_f < DF, offs_v < DH
    fv_ok = f_ok[:, None] & v_ok[None, :]
    first_v = pid_v == 0  # n and m are written by the first block of value columns
    w = tl.load(WK + h * DH * DF + offs_d[:, None] * DF + offs_f[None, :], mask=d_ok[:, None] & f_ok[None, :],
                other=0.0)  # (BLOCK_D, BLOCK_F)
    bias = tl.load(BK + h * DF + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    state_cn = pid.to(tl.int64) * DF * DH + offs_f[:, None] * DH + offs_v[None, :]  # (BLOCK_F, BLOCK_V)
    if HAS_STATE:
        C = tl.load(C_INIT + state_cn, mask=fv_ok, other=0.0)
        n = tl.load(N_INIT + pid.to(tl.int64) * DF + offs_f, mask=f_ok, other=0.0)
        m = tl.load(M_INIT + pid)
    else:
        C = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
        n = tl.zeros([BLOCK_F], dtype=tl.float32)
        m = tl.full([], float("-inf"), tl.float32)
    seg_state = tl.full([], 0, tl.int32)  # the document the state belongs to (the initial state: document 0)
    for c in range(0, NC):  # blocks of L tokens; the state is written before every S-th (a state chunk)
        chunk = pid.to(tl.int64) * NCS + c // S
        starts = c % S == 0
        tl.store(C_ALL + chunk * DF * DH + offs_f[:, None] * DH + offs_v[None, :], C, mask=fv_ok & starts)
        tl.store(N_ALL + chunk * DF + offs_f, n, mask=f_ok & first_v & starts)
        tl.store(M_ALL + chunk, m, mask=first_v & starts)
        t = c * L + offs_t
        t_ok = t < T
        k = tl.load(K + b * skb + hk * skh + t[:, None] * skt + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                    other=0.0)
        phi = _feature_map(k, w, bias, f_ok, PREC)  # (L, BLOCK_F)
        v = tl.load(V + b * svb + hk * svh + t[:, None] * svt + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :],
                    other=0.0)
        ig = tl.load(GATES + b * sgb + h * sgh + t * sgt, mask=t_ok, other=0.0).to(tl.float32)
        fg = tl.load(GATES + b * sgb + (NH + h) * sgh + t * sgt, mask=t_ok, other=0.0).to(tl.float32)
        lf = tl.where(t_ok, _logsigmoid(fg), 0.0)  # padded tokens keep the state
        seg = tl.load(SEG + b * T + t, mask=t_ok, other=-1)
        b_cum = tl.cumsum(lf, 0)  # (L,) log decay from the chunk's start to t, inclusive
        b_last = tl.sum(lf, 0)
        seg_last = tl.max(seg, 0)  # the document of the chunk's last token
        log_w = tl.where(t_ok & (seg == seg_last), b_last - b_cum + ig, float("-inf"))  # (L,)
        log_carry = tl.where(seg_state == seg_last, b_last + m, float("-inf"))
        m_new = tl.maximum(log_carry, tl.max(log_w, 0))  # finite: the last token is in its own document
        a_carry = tl.exp(log_carry - m_new)
        kw = phi * tl.exp(log_w - m_new)[:, None]  # (L, BLOCK_F)
        C = a_carry * C + _dot(tl.trans(kw), v.to(tl.float32), PREC)
        n = a_carry * n + tl.sum(kw, 0)
        m = m_new
        seg_state = seg_last
    tl.store(C_LAST + state_cn, C, mask=fv_ok)
    tl.store(N_LAST + pid.to(tl.int64) * DF + offs_f, n, mask=f_ok & first_v)
    tl.store(M_LAST + pid, m, mask=first_v)


@triton.jit
def _softmax_step(
    scores,  # (L, N) float32 scaled (and capped) scores
    mask,  # (L, N) bool, True = attend
    v,  # (N, BLOCK_D) values, their dtype
    m_i, l_i, acc,  # (L,), (L,), (L, BLOCK_D) float32: running maximum, sum of weights, weighted values
    PREC: tl.constexpr,
):
    """One key tile of the online softmax."""
    scores = tl.where(mask, scores, NEG)
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.where(mask, tl.exp(scores - m_new[:, None]), 0.0)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC)
    return m_new, l_i, acc


@triton.jit
def _scores(q, k, scale, softcap, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    """q (L, BLOCK_D) . k (N, BLOCK_D)^T * scale, soft-capped: softcap * tanh(s / softcap)."""
    s = _dot(q, tl.trans(k), PREC) * scale
    if HAS_SOFTCAP:
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    return s


@triton.jit
def _mixer_kernel(
    Q, K, V, GATES,  # q (B, NH, T, DH), k, v (B, NKV, T, DH), gates (B, 3 NH, T)
    WQ, BQ, WK, BK,  # the feature maps: (NH, DH, DF), (NH, DF) each
    SEG, DOC,  # (B, T) int32: document index (running count of resets), first token of the token's document
    C_ALL, N_ALL, M_ALL,  # (B, NH, NCS, DF, DH), (B, NH, NCS, DF), (B, NH, NCS) float32: state before each S blocks
    Y,  # (B, NH, T, DH)
    T, NH, G, DH, DF, NCS, window, num_sinks, scale, softcap,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sgb, sgh, sgt, syb, syh, syt,
    L: tl.constexpr, S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
):
    c = tl.program_id(0)  # query block
    pid = tl.program_id(1)  # batch * NH + head
    b = (pid // NH).to(tl.int64)
    h = pid % NH
    hk = (h // G).to(tl.int64)
    offs_t = tl.arange(0, L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    d_ok, f_ok = offs_d < DH, offs_f < DF
    t = c * L + offs_t
    t_ok = t < T
    td_ok = t_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + t[:, None] * sqt + offs_d[None, :], mask=td_ok, other=0.0)  # (L, BLOCK_D)

    # mLSTM: the state before the block's state chunk + the chunk's tokens up to the block, key tile (BLOCK_K) by key
    # tile with a running stabilizer (as an online softmax), decays relative to the chunk's start
    wdf_ok = d_ok[:, None] & f_ok[None, :]
    wq = tl.load(WQ + h * DH * DF + offs_d[:, None] * DF + offs_f[None, :], mask=wdf_ok, other=0.0)
    bq = tl.load(BQ + h * DF + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    phi_q = _feature_map(q, wq, bq, f_ok, PREC)  # (L, BLOCK_F)
    wk = tl.load(WK + h * DH * DF + offs_d[:, None] * DF + offs_f[None, :], mask=wdf_ok, other=0.0)
    bk = tl.load(BK + h * DF + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    fg = tl.load(GATES + b * sgb + (NH + h) * sgh + t * sgt, mask=t_ok, other=0.0).to(tl.float32)
    seg = tl.load(SEG + b * T + t, mask=t_ok, other=-1)  # (L,) document index (running count of resets)
    sc = c // S  # the state chunk
    first = sc * S * L  # its first token
    lf_before = tl.zeros([L], dtype=tl.float32)  # log forget gates from the chunk's start to the block's
    for s0 in range(first, c * L, L):
        lf_before += _logsigmoid(tl.load(GATES + b * sgb + (NH + h) * sgh + (s0 + offs_t) * sgt).to(tl.float32))
    b_q = tl.sum(lf_before, 0) + tl.cumsum(tl.where(t_ok, _logsigmoid(fg), 0.0), 0)  # (L,) log decay since `first`
    seg_prev = tl.load(SEG + b * T + first - 1, mask=sc > 0, other=0)  # the document the state belongs to
    chunk = pid.to(tl.int64) * NCS + sc
    m0 = tl.load(M_ALL + chunk)
    n0 = tl.load(N_ALL + chunk * DF + offs_f, mask=f_ok, other=0.0)
    C0 = tl.load(C_ALL + chunk * DF * DH + offs_f[:, None] * DH + offs_d[None, :], mask=f_ok[:, None] & d_ok[None, :],
                 other=0.0)  # (BLOCK_F, BLOCK_D)
    log_state = tl.where(seg == seg_prev, b_q + m0, float("-inf"))  # (L,)
    m_t = tl.maximum(log_state, NEG)  # running stabilizer; a token sees itself, so it ends finite and above NEG
    w_state = tl.exp(log_state - m_t)
    num = w_state[:, None] * _dot(phi_q, C0, PREC)  # (L, BLOCK_D)
    qn = w_state * tl.sum(phi_q * n0[None, :], 1)  # (L,)
    b_k0 = tl.zeros([], dtype=tl.float32)  # log decay from `first` to the key tile's start
    for s0 in range(first, c * L + L, BLOCK_K):
        pos = s0 + tl.arange(0, BLOCK_K)
        pos_ok = pos < T
        pd_ok = pos_ok[:, None] & d_ok[None, :]
        k_t = tl.load(K + b * skb + hk * skh + pos[:, None] * skt + offs_d[None, :], mask=pd_ok, other=0.0)
        phi_k = _feature_map(k_t, wk, bk, f_ok, PREC)  # (L, BLOCK_F)
        v_t = tl.load(V + b * svb + hk * svh + pos[:, None] * svt + offs_d[None, :], mask=pd_ok, other=0.0)
        i_k = tl.load(GATES + b * sgb + h * sgh + pos * sgt, mask=pos_ok, other=0.0).to(tl.float32)
        lf_k = tl.where(pos_ok, _logsigmoid(tl.load(GATES + b * sgb + (NH + h) * sgh + pos * sgt, mask=pos_ok,
                                                    other=0.0).to(tl.float32)), 0.0)
        seg_k = tl.load(SEG + b * T + pos, mask=pos_ok, other=-1)
        b_k = b_k0 + tl.cumsum(lf_k, 0)
        # causal, same document (padded tokens have document -1: they see only each other, no nan)
        keep = (pos[None, :] <= t[:, None]) & (seg[:, None] == seg_k[None, :])
        log_d = tl.where(keep, b_q[:, None] - b_k[None, :] + i_k[None, :], float("-inf"))  # (L, L)
        m_new = tl.maximum(m_t, tl.max(log_d, 1))
        alpha = tl.exp(m_t - m_new)
        s = _dot(phi_q, tl.trans(phi_k), PREC) * tl.exp(log_d - m_new[:, None])  # (L, L)
        num = num * alpha[:, None] + _dot(s, v_t.to(tl.float32), PREC)
        qn = qn * alpha + tl.sum(s, 1)
        m_t = m_new
        b_k0 += tl.sum(lf_k, 0)
    denom = tl.maximum(tl.abs(qn), tl.exp(tl.minimum(-m_t, NORM_MAX_NEG_M))) + NORM_EPS
    memory = num / denom[:, None]

    # window + sink softmax attention (online softmax over key tiles)
    ds = tl.load(DOC + b * T + t, mask=t_ok, other=0)  # (L,) first token of each row's document
    ds_first = tl.load(DOC + b * T + c * L)
    lo = tl.maximum(c * L - window + 1, ds_first)  # the first key any row of the block sees in its window
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(c * L + L, T)
    m_i = tl.full([L], NEG, tl.float32)
    l_i = tl.zeros([L], dtype=tl.float32)
    acc = tl.zeros([L, BLOCK_D], dtype=tl.float32)
    if HAS_SINKS:  # the first row's document's sinks that lie before the key tiles below
        offs_s = tl.arange(0, BLOCK_S)
        p_s = ds_first + offs_s
        ps_ok = (offs_s < num_sinks) & (p_s < lo)
        k_s = tl.load(K + b * skb + hk * skh + p_s[:, None] * skt + offs_d[None, :],
                      mask=ps_ok[:, None] & d_ok[None, :], other=0.0)
        v_s = tl.load(V + b * svb + hk * svh + p_s[:, None] * svt + offs_d[None, :],
                      mask=ps_ok[:, None] & d_ok[None, :], other=0.0)
        mask_s = ps_ok[None, :] & (p_s[None, :] >= ds[:, None])
        m_i, l_i, acc = _softmax_step(_scores(q, k_s, scale, softcap, HAS_SOFTCAP, PREC), mask_s, v_s, m_i, l_i, acc,
                                      PREC)
    for start in range(lo, hi, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        pd_ok = (p < T)[:, None] & d_ok[None, :]
        k_t = tl.load(K + b * skb + hk * skh + p[:, None] * skt + offs_d[None, :], mask=pd_ok, other=0.0)
        v_t = tl.load(V + b * svb + hk * svh + p[:, None] * svt + offs_d[None, :], mask=pd_ok, other=0.0)
        rel = p[None, :] - ds[:, None]  # the key's position in the row's document
        mask = (p[None, :] <= t[:, None]) & (rel >= 0) & ((t[:, None] - p[None, :] < window) | (rel < num_sinks))
        m_i, l_i, acc = _softmax_step(_scores(q, k_t, scale, softcap, HAS_SOFTCAP, PREC), mask, v_t, m_i, l_i, acc,
                                      PREC)
    attention = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]

    # output gate: o * memory + (1 - o) * attention
    og = tl.load(GATES + b * sgb + (2 * NH + h) * sgh + t * sgt, mask=t_ok, other=0.0).to(tl.float32)
    o = 1.0 / (1.0 + tl.exp(-og))
    y = attention + o[:, None] * (memory - attention)
    tl.store(Y + b * syb + h * syh + t[:, None] * syt + offs_d[None, :], y.to(Y.dtype.element_ty), mask=td_ok)


def _block(n: int) -> int:
    """A tile dimension: the next power of two, at least 16 (tl.dot's smallest)."""
    return max(16, 1 << (n - 1).bit_length())


def chunk_length(chunk_size: int) -> int:
    """The kernels' chunk (= query block): the model's chunk size as a power of two in [16, 64] (the mLSTM's
    function does not depend on it; it sets the tile sizes and how many chunk states are written)."""
    return min(64, _block(chunk_size))


def mixer_forward(
    q: torch.Tensor,  # (B, NH, T, DH) after RoPE
    k: torch.Tensor,  # (B, NKV, T, DH) after RoPE
    v: torch.Tensor,  # (B, NKV, T, DH)
    gates: torch.Tensor,  # (B, 3 NH, T) input, forget, output gate pre-activations
    wq: torch.Tensor,  # (NH, DH, DF)
    bq: torch.Tensor,  # (NH, DF)
    wk: torch.Tensor,  # (NH, DH, DF)
    bk: torch.Tensor,  # (NH, DF)
    doc_start: torch.Tensor,  # (B, T) first token of each token's document
    reset: torch.Tensor | None,  # (B, T) bool, True at each document's first token (None: one document)
    state: MLSTMState | None,  # float32 state to continue from
    window: int,
    num_sinks: int,
    scale: float,
    softcap: float | None,
    chunk_size: int,
) -> tuple[torch.Tensor, MLSTMState]:
    """Launches the two kernels. Returns y (B, NH, T, DH) in v's dtype, laid out as (B, T, NH, DH) (the output
    projection reads it without a copy), and the final state (float32)."""
    B, NH, T, DH = q.shape
    NKV, DF = k.shape[1], wq.shape[-1]
    dtype = v.dtype
    q, k = q.to(dtype), k.to(dtype)  # one dtype for the dots (under autocast q leaves RoPE in float32)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    wq, wk = (x.to(dtype).contiguous() for x in (wq, wk))  # the feature maps' dots run in the inputs' dtype
    bq, bk = (x.float().contiguous() for x in (bq, bk))
    seg = (torch.zeros(B, T, dtype=torch.int32, device=q.device) if reset is None
           else torch.cumsum(reset.to(torch.int32), 1, dtype=torch.int32))
    doc = doc_start.to(torch.int32).contiguous()
    L = chunk_length(chunk_size)
    NC = -(-T // L)  # query blocks
    NCS = -(-NC // STATE_EVERY)  # state chunks
    BLOCK_D, BLOCK_F = _block(DH), _block(DF)
    BLOCK_V = min(BLOCK_D, 32)  # value columns per program of the state pass: (B * NH * DH / 32) programs
    # float32 inputs: float32 dots throughout; 16-bit inputs: their dtype's dots, TF32 for the computed float32 values
    prec = "ieee" if dtype == torch.float32 else "tf32"
    # float32 tiles are twice the size: one stage keeps the mixer kernel in an H200's 227 KB of shared memory (197 KB
    # at DH = DF = 128; compiled for sm_90 without a GPU: three stages would take 298 KB)
    stages = 1 if dtype == torch.float32 else 3
    f32 = dict(device=q.device, dtype=torch.float32)
    C_all, n_all, m_all = (torch.empty(B, NH, NCS, DF, DH, **f32), torch.empty(B, NH, NCS, DF, **f32),
                           torch.empty(B, NH, NCS, **f32))
    C, n, m = torch.empty(B, NH, DF, DH, **f32), torch.empty(B, NH, DF, **f32), torch.empty(B, NH, **f32)
    if state is not None:
        C0, n0, m0 = (x.float().contiguous() for x in state)
    else:
        C0, n0, m0 = C, n, m  # not read
    _chunk_states_kernel[(B * NH, triton.cdiv(DH, BLOCK_V))](
        k, v, gates, wk, bk, seg, C0, n0, m0, C_all, n_all, m_all, C, n, m,
        T, NH, NH // NKV, DH, DF, NC, NCS,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        gates.stride(0), gates.stride(1), gates.stride(2),
        HAS_STATE=state is not None, L=L, S=STATE_EVERY, BLOCK_D=BLOCK_D, BLOCK_F=BLOCK_F, BLOCK_V=BLOCK_V, PREC=prec,
        num_warps=8 if BLOCK_D * BLOCK_F >= 128 * 64 else 4, num_stages=stages,
    )
    y = torch.empty(B, T, NH, DH, device=q.device, dtype=dtype).transpose(1, 2)
    _mixer_kernel[(NC, B * NH)](
        q, k, v, gates, wq, bq, wk, bk, seg, doc, C_all, n_all, m_all, y,
        T, NH, NH // NKV, DH, DF, NCS, window, num_sinks, scale, 0.0 if softcap is None else softcap,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), gates.stride(0), gates.stride(1), gates.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        L=L, S=STATE_EVERY, BLOCK_K=min(L, MLSTM_KEY_TILE), BLOCK_N=BLOCK_N, BLOCK_S=_block(max(num_sinks, 1)),
        BLOCK_D=BLOCK_D, BLOCK_F=BLOCK_F,
        HAS_SINKS=num_sinks > 0, HAS_SOFTCAP=softcap is not None, PREC=prec,
        num_warps=8 if BLOCK_D >= 128 else 4, num_stages=stages,
    )
    return y, MLSTMState(C, n, m)
