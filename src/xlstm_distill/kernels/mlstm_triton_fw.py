"""Forward Triton kernels of the chunkwise mLSTM (``kernels/mlstm_triton.py`` has the math and calls them).

Imported only when the ``triton`` mLSTM first runs (Triton's interpreter is chosen by ``TRITON_INTERPRET`` at import).
Per (batch, head), chunks of L tokens; b is the cumulative log forget gate inside a chunk, B_c its last value.

1. :func:`chunk_states_kernel`, sequential over chunks: the stabilized state (C, n, m) before every chunk and after
   the last, and the source of each m (the token whose input gate it is, -1: the initial state).
2. :func:`chunk_output_kernel`, parallel over chunks: each token's output from its chunk (quadratic part) and the
   state before the chunk, and what the backward reads: each token's stabilizer m, q.n (signed) and the source of m.

Documents: ``seg`` (B, S) int32 is each token's document index; a token reads only its own document's tokens and
the state if the state belongs to its document (document of the state = document of the token before the chunk, 0
before the first token); a chunk's tokens write into the state only for the chunk's last document.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chunk_keys(k_ptr, v_ptr, i_ptr, lf_ptr, seg_ptr, pid_bh, batch, c, S, rk, rv,
                DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr):
    """What chunk c writes into the state: k (L, BK), v (L, BV), i, lf, document index (L,), the chunk's last
    document (tokens past S masked)."""
    t = c * L + tl.arange(0, L)
    valid = t < S
    row = pid_bh * S + t
    kk = tl.load(k_ptr + row[:, None] * DK + rk[None, :], mask=valid[:, None] & (rk < DK)[None, :], other=0.0)
    vv = tl.load(v_ptr + row[:, None] * DV + rv[None, :], mask=valid[:, None] & (rv < DV)[None, :], other=0.0)
    ig = tl.load(i_ptr + row, mask=valid, other=0.0).to(ACC)
    lf = tl.load(lf_ptr + row, mask=valid, other=0.0).to(ACC)
    sg = tl.load(seg_ptr + batch * S + t, mask=valid, other=-1)
    seg_last = tl.load(seg_ptr + batch * S + tl.minimum(c * L + L, S) - 1)
    return kk.to(DOT), vv.to(DOT), ig, lf, sg, seg_last


@triton.jit
def chunk_states_kernel(
    k_ptr,  # (B, NH, S, DK)
    v_ptr,  # (B, NH, S, DV)
    i_ptr,  # (B, NH, S) input gates (log space)
    lf_ptr,  # (B, NH, S) log forget gates
    seg_ptr,  # (B, S) int32 document index
    C0_ptr,  # (B, NH, DK, DV) initial state
    n0_ptr,  # (B, NH, DK)
    m0_ptr,  # (B, NH)
    C_states_ptr,  # (B, NH, NC, DK, DV) out, the inputs' dtype: the state before each chunk
    C_last_ptr,  # (B, NH, DK, DV) out, ACC: the state after the last chunk
    n_states_ptr,  # (B, NH, NC + 1, DK) out
    m_states_ptr,  # (B, NH, NC + 1) out
    src_states_ptr,  # (B, NH, NC + 1) int32 out: token whose input gate is m (-1: the initial state's m)
    NH, S, NC,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Grid (B * NH, cdiv(DK, BK), cdiv(DV, BV)): one block of C per program, the chunks in order."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_k, pid_v = tl.program_id(1), tl.program_id(2)
    batch = pid_bh // NH
    rk = pid_k * BK + tl.arange(0, BK)
    rv = pid_v * BV + tl.arange(0, BV)
    rl = tl.arange(0, L)
    mk, mv = rk < DK, rv < DV
    mkv = mk[:, None] & mv[None, :]
    C = tl.load(C0_ptr + pid_bh * DK * DV + rk[:, None] * DV + rv[None, :], mask=mkv, other=0.0).to(ACC)
    n = tl.load(n0_ptr + pid_bh * DK + rk, mask=mk, other=0.0).to(ACC)
    m = tl.load(m0_ptr + pid_bh).to(ACC)
    src = tl.program_id(0) * 0 - 1  # int32 scalar
    seg_state = tl.program_id(0) * 0  # the initial state belongs to document 0
    c = tl.program_id(0) * 0
    kk, vv, ig, lf, sg, seg_last = _chunk_keys(k_ptr, v_ptr, i_ptr, lf_ptr, seg_ptr, pid_bh, batch, c, S, rk, rv,
                                               DK, DV, L, ACC, DOT)
    while c < NC:  # a while loop: Triton's interpreter cannot run `for` over a runtime bound (numpy 2)
        # the next chunk's loads are issued first and awaited only in the next iteration (by hand: a while loop is
        # not pipelined); past the last chunk they are all masked
        nxt = _chunk_keys(k_ptr, v_ptr, i_ptr, lf_ptr, seg_ptr, pid_bh, batch, c + 1, S, rk, rv, DK, DV, L, ACC, DOT)
        at = pid_bh * (NC + 1) + c
        tl.store(C_states_ptr + (pid_bh * NC + c) * DK * DV + rk[:, None] * DV + rv[None, :],
                 C.to(C_states_ptr.dtype.element_ty), mask=mkv)
        if pid_v == 0:
            tl.store(n_states_ptr + at * DK + rk, n, mask=mk)
        if (pid_k == 0) & (pid_v == 0):
            tl.store(m_states_ptr + at, m)
            tl.store(src_states_ptr + at, src)
        valid = c * L + rl < S
        b = tl.cumsum(lf, 0)
        b_last = tl.sum(lf, 0)
        log_w = tl.where(valid & (sg == seg_last), b_last - b + ig, float("-inf"))  # (L,)
        m_loc = tl.max(log_w, 0)
        arg = tl.argmax(log_w, 0) + c * L
        log_carry = tl.where(seg_last == seg_state, b_last + m, float("-inf"))
        m_new = tl.maximum(log_carry, m_loc)
        src = tl.where(log_carry >= m_loc, src, arg)
        a_carry = tl.exp(log_carry - m_new)
        kw = kk.to(ACC) * tl.exp(log_w - m_new)[:, None]  # (L, BK)
        C = a_carry * C + tl.dot(tl.trans(kw.to(DOT)), vv).to(ACC)
        n = a_carry * n + tl.sum(kw, 0)
        m = m_new
        seg_state = seg_last
        kk, vv, ig, lf, sg, seg_last = nxt
        c += 1
    at = pid_bh * (NC + 1) + NC
    tl.store(C_last_ptr + pid_bh * DK * DV + rk[:, None] * DV + rv[None, :], C, mask=mkv)
    if pid_v == 0:
        tl.store(n_states_ptr + at * DK + rk, n, mask=mk)
    if (pid_k == 0) & (pid_v == 0):
        tl.store(m_states_ptr + at, m)
        tl.store(src_states_ptr + at, src)


@triton.jit
def chunk_output_kernel(
    q_ptr,  # (B, NH, S, DK)
    k_ptr,  # (B, NH, S, DK)
    v_ptr,  # (B, NH, S, DV)
    i_ptr,  # (B, NH, S)
    lf_ptr,  # (B, NH, S)
    seg_ptr,  # (B, S) int32
    C_states_ptr,  # (B, NH, NC, DK, DV)
    n_states_ptr,  # (B, NH, NC + 1, DK)
    m_states_ptr,  # (B, NH, NC + 1)
    src_states_ptr,  # (B, NH, NC + 1) int32
    h_ptr,  # (B, NH, S, DV) out
    m_ptr,  # (B, NH, S) out: each token's stabilizer
    qn_ptr,  # (B, NH, S) out: q.n (stabilized, signed)
    src_ptr,  # (B, NH, S) int32 out: the token whose input gate is m (-1: the initial state)
    NH, S, NC,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BDK: tl.constexpr, BV: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
    EPS: tl.constexpr, MAX_NEG_M: tl.constexpr,
):
    """Grid (B * NH, NC, cdiv(DV, BV)): the outputs of one chunk, one block of value columns."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_c, pid_v = tl.program_id(1), tl.program_id(2)
    batch = pid_bh // NH
    rl = tl.arange(0, L)
    rd = tl.arange(0, BDK)
    rv = pid_v * BV + tl.arange(0, BV)
    md, mv = rd < DK, rv < DV
    t = pid_c * L + rl
    valid = t < S
    row = pid_bh * S + t
    q = tl.load(q_ptr + row[:, None] * DK + rd[None, :], mask=valid[:, None] & md[None, :], other=0.0).to(DOT)
    k = tl.load(k_ptr + row[:, None] * DK + rd[None, :], mask=valid[:, None] & md[None, :], other=0.0).to(DOT)
    v = tl.load(v_ptr + row[:, None] * DV + rv[None, :], mask=valid[:, None] & mv[None, :], other=0.0).to(DOT)
    ig = tl.load(i_ptr + row, mask=valid, other=0.0).to(ACC)
    lf = tl.load(lf_ptr + row, mask=valid, other=0.0).to(ACC)
    sg = tl.load(seg_ptr + batch * S + t, mask=valid, other=-1)
    seg_state = tl.load(seg_ptr + batch * S + tl.maximum(pid_c * L - 1, 0))
    seg_state = tl.where(pid_c > 0, seg_state, 0)
    at = pid_bh * (NC + 1) + pid_c
    C = tl.load(C_states_ptr + (pid_bh * NC + pid_c) * DK * DV + rd[:, None] * DV + rv[None, :],
                mask=md[:, None] & mv[None, :], other=0.0)
    n = tl.load(n_states_ptr + at * DK + rd, mask=md, other=0.0)
    m_c = tl.load(m_states_ptr + at)
    src_c = tl.load(src_states_ptr + at)

    b = tl.cumsum(lf, 0)
    ok = (rl[:, None] >= rl[None, :]) & (sg[:, None] == sg[None, :]) & valid[None, :]
    log_d = tl.where(ok, b[:, None] - b[None, :] + ig[None, :], float("-inf"))  # (L, L)
    log_state = tl.where(valid & (sg == seg_state), b + m_c, float("-inf"))  # (L,)
    row_max = tl.max(log_d, 1)
    row_arg = tl.argmax(log_d, 1) + pid_c * L
    m = tl.where(valid, tl.maximum(row_max, log_state), 0.0)  # rows past S: 0, not -inf (no nan)
    src = tl.where(log_state >= row_max, src_c, row_arg)
    w = tl.exp(log_d - m[:, None])  # (L, L)
    w_state = tl.exp(log_state - m)  # (L,)
    sw = tl.dot(q, tl.trans(k)).to(ACC) * w  # (L, L)
    num = tl.dot(sw.to(DOT), v).to(ACC) + w_state[:, None] * tl.dot(q, C.to(DOT)).to(ACC)
    qn = tl.sum(sw, 1) + w_state * tl.sum(q.to(ACC) * n[None, :].to(ACC), 1)
    den = tl.maximum(tl.abs(qn), tl.exp(tl.minimum(-m, MAX_NEG_M))) + EPS
    h = num / den[:, None]
    tl.store(h_ptr + row[:, None] * DV + rv[None, :], h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & mv[None, :])
    if pid_v == 0:
        tl.store(m_ptr + row, m, mask=valid)
        tl.store(qn_ptr + row, qn, mask=valid)
        tl.store(src_ptr + row, src, mask=valid)
