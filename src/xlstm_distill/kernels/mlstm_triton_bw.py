"""Backward Triton kernels of the chunkwise mLSTM (``kernels/mlstm_triton.py`` has the derivation and calls them).

Imported only when the ``triton`` mLSTM first runs a backward.

0. :func:`token_grads_kernel`, per token from dh, h and the forward's m and q.n: den = max(|q.n|, exp(-m)) + eps,
   gamma and mu, the gradients of the (stabilized) q.n and of m (``mlstm_triton``'s docstring). delta = dh / den,
   the gradient of the (stabilized) numerator q C, is formed where it is used.
1. :func:`chunk_state_grads_kernel`, sequential over chunks from the last: G_c, g_c, the gradients of the
   (stabilized) state C, n before every chunk (and after the last: the final state's gradient).
2. :func:`chunk_grads_kernel`, parallel over chunks: dq, dk, dv of a chunk's tokens from its quadratic part, the
   state before it (dq) and the gradient of the state after it (dk, dv), and each token's q.dq and k.dk (for the
   gates' gradients). dq, dk and those sums are written per block of value columns (summed by the caller).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def token_grads_kernel(
    dh_ptr,  # (B * NH * S, DV)
    h_ptr,  # (B * NH * S, DV) the forward's output
    m_ptr,  # (B * NH * S) each token's stabilizer
    qn_ptr,  # (B * NH * S) q.n (stabilized, signed)
    den_ptr,  # (B * NH * S) out, ACC
    gam_ptr,  # (B * NH * S) out, ACC
    mu_ptr,  # (B * NH * S) out, ACC
    T,
    DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
    MAX_NEG_M: tl.constexpr,
):
    """Grid (cdiv(T, BT),): den, gamma = -(dh.h) / den sign(q.n) on the |q.n| branch (else 0), and
    mu = -(dh.h) eps / den (-(dh.h) where the clamped exp(-m) is the normalizer)."""
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    valid = rows < T
    cols = tl.arange(0, BDV)
    mask = valid[:, None] & (cols < DV)[None, :]
    dh = tl.load(dh_ptr + rows[:, None] * DV + cols[None, :], mask=mask, other=0.0).to(ACC)
    h = tl.load(h_ptr + rows[:, None] * DV + cols[None, :], mask=mask, other=0.0).to(ACC)
    gh = tl.sum(dh * h, 1)  # (BT,)
    m = tl.load(m_ptr + rows, mask=valid, other=0.0).to(ACC)
    qn = tl.load(qn_ptr + rows, mask=valid, other=0.0).to(ACC)
    floor = tl.exp(tl.minimum(-m, MAX_NEG_M))
    on_qn = tl.abs(qn) > floor
    den = tl.maximum(tl.abs(qn), floor) + EPS
    sign = tl.where(qn > 0, 1.0, tl.where(qn < 0, -1.0, 0.0))
    gam = tl.where(on_qn, -gh / den * sign, 0.0)
    mu = -gh * tl.where(on_qn, EPS / den, tl.where(-m > MAX_NEG_M, 1.0, EPS / den))
    tl.store(den_ptr + rows, den, mask=valid)
    tl.store(gam_ptr + rows, gam, mask=valid)
    tl.store(mu_ptr + rows, mu, mask=valid)


@triton.jit
def _chunk_queries(q_ptr, dh_ptr, den_ptr, gam_ptr, lf_ptr, seg_ptr, m_ptr, m_states_ptr, pid_bh, batch, c, S, NC,
                   rk, rv, DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, ACC: tl.constexpr,
                   DOT: tl.constexpr):
    """What chunk c reads from the state before it: q (L, BK), dh (L, BV), den, gamma, lf, m, document index (L,),
    the state's and the chunk's last document, the state's m (all masked for c < 0, tokens past S masked)."""
    t = c * L + tl.arange(0, L)
    valid = (t >= 0) & (t < S)
    row = pid_bh * S + t
    q = tl.load(q_ptr + row[:, None] * DK + rk[None, :], mask=valid[:, None] & (rk < DK)[None, :], other=0.0)
    dh = tl.load(dh_ptr + row[:, None] * DV + rv[None, :], mask=valid[:, None] & (rv < DV)[None, :], other=0.0)
    den = tl.load(den_ptr + row, mask=valid, other=1.0).to(ACC)
    gam = tl.load(gam_ptr + row, mask=valid, other=0.0).to(ACC)
    lf = tl.load(lf_ptr + row, mask=valid, other=0.0).to(ACC)
    m = tl.load(m_ptr + row, mask=valid, other=0.0).to(ACC)
    sg = tl.load(seg_ptr + batch * S + t, mask=valid, other=-1)
    seg_state = tl.load(seg_ptr + batch * S + tl.maximum(c * L - 1, 0))
    seg_state = tl.where(c > 0, seg_state, 0)
    seg_last = tl.load(seg_ptr + batch * S + tl.maximum(tl.minimum(c * L + L, S) - 1, 0))
    m_c = tl.load(m_states_ptr + pid_bh * (NC + 1) + tl.maximum(c, 0)).to(ACC)
    return q.to(DOT), dh, den, gam, lf, m, sg, seg_state, seg_last, m_c


@triton.jit
def chunk_state_grads_kernel(
    q_ptr,  # (B, NH, S, DK)
    dh_ptr,  # (B, NH, S, DV)
    den_ptr,  # (B, NH, S) max(|q.n|, exp(-m)) + eps
    gam_ptr,  # (B, NH, S) gradient of q.n
    lf_ptr,  # (B, NH, S)
    seg_ptr,  # (B, S) int32
    m_ptr,  # (B, NH, S) each token's stabilizer
    m_states_ptr,  # (B, NH, NC + 1)
    dC_last_ptr,  # (B, NH, DK, DV) gradient of the final C
    dn_last_ptr,  # (B, NH, DK)
    G_ptr,  # (B, NH, NC, DK, DV) out, the inputs' dtype: gradient of C after each chunk
    dC0_ptr,  # (B, NH, DK, DV) out, ACC: gradient of C before the first chunk (the initial state)
    g_ptr,  # (B, NH, NC + 1, DK) out
    NH, S, NC,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Grid (B * NH, cdiv(DK, BK), cdiv(DV, BV)): G_c = direct_c + [carry] exp(m_c + B_c - m_{c+1}) G_{c+1}, with
    direct_c = sum_t exp(b_t + m_c - m_t) q_t delta_t^T over the chunk's tokens of the state's document."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_k, pid_v = tl.program_id(1), tl.program_id(2)
    batch = pid_bh // NH
    rk = pid_k * BK + tl.arange(0, BK)
    rv = pid_v * BV + tl.arange(0, BV)
    rl = tl.arange(0, L)
    mk, mv = rk < DK, rv < DV
    mkv = mk[:, None] & mv[None, :]
    G = tl.load(dC_last_ptr + pid_bh * DK * DV + rk[:, None] * DV + rv[None, :], mask=mkv, other=0.0).to(ACC)
    g = tl.load(dn_last_ptr + pid_bh * DK + rk, mask=mk, other=0.0).to(ACC)
    m_next = tl.load(m_states_ptr + pid_bh * (NC + 1) + NC).to(ACC)
    c = NC - 1
    q, dh, den, gam, lf, m, sg, seg_state, seg_last, m_c = _chunk_queries(
        q_ptr, dh_ptr, den_ptr, gam_ptr, lf_ptr, seg_ptr, m_ptr, m_states_ptr, pid_bh, batch, c, S, NC, rk, rv,
        DK, DV, L, ACC, DOT)
    while c >= 0:  # a while loop: Triton's interpreter cannot run `for` over a runtime bound (numpy 2)
        # the previous chunk's loads are issued first and awaited only in the next iteration (by hand: a while loop
        # is not pipelined); before the first chunk they are all masked
        nxt = _chunk_queries(q_ptr, dh_ptr, den_ptr, gam_ptr, lf_ptr, seg_ptr, m_ptr, m_states_ptr, pid_bh, batch,
                             c - 1, S, NC, rk, rv, DK, DV, L, ACC, DOT)
        at = pid_bh * (NC + 1) + c + 1
        tl.store(G_ptr + (pid_bh * NC + c) * DK * DV + rk[:, None] * DV + rv[None, :], G.to(G_ptr.dtype.element_ty),
                 mask=mkv)
        if pid_v == 0:
            tl.store(g_ptr + at * DK + rk, g, mask=mk)
        valid = c * L + rl < S
        b = tl.cumsum(lf, 0)
        b_last = tl.sum(lf, 0)
        w_state = tl.exp(tl.where(valid & (sg == seg_state), b + m_c - m, float("-inf")))  # (L,)
        factor = tl.exp(tl.where(seg_last == seg_state, m_c + b_last - m_next, float("-inf")))
        qw = q.to(ACC) * w_state[:, None]  # (L, BK)
        delta = dh.to(ACC) / den[:, None]  # (L, BV)
        G = factor * G + tl.dot(tl.trans(qw.to(DOT)), delta.to(DOT)).to(ACC)
        g = factor * g + tl.sum(qw * gam[:, None], 0)
        m_next = m_c
        q, dh, den, gam, lf, m, sg, seg_state, seg_last, m_c = nxt
        c -= 1
    at = pid_bh * (NC + 1)
    tl.store(dC0_ptr + pid_bh * DK * DV + rk[:, None] * DV + rv[None, :], G, mask=mkv)
    if pid_v == 0:
        tl.store(g_ptr + at * DK + rk, g, mask=mk)


@triton.jit
def chunk_grads_kernel(
    q_ptr,  # (B, NH, S, DK)
    k_ptr,  # (B, NH, S, DK)
    v_ptr,  # (B, NH, S, DV)
    dh_ptr,  # (B, NH, S, DV)
    den_ptr,  # (B, NH, S)
    gam_ptr,  # (B, NH, S)
    i_ptr,  # (B, NH, S)
    lf_ptr,  # (B, NH, S)
    seg_ptr,  # (B, S) int32
    m_ptr,  # (B, NH, S)
    C_states_ptr,  # (B, NH, NC, DK, DV) forward states before each chunk
    n_states_ptr,  # (B, NH, NC + 1, DK)
    m_states_ptr,  # (B, NH, NC + 1)
    G_ptr,  # (B, NH, NC, DK, DV) gradients of the states after each chunk
    g_ptr,  # (B, NH, NC + 1, DK)
    dq_ptr,  # (NV, B, NH, S, DK) out, ACC: one part per block of value columns
    dk_ptr,  # (NV, B, NH, S, DK) out, ACC
    dv_ptr,  # (B, NH, S, DV) out, ACC
    qdq_ptr,  # (NV, B, NH, S) out, ACC: q.dq of each block's part
    kdk_ptr,  # (NV, B, NH, S) out, ACC: k.dk
    NH, S, NC, BH,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BDK: tl.constexpr, BV: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Grid (B * NH, NC, cdiv(DV, BV)). With W_ts = exp(b_t - b_s + i_s - m_t) (same document, s <= t) and the
    scores S_ts = q_t.k_s: dA = W * (delta v^T + gamma 1^T), dq = dA k + w_state (delta C^T + gamma n^T),
    dk = dA^T q + w_key (v G^T + 1 g^T), dv = (W * S)^T delta + w_key k G, where w_state_t = exp(b_t + m_c - m_t)
    and w_key_s = exp(B_c - b_s + i_s - m_{c+1}) for the chunk's last document. gamma and g enter in the first block
    of value columns only."""
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
    mtd = valid[:, None] & md[None, :]
    mtv = valid[:, None] & mv[None, :]
    q = tl.load(q_ptr + row[:, None] * DK + rd[None, :], mask=mtd, other=0.0).to(DOT)
    k = tl.load(k_ptr + row[:, None] * DK + rd[None, :], mask=mtd, other=0.0).to(DOT)
    v = tl.load(v_ptr + row[:, None] * DV + rv[None, :], mask=mtv, other=0.0).to(DOT)
    dh = tl.load(dh_ptr + row[:, None] * DV + rv[None, :], mask=mtv, other=0.0)
    den = tl.load(den_ptr + row, mask=valid, other=1.0).to(ACC)
    first = pid_v == 0
    gam = tl.where(first, tl.load(gam_ptr + row, mask=valid, other=0.0).to(ACC), 0.0)
    ig = tl.load(i_ptr + row, mask=valid, other=0.0).to(ACC)
    lf = tl.load(lf_ptr + row, mask=valid, other=0.0).to(ACC)
    m = tl.load(m_ptr + row, mask=valid, other=0.0).to(ACC)
    sg = tl.load(seg_ptr + batch * S + t, mask=valid, other=-1)
    seg_state = tl.load(seg_ptr + batch * S + tl.maximum(pid_c * L - 1, 0))
    seg_state = tl.where(pid_c > 0, seg_state, 0)
    seg_last = tl.load(seg_ptr + batch * S + tl.minimum(pid_c * L + L, S) - 1)
    at = pid_bh * (NC + 1) + pid_c
    mdv = md[:, None] & mv[None, :]
    m_c = tl.load(m_states_ptr + at).to(ACC)
    m_next = tl.load(m_states_ptr + at + 1).to(ACC)

    b = tl.cumsum(lf, 0)
    b_last = tl.sum(lf, 0)
    ok = (rl[:, None] >= rl[None, :]) & (sg[:, None] == sg[None, :]) & valid[None, :]
    w = tl.exp(tl.where(ok, b[:, None] - b[None, :] + ig[None, :] - m[:, None], float("-inf")))  # (L, L)
    w_state = tl.exp(tl.where(valid & (sg == seg_state), b + m_c - m, float("-inf")))  # (L,)
    w_key = tl.exp(tl.where(valid & (sg == seg_last), b_last - b + ig - m_next, float("-inf")))  # (L,)
    delta = (dh.to(ACC) / den[:, None]).to(DOT)  # (L, BV)
    dA = (tl.dot(delta, tl.trans(v)).to(ACC) + gam[:, None]) * w  # (L, L)
    part = pid_v.to(tl.int64) * BH * S * DK
    # each result is stored as soon as it is complete and its operands loaded just before: fewer live registers
    C = tl.load(C_states_ptr + (pid_bh * NC + pid_c) * DK * DV + rd[:, None] * DV + rv[None, :], mask=mdv, other=0.0)
    n = tl.load(n_states_ptr + at * DK + rd, mask=md, other=0.0).to(ACC)
    dq = tl.dot(dA.to(DOT), k).to(ACC)
    dq += w_state[:, None] * (tl.dot(delta, tl.trans(C.to(DOT))).to(ACC) + gam[:, None] * n[None, :])
    tl.store(dq_ptr + part + row[:, None] * DK + rd[None, :], dq, mask=mtd)
    tl.store(qdq_ptr + pid_v.to(tl.int64) * BH * S + row, tl.sum(q.to(ACC) * dq, 1), mask=valid)
    G = tl.load(G_ptr + (pid_bh * NC + pid_c) * DK * DV + rd[:, None] * DV + rv[None, :], mask=mdv, other=0.0).to(DOT)
    g = tl.where(first, tl.load(g_ptr + (at + 1) * DK + rd, mask=md, other=0.0).to(ACC), 0.0)
    dk = tl.dot(tl.trans(dA.to(DOT)), q).to(ACC)
    dk += w_key[:, None] * (tl.dot(v, tl.trans(G)).to(ACC) + g[None, :])
    tl.store(dk_ptr + part + row[:, None] * DK + rd[None, :], dk, mask=mtd)
    tl.store(kdk_ptr + pid_v.to(tl.int64) * BH * S + row, tl.sum(k.to(ACC) * dk, 1), mask=valid)
    sw = tl.dot(q, tl.trans(k)).to(ACC) * w  # (L, L)
    dv = tl.dot(tl.trans(sw.to(DOT)), delta).to(ACC) + w_key[:, None] * tl.dot(k, G).to(ACC)
    tl.store(dv_ptr + row[:, None] * DV + rv[None, :], dv, mask=mtv)
