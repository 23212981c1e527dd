"""The Triton kernel of one hybrid-mixer decode step (``mixer_step_triton.py`` launches it).

Imported only when the kernel is first launched: Triton reads ``TRITON_INTERPRET`` when a kernel is defined, and the
tests set it (no GPU: the same kernel runs in Triton's interpreter on CPU tensors).

One program per (batch row, query head). It reads its head's feature-map weights, mLSTM state and its KV group's
cached keys and values once, and writes the head's output and new state once:

1. feature maps: fq = softmax(q W_q + b_q), fk = softmax(k W_k + b_k)  (DH x DF mat-vecs, DH in slices)
2. gates: m' = max(lf + m, i), f' = exp(lf + m - m'), i' = exp(i - m')  (lf = logsigmoid(f); no gates: i = lf = 0)
3. state: n' = f' n + i' fk, C' = f' C + i' fk v^T; readout h = fq^T C' / (max(|fq.n'|, exp(-m')) + eps)
   (no gates: / (fq.n' + eps)), as ``mlstm_native.mlstm_recurrent_step`` defines it
4. attention a of the raw q over the new key, the sinks and the ring buffer (blocks of BLOCK_N slots; the loop
   unrolled if UNROLL_RING) with an online softmax: the key at position p is visible to the query at position P where
   0 <= p <= P and (p < sinks or P - p < window); scores scale * q.k, soft-capped if SOFTCAP
5. y = a + sigmoid(o) (h - a)  (torch.lerp(a, h, sigmoid(o)))

Everything is computed in float32; y is stored in the output's dtype. No tl.dot (one token: mat-vecs as broadcast
products and sums), so no tile-size minimum; every block size is a power of two, dims that are not are masked.
"""

import triton
import triton.language as tl

MAX_NEG_M = tl.constexpr(80.0)  # mlstm_native.MAX_NEG_M: exp(-m) clamped at exp(80)


@triton.jit
def _tanh(x):
    # tanh from exp (Triton's core language has none): 1 - 2 / (exp(2x) + 1) is +-1 at the extremes, no nan
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _attend_block(q, m_i, l_i, acc, k_ptrs, v_ptrs, kp_ptrs, slot_ok, mask_d, query_pos, scale, softcap, window,
                  num_sinks, SOFTCAP: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) with one block of cached slots."""
    kp = tl.load(kp_ptrs, mask=slot_ok, other=-1)  # (BLOCK_N,) int64
    visible = slot_ok & (kp >= 0) & (kp <= query_pos) & ((kp < num_sinks) | (query_pos - kp < window))
    tile = slot_ok[:, None] & mask_d[None, :]
    keys = tl.load(k_ptrs, mask=tile, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_DH)
    s = tl.sum(keys * q[None, :], axis=1) * scale  # (BLOCK_N,)
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: m_i starts at the new key's score
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new)  # 0 where not visible
    values = tl.load(v_ptrs, mask=tile, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_DH)
    acc = acc * alpha + tl.sum(p[:, None] * values, axis=0)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    return m_new, l_i, acc


@triton.jit
def mixer_step_kernel(
    q_ptr,  # (B, NH, DH) after RoPE
    k_ptr,  # (B, NKV, DH) the new token's keys, after RoPE
    v_ptr,  # (B, NKV, DH)
    gates_ptr,  # (B, G * NH) pre-activations: [input, forget,] output
    wq_ptr, bq_ptr,  # (NH, DH, DF), (NH, DF) the q feature map
    wk_ptr, bk_ptr,  # (NH, DH, DF), (NH, DF) the k feature map
    C_ptr, n_ptr, m_ptr,  # (B, NH, DF, DH), (B, NH, DF), (B, NH) float32 state before the step
    sink_k_ptr, sink_v_ptr,  # (B, NKV, S, DH) cached sink keys / values
    ring_k_ptr, ring_v_ptr,  # (B, NKV, W, DH) cached ring-buffer keys / values
    key_pos_ptr,  # (B, S + W) int64 positions of the sink then ring slots, -1 = empty
    pos_ptr,  # (B,) int64 the new token's position
    y_ptr,  # (B, NH, DH) output
    C_out_ptr, n_out_ptr, m_out_ptr,  # (B, NH, DF, DH), (B, NH, DF), (B, NH) float32 state after the step
    scale, softcap, eps, window, num_sinks,
    NH: tl.constexpr, NKV: tl.constexpr, DH: tl.constexpr, DF: tl.constexpr, S: tl.constexpr, W: tl.constexpr,
    GATED: tl.constexpr, G: tl.constexpr, SOFTCAP: tl.constexpr,  # G: gate rows per head (3 gated, 1 ungated)
    BLOCK_DH: tl.constexpr, BLOCK_DF: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, UNROLL_RING: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // NH).to(tl.int64)
    h = (pid % NH).to(tl.int64)
    kv = h // (NH // NKV)
    offs_d = tl.arange(0, BLOCK_DH)
    mask_d = offs_d < DH
    offs_f = tl.arange(0, BLOCK_DF)
    mask_f = offs_f < DF
    q_row = q_ptr + (b * NH + h) * DH
    k_row = k_ptr + (b * NKV + kv) * DH
    v_row = v_ptr + (b * NKV + kv) * DH

    # 1. feature maps, the DH x DF weights in slices of BLOCK_K rows (fewer registers than the whole matrix)
    zq = tl.load(bq_ptr + h * DF + offs_f, mask=mask_f, other=0.0).to(tl.float32)  # (BLOCK_DF,)
    zk = tl.load(bk_ptr + h * DF + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    for d0 in tl.static_range(0, DH, BLOCK_K):  # DH / BLOCK_K slices (4 at 128): unrolled, their loads independent
        offs_k = d0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < DH
        q_part = tl.load(q_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # (BLOCK_K,)
        k_part = tl.load(k_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w_offs = h * DH * DF + offs_k[:, None] * DF + offs_f[None, :]
        w_mask = mask_k[:, None] & mask_f[None, :]
        wq = tl.load(wq_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_DF)
        wk = tl.load(wk_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
        zq += tl.sum(q_part[:, None] * wq, axis=0)
        zk += tl.sum(k_part[:, None] * wk, axis=0)
    zq = tl.where(mask_f, zq, float("-inf"))
    zk = tl.where(mask_f, zk, float("-inf"))
    eq = tl.exp(zq - tl.max(zq, axis=0))
    ek = tl.exp(zk - tl.max(zk, axis=0))
    fq = eq / tl.sum(eq, axis=0)  # (BLOCK_DF,), 0 outside DF
    fk = ek / tl.sum(ek, axis=0)

    # 2. gates (log space) and the stabilizer
    gate_row = gates_ptr + b * (G * NH)
    if GATED:
        i_pre = tl.load(gate_row + h).to(tl.float32)
        f_pre = tl.load(gate_row + NH + h).to(tl.float32)
        lf = tl.minimum(f_pre, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f_pre)))  # logsigmoid
    else:
        i_pre = 0.0
        lf = 0.0
    o = 1.0 / (1.0 + tl.exp(-tl.load(gate_row + (G - 1) * NH + h).to(tl.float32)))  # sigmoid
    m_old = tl.load(m_ptr + b * NH + h)
    m_new = tl.maximum(lf + m_old, i_pre)
    f_act = tl.exp(lf + m_old - m_new)  # 0 for an empty state (m = -inf)
    i_act = tl.exp(i_pre - m_new)

    # 3. the state update and readout
    v = tl.load(v_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_DH,)
    n_offs = (b * NH + h) * DF + offs_f
    n_new = f_act * tl.load(n_ptr + n_offs, mask=mask_f, other=0.0) + i_act * fk  # (BLOCK_DF,)
    tl.store(n_out_ptr + n_offs, n_new, mask=mask_f)
    c_offs = (b * NH + h) * DF * DH + offs_f[:, None] * DH + offs_d[None, :]
    c_mask = mask_f[:, None] & mask_d[None, :]
    C_new = f_act * tl.load(C_ptr + c_offs, mask=c_mask, other=0.0) + i_act * (fk[:, None] * v[None, :])
    tl.store(C_out_ptr + c_offs, C_new, mask=c_mask)
    tl.store(m_out_ptr + b * NH + h, m_new)
    num = tl.sum(fq[:, None] * C_new, axis=0)  # (BLOCK_DH,)
    qn = tl.sum(fq * n_new, axis=0)
    if GATED:
        denom = tl.maximum(tl.abs(qn), tl.exp(tl.minimum(-m_new, MAX_NEG_M))) + eps
    else:
        denom = qn + eps
    memory = num / denom

    # 4. sliding window + sinks: the new key first (always visible: the running max starts finite), then the slots
    q = tl.load(q_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_DH,)
    k = tl.load(k_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    s_new = tl.sum(q * k, axis=0) * scale
    if SOFTCAP:
        s_new = softcap * _tanh(s_new / softcap)
    m_i = s_new
    l_i = s_new * 0.0 + 1.0
    acc = v
    query_pos = tl.load(pos_ptr + b)
    pos_row = key_pos_ptr + b * (S + W)
    if S > 0:
        offs_s = tl.arange(0, BLOCK_S)
        sink_tile = ((b * NKV + kv) * S + offs_s[:, None]) * DH + offs_d[None, :]
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, sink_k_ptr + sink_tile, sink_v_ptr + sink_tile, pos_row + offs_s,
                                      offs_s < S, mask_d, query_pos, scale, softcap, window, num_sinks, SOFTCAP)
    ring_row = (b * NKV + kv) * W
    if UNROLL_RING:  # the blocks' loads do not depend on each other: unrolled, later blocks' loads can start early
        for n0 in tl.static_range(0, W, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ring_tile = (ring_row + offs_n[:, None]) * DH + offs_d[None, :]
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, ring_k_ptr + ring_tile, ring_v_ptr + ring_tile,
                                          pos_row + S + offs_n, offs_n < W, mask_d, query_pos, scale, softcap,
                                          window, num_sinks, SOFTCAP)
    else:
        for n0 in range(0, W, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ring_tile = (ring_row + offs_n[:, None]) * DH + offs_d[None, :]
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, ring_k_ptr + ring_tile, ring_v_ptr + ring_tile,
                                          pos_row + S + offs_n, offs_n < W, mask_d, query_pos, scale, softcap,
                                          window, num_sinks, SOFTCAP)
    attention = acc / l_i

    # 5. the output gate's mix
    y = attention + o * (memory - attention)
    tl.store(y_ptr + (b * NH + h) * DH + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)
