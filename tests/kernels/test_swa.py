"""SWA + sinks: blocked and cached kernels against a dense masked reference."""

import itertools

import pytest
import torch

from xlstm_distill.kernels.swa_native import swa_sinks_attention, swa_sinks_attention_cached


needs_cpu_flex_compile = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                            reason="torch compiles FlexAttention on CPUs with AVX2 or AVX-512")


def dense_reference(q, k, v, doc_start, window, sinks, scale, softcap=None):
    """Plain softmax attention with an explicit (T, T) mask (scores soft-capped as Gemma 2 does): the definition."""
    B, NH, T, D = q.shape
    G = NH // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    t = torch.arange(T)
    pos = t[None] - doc_start  # (B, T) position in document
    same_doc = doc_start[:, :, None] == doc_start[:, None, :]
    mask = same_doc & (t[None, None] <= t[None, :, None])
    mask &= (pos[:, None, :] < sinks) | (t[None, :, None] - t[None, None, :] < window)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), -1) @ v


def _qkv(B=2, NH=4, NKV=2, T=50, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, NH, T, D, generator=g), torch.randn(B, NKV, T, D, generator=g), torch.randn(B, NKV, T, D, generator=g)


@pytest.mark.parametrize("window,sinks,block", [(8, 4, 8), (8, 0, 5), (5, 2, 16), (100, 4, 16), (1, 1, 7)])
def test_blocked_matches_dense(window, sinks, block):
    q, k, v = _qkv()
    doc_start = torch.zeros(2, 50, dtype=torch.long)
    doc_start[1, 20:] = 20  # second row: two documents
    doc_start[1, 33:] = 33
    out = swa_sinks_attention(q, k, v, doc_start, window, sinks, 0.3, block_size=block)
    ref = dense_reference(q, k, v, doc_start, window, sinks, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [0.5, 3.0])
def test_soft_capped_scores_match_dense(softcap):
    """Attention-logit soft-capping in every SWA kernel (blocked, cached, FlexAttention) against the definition; a cap
    of 0.5 (scores of about 1) changes the result, so the check is not vacuous."""
    from xlstm_distill.kernels.swa_flex import swa_block_mask, swa_sinks_flex

    q, k, v = _qkv(T=40)
    q = q * 3
    doc_start = torch.zeros(2, 40, dtype=torch.long)
    doc_start[1, 15:] = 15
    ref = dense_reference(q, k, v, doc_start, 8, 2, 0.3, softcap)
    assert (ref - dense_reference(q, k, v, doc_start, 8, 2, 0.3)).abs().max() > 1e-2 or softcap > 1
    torch.testing.assert_close(swa_sinks_attention(q, k, v, doc_start, 8, 2, 0.3, block_size=16, softcap=softcap), ref,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(swa_sinks_flex(q, k, v, swa_block_mask(doc_start, 8, 2), 0.3, softcap=softcap), ref,
                               atol=1e-5, rtol=1e-5)
    pos = torch.arange(25)[None]  # the second row's second document (tokens 15..39), through the cached form
    cached = swa_sinks_attention_cached(q[1:, :, -4:], pos[:, -4:], k[1:, :, 15:], v[1:, :, 15:], pos, 8, 2, 0.3,
                                        softcap)
    torch.testing.assert_close(cached, ref[1:, :, -4:], atol=1e-5, rtol=1e-5)


def test_cached_matches_dense():
    """Keys given as an unordered set with positions (like a ring buffer) give the same result."""
    window, sinks, T = 6, 3, 30
    q, k, v = _qkv(B=1, T=T)
    ref = dense_reference(q, k, v, torch.zeros(1, T, dtype=torch.long), window, sinks, 0.5)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(T)[perm][None]
    out = swa_sinks_attention_cached(q[:, :, -4:], torch.arange(T - 4, T)[None], k[:, :, perm], v[:, :, perm], pos, window, sinks, 0.5)
    torch.testing.assert_close(out, ref[:, :, -4:], atol=1e-5, rtol=1e-5)
    empty = torch.full((1, 5), -1)  # empty slots are ignored
    out2 = swa_sinks_attention_cached(
        q[:, :, -4:], torch.arange(T - 4, T)[None], torch.cat([k[:, :, perm], k[:, :, :5]], 2),
        torch.cat([v[:, :, perm], v[:, :, :5]], 2), torch.cat([pos, empty], 1), window, sinks, 0.5,
    )
    torch.testing.assert_close(out2, out)


def test_cached_compiled_matches_dense():
    """Under torch.compile (the compiled decode step) the cached form is written as products and sums for inductor
    to fuse: the same result as the dense reference, for GQA (4 query heads on 2 key-value heads) and bf16 inputs."""
    window, sinks, T = 6, 3, 30
    q, k, v = _qkv(T=T)
    ref = dense_reference(q, k, v, torch.zeros(2, T, dtype=torch.long), window, sinks, 0.5)
    compiled = torch.compile(swa_sinks_attention_cached, backend="inductor", fullgraph=True)
    pos = torch.arange(T).expand(2, T)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        out = compiled(q[:, :, -1:].to(dtype), pos[:, -1:], k.to(dtype), v.to(dtype), pos, window, sinks, 0.5)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref[:, :, -1:], atol=tol, rtol=tol)


@pytest.mark.parametrize("window,sinks", [(8, 4), (5, 0), (100, 2)])
def test_flex_attention_matches_dense(window, sinks):
    from xlstm_distill.kernels.swa_flex import swa_block_mask, swa_sinks_flex

    q, k, v = _qkv(T=70)
    doc_start = torch.zeros(2, 70, dtype=torch.long)
    doc_start[1, 30:] = 30
    out = swa_sinks_flex(q, k, v, swa_block_mask(doc_start, window, sinks), 0.3)
    torch.testing.assert_close(out, dense_reference(q, k, v, doc_start, window, sinks, 0.3), atol=1e-5, rtol=1e-5)


@needs_cpu_flex_compile
def test_compiled_flex_attention_serves_many_variants():
    """The compiled FlexAttention path (CUDA's; compiled on CPU here, forward only) over windows, dtypes, batch sizes
    and lengths: more compiled variants than dynamo's default recompile limit of 8. With hitting the limit made an
    error, every call must stay compiled (past the limit FlexAttention would run unfused: T x T scores) and match the
    native kernel."""
    from xlstm_distill.kernels.swa_flex import causal_swa_block_mask, swa_sinks_flex

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(fail_on_cache_limit_hit=True), torch.no_grad():  # the old name: torch 2.6 too
        for window, B in itertools.product((64, 32), (1, 2, 3)):
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):  # (torch 2.6 compiles no float16 here)
                for T in (100, 300, 600):
                    q = torch.randn(B, 4, T, 16, generator=g).to(dtype)
                    k, v = (torch.randn(B, 2, T, 16, generator=g).to(dtype) for _ in range(2))
                    out = swa_sinks_flex(q, k, v, causal_swa_block_mask(T, window, 4, q.device), 0.25, compiled=True)
                    ref = swa_sinks_attention(q, k, v, torch.zeros(B, T, dtype=torch.long), window, 4, 0.25)
                    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@needs_cpu_flex_compile
def test_compiled_flex_attention_compiles_twice_for_all_lengths():
    """Prompts of many lengths: the first length compiles with static shapes, the second with a symbolic length
    that serves all later ones (with dynamic=False every length would compile again)."""
    from xlstm_distill.kernels.swa_flex import causal_swa_block_mask, swa_sinks_flex

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for T in (200, 300, 450, 600, 900, 1200):
            q, k, v = _qkv(T=T)
            out = swa_sinks_flex(q, k, v, causal_swa_block_mask(T, 64, 4, q.device), 0.3, compiled=True)
            ref = swa_sinks_attention(q, k, v, torch.zeros(q.shape[0], T, dtype=torch.long), 64, 4, 0.3)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def _packed_starts(T: int, boundaries: list[int]) -> torch.Tensor:
    """(2, T) document starts: row 0 one document, row 1 documents starting at 0 and at each boundary."""
    doc_start = torch.zeros(2, T, dtype=torch.long)
    for b in boundaries:
        doc_start[1, b:] = b
    return doc_start


# row 1: two documents (30 and 370 tokens); or documents of 1, 2 and 3 tokens (shorter than the sinks) between long
# ones across blocks; or 50 documents in the first block (more than the copies of 3 or 4 sinks have room for: the
# later ones keep their sinks in place)
LAYOUTS = {"one document": [], "two documents": [30], "short documents": [130, 131, 133, 136, 200, 300],
           "crowded block": list(range(2, 100, 2))}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window,sinks", [(8, 4), (5, 1), (100, 2), (300, 4)])
def test_flex_copied_sinks_match_dense(window, sinks, layout):
    """Training's mask on the CPU (eager): each query block of 128 tokens sees copies of its documents' sinks after
    the keys, the sinks in place are out of the window part. Same function as the dense definition."""
    from xlstm_distill.kernels.swa_flex import BLOCK, causal_swa_block_mask, swa_block_mask, swa_sinks_flex

    T = 400
    q, k, v = _qkv(T=T)
    doc_start = _packed_starts(T, LAYOUTS[layout])
    if layout == "one document":
        mask = causal_swa_block_mask(T, window, sinks, torch.device("cpu"), copy_sinks=True)
    else:
        mask = swa_block_mask(doc_start, window, sinks, copy_sinks=True)
    assert mask.block_mask.shape[-1] == 400 + 4 * BLOCK  # a key block of copies per query block
    if layout == "one document":  # copies of the row's first tokens
        assert mask.row_sinks == sinks and mask.sink_pos is None
    else:  # copies gathered per document
        assert mask.row_sinks == 0 and mask.sink_pos is not None
    out = swa_sinks_flex(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, dense_reference(q, k, v, doc_start, window, sinks, 0.3), atol=1e-5, rtol=1e-5)


def test_flex_copied_sinks_fall_back_to_sinks_in_place():
    """More sinks than a block of copies has room for (130 > 128): the sinks stay in place, one document per row
    and packed."""
    from xlstm_distill.kernels.swa_flex import causal_swa_block_mask, swa_block_mask, swa_sinks_flex

    q, k, v = _qkv(T=400)
    doc_start = _packed_starts(400, [300])
    for mask, starts in ((swa_block_mask(doc_start, 16, 130, copy_sinks=True), doc_start),
                         (causal_swa_block_mask(400, 16, 130, torch.device("cpu"), copy_sinks=True),
                          torch.zeros_like(doc_start))):
        assert mask.sink_pos is None and mask.row_sinks == 0 and mask.block_mask.shape[-1] == 400
        out = swa_sinks_flex(q, k, v, mask, 0.3)
        torch.testing.assert_close(out, dense_reference(q, k, v, starts, 16, 130, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_copied_sinks_gradient(monkeypatch, layout):
    """The gradient through the copies reaches the sinks: FlexAttention has no backward on the CPU, so a dense
    attention under the same block mask over the same keys stands in for it; the gradients must be those of the
    dense definition."""
    from torch.nn.attention.flex_attention import create_mask

    from xlstm_distill.kernels import swa_flex as flex

    def dense_flex(q, k, v, block_mask, scale, enable_gqa, kernel_options, score_mod=None):
        assert score_mod is None  # no soft-capping here
        G = q.shape[1] // k.shape[1]
        allowed = create_mask(block_mask.mask_mod, q.shape[0], 1, q.shape[2], k.shape[2], device="cpu")
        scores = ((q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, -1) @ v.repeat_interleave(G, 1)

    monkeypatch.setattr(flex, "flex_attention", dense_flex)
    T = 400
    q, k, v = (x.requires_grad_() for x in _qkv(T=T))
    doc_start = _packed_starts(T, LAYOUTS[layout])
    if layout == "one document":
        mask = flex.causal_swa_block_mask(T, 6, 3, torch.device("cpu"), copy_sinks=True)
    else:
        mask = flex.swa_block_mask(doc_start, 6, 3, copy_sinks=True)
    assert mask.block_mask.shape[-1] > T
    weights = torch.randn(2, 4, T, 8, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((flex.swa_sinks_flex(q, k, v, mask, 0.3) * weights).sum(), (q, k, v))
    ref = torch.autograd.grad((dense_reference(q, k, v, doc_start, 6, 3, 0.3) * weights).sum(), (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
