"""CUDA paths (backend='tfla': Triton TFLA mLSTM, compiled FlexAttention) against the native kernels, forward and
backward, fp32 and bf16. Skipped without a CUDA GPU."""

import pytest
import torch

from xlstm_distill.kernels import KernelOptions, mlstm_chunkwise, swa_sinks_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 3e-3, torch.bfloat16: 2e-2}  # relative error (norm); Triton's fp32 dots use TF32 (seen: 1.4e-3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def _grads(fn, inputs):
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*inputs)
    out.float().square().sum().backward()
    return out.detach(), [x.grad for x in inputs if x.grad is not None]


@pytest.mark.parametrize("S", [1, 12, 100, 200])
def test_tfla_pads_any_length_for_the_triton_kernel(S):
    """Lengths the Triton kernel does not take itself (it needs 16, 32, 64 or a multiple of 128), with a state."""
    from xlstm_distill.kernels.mlstm_tfla import mlstm_tfla

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, 4, S + 64, 64, device="cuda", generator=g).softmax(-1) for _ in range(2))
    v = torch.randn(2, 4, S + 64, 64, device="cuda", generator=g)
    i, f = torch.randn(2, 4, S + 64, device="cuda", generator=g), torch.randn(2, 4, S + 64, device="cuda", generator=g) + 3
    ref, _ = mlstm_chunkwise(q, k, v, i, torch.nn.functional.logsigmoid(f))
    _, state = mlstm_tfla(*(x[:, :, :64] for x in (q, k, v, i, f)))
    out, _ = mlstm_tfla(*(x[:, :, 64:] for x in (q, k, v, i, f)), state, chunk_size=4)
    assert _rel(out, ref[:, :, 64:]) < TOL[torch.float32]


def test_tfla_continues_mixed_row_states_on_the_triton_kernel():
    """A batch state where row 0 has seen 128 tokens and row 1 none (m = -inf): the Triton kernel continues each
    row's own state (the empty row as from no state), outputs and final state as the native kernel's."""
    from xlstm_distill.kernels.mlstm_native import MLSTMState, empty_state
    from xlstm_distill.kernels.mlstm_tfla import mlstm_tfla

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, 4, 384, 64, device="cuda", generator=g).softmax(-1) for _ in range(2))
    v = torch.randn(2, 4, 384, 64, device="cuda", generator=g)
    i, f = torch.randn(2, 4, 384, device="cuda", generator=g), torch.randn(2, 4, 384, device="cuda", generator=g) + 3
    lf = torch.nn.functional.logsigmoid(f)
    _, seen = mlstm_chunkwise(*(x[:, :, :128] for x in (q, k, v, i, lf)))
    state = MLSTMState(*(torch.stack([a[0], b[1]]) for a, b in zip(seen, empty_state(2, 4, 64, 64, "cuda"))))
    ref, ref_state = mlstm_chunkwise(*(x[:, :, 128:] for x in (q, k, v, i, lf)), state)
    out, last = mlstm_tfla(*(x[:, :, 128:] for x in (q, k, v, i, f)), state)
    errors = [_rel(out, ref)] + [_rel(a, b) for a, b in zip(last, ref_state)]
    assert all(e < TOL[torch.float32] for e in errors), errors


def test_tfla_compiles_with_fullgraph_on_the_triton_kernel():
    """torch.compile(fullgraph=True) through the adapter on CUDA (bf16, kept chunk states, exact gradient, a
    state): the custom operators' fake shapes match the Triton kernel's, and outputs and gradients are eager's."""
    from xlstm_distill.kernels.mlstm_tfla import mlstm_tfla

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, 4, 640, 64, device="cuda", generator=g).softmax(-1).bfloat16() for _ in range(2))
    v = torch.randn(2, 4, 640, 64, device="cuda", generator=g).bfloat16()
    i, f = torch.randn(2, 4, 640, device="cuda", generator=g), torch.randn(2, 4, 640, device="cuda", generator=g) + 3
    _, state = mlstm_tfla(*(x[:, :, :128] for x in (q, k, v, i, f)))

    def adapter(*x):
        return mlstm_tfla(*x, state, chunk_size=128)[0]

    inputs = [x[:, :, 128:] for x in (q, k, v, i, f)]
    eager, compiled = _grads(adapter, inputs), _grads(torch.compile(adapter, fullgraph=True), inputs)
    errors = _errors(*compiled, *eager)
    assert all(e < 1e-2 for e in errors.values()), errors


def _errors(out, grads, ref, ref_grads) -> dict[str, float]:
    return {"h": _rel(out, ref), **{f"d{n}": _rel(a, b) for n, a, b in zip("qkvif", grads, ref_grads)}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tfla_forward_and_exact_backward_match_native(dtype):
    """TFLA is our mLSTM, forward and (through the adapter's extra value column) backward: the native kernel's
    autograd in float32 is the truth. With ``exact_gradient=False`` the backward is mlstm_kernels' own, which treats
    the normalizer max(|q n|, exp(-m)) as a constant: its reference is the PyTorch version of that backward
    (`chunkwise--native_custbw`), and it is far from the truth on dq (tests/kernels/test_tfla.py)."""
    from mlstm_kernels.torch import get_mlstm_kernel

    from xlstm_distill.kernels.mlstm_tfla import mlstm_tfla

    g = torch.Generator(device="cuda").manual_seed(0)
    B, NH, S, D = 2, 4, 512, 64
    q, k = (torch.randn(B, NH, S, D, device="cuda", generator=g).softmax(-1).to(dtype) for _ in range(2))
    v = torch.randn(B, NH, S, D, device="cuda", generator=g).to(dtype)
    i, f = torch.randn(B, NH, S, device="cuda", generator=g), torch.randn(B, NH, S, device="cuda", generator=g) + 3
    custbw = get_mlstm_kernel("chunkwise--native_custbw")
    exact = _grads(lambda q, k, v, i, f: mlstm_tfla(q, k, v, i, f)[0], [q, k, v, i, f])
    own = _grads(lambda q, k, v, i, f: mlstm_tfla(q, k, v, i, f, options=KernelOptions(exact_gradient=False))[0], [q, k, v, i, f])
    truth = _grads(lambda q, k, v, i, f: mlstm_chunkwise(q.float(), k.float(), v.float(), i,
                                                         torch.nn.functional.logsigmoid(f))[0], [q, k, v, i, f])
    reference = _grads(lambda q, k, v, i, f: custbw(q.float() * D**0.5, k.float(), v.float(), i, f, chunk_size=64),
                       [q, k, v, i, f])
    errors = {"exact vs truth": _errors(*exact, *truth), "own vs custbw": _errors(*own, *reference),
              "own vs truth": _errors(*own, *truth)}
    print(dtype, errors)
    assert all(e < 2 * TOL[dtype] for e in errors["exact vs truth"].values()), errors  # seen: 3.1e-3 / 6e-3
    assert all(e < 5 * TOL[dtype] for e in errors["own vs custbw"].values()), errors
    assert errors["own vs truth"]["dq"] > 0.1, errors


def test_tfla_kept_chunk_states_give_the_recomputed_gradients():
    """The backward from the forward's chunk states (the default) and from states computed again: the same
    gradients, also from an initial state (bf16 inputs, float32 gates)."""
    from xlstm_distill.kernels import mlstm_tfla as tfla

    g = torch.Generator(device="cuda").manual_seed(0)
    B, NH, S, D = 2, 4, 1024, 64
    q, k = (torch.randn(B, NH, S, D, device="cuda", generator=g).softmax(-1).bfloat16() for _ in range(2))
    v = torch.randn(B, NH, S, D, device="cuda", generator=g).bfloat16()
    i, f = torch.randn(B, NH, S, device="cuda", generator=g), torch.randn(B, NH, S, device="cuda", generator=g) + 3
    _, state = tfla.mlstm_tfla(*(x[:, :, :256] for x in (q, k, v, i, f)))
    results = {}
    for keep in (True, False):
        options = KernelOptions(keep_chunk_states=keep)
        results[keep] = _grads(lambda q, k, v, i, f: tfla.mlstm_tfla(q, k, v, i, f, state, chunk_size=128,
                                                                     options=options)[0],
                               [x[:, :, 256:] for x in (q, k, v, i, f)])
    (out, grads), (ref, ref_grads) = results[True], results[False]
    errors = _errors(out, grads, ref, ref_grads)
    assert len(grads) == 5 and all(e < 1e-5 for e in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("copy_sinks", [True, False])
def test_flex_forward_backward_matches_native(dtype, packed, copy_sinks):
    """FlexAttention forward and backward as the native kernel, for packed documents (sinks per document) and one
    document per row (the cached mask), with the sinks copied per query block (training's mask) or in place."""
    from xlstm_distill.kernels.swa_flex import causal_swa_block_mask, swa_block_mask, swa_sinks_flex

    g = torch.Generator(device="cuda").manual_seed(0)
    B, NH, NKV, T, D = 2, 8, 2, 2048, 64
    q = torch.randn(B, NH, T, D, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(B, NKV, T, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    doc_start = torch.zeros(B, T, dtype=torch.long, device="cuda")
    if packed:
        doc_start[1, 700:] = 700
    if packed:
        mask = swa_block_mask(doc_start, 512, 4, copy_sinks)
    else:
        mask = causal_swa_block_mask(T, 512, 4, q.device, copy_sinks)
    assert (mask.block_mask.shape[-1] > T) == copy_sinks
    fast, fast_g = _grads(lambda q, k, v: swa_sinks_flex(q, k, v, mask, D**-0.5), [q, k, v])
    ref, ref_g = _grads(lambda q, k, v: swa_sinks_attention(q.float(), k.float(), v.float(), doc_start, 512, 4, D**-0.5),
                        [q, k, v])
    assert _rel(fast, ref) < TOL[dtype]
    for a, b in zip(fast_g, ref_g):
        assert _rel(a, b) < 5 * TOL[dtype]


@pytest.mark.parametrize("packed", [True, False])
def test_flex_copied_sinks_unaligned_short_documents(packed):
    """Training's mask (copied sinks) at a length that is not a multiple of 128, with documents shorter than the
    sinks, documents across blocks and a block of 50 documents (more than its copies have room for: the later ones
    keep their sinks in place): forward and backward as the native kernel (bf16)."""
    from xlstm_distill.kernels.swa_flex import causal_swa_block_mask, swa_block_mask, swa_sinks_flex

    g = torch.Generator(device="cuda").manual_seed(0)
    B, NH, NKV, T, D = 2, 8, 2, 1000, 64
    q = torch.randn(B, NH, T, D, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(B, NKV, T, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    doc_start = torch.zeros(B, T, dtype=torch.long, device="cuda")
    if packed:
        for start in (130, 131, 133, 136, 300, *range(400, 500, 2), 777):
            doc_start[1, start:] = start
        mask = swa_block_mask(doc_start, 256, 4, copy_sinks=True)
    else:
        mask = causal_swa_block_mask(T, 256, 4, q.device, copy_sinks=True)
    assert mask.block_mask.shape[-1] == T + 8 * 128
    fast, fast_g = _grads(lambda q, k, v: swa_sinks_flex(q, k, v, mask, D**-0.5), [q, k, v])
    ref, ref_g = _grads(lambda q, k, v: swa_sinks_attention(q.float(), k.float(), v.float(), doc_start, 256, 4, D**-0.5),
                        [q, k, v])
    assert _rel(fast, ref) < TOL[torch.bfloat16]
    for a, b in zip(fast_g, ref_g):
        assert _rel(a, b) < 5 * TOL[torch.bfloat16]


@pytest.mark.parametrize("training_mask", [False, True])
def test_flex_serves_many_lengths_and_windows_compiled(training_mask):
    """One process meeting many sequence lengths (evaluation, generation with varied prompts) and two windows (two
    models), with and without gradients: every call stays compiled (hitting dynamo's recompile limit is made an
    error; past it FlexAttention would run unfused, 8 x 64K x 64K float32 scores at 64K = 128 GiB) and matches the
    native kernel, including a short query (inductor's decoding-kernel range) after the symbolic-length kernel.
    ``training_mask``: the calls with gradients use copied sinks, as the layer does in training."""
    from xlstm_distill.kernels.swa_flex import causal_swa_block_mask, swa_sinks_flex

    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch._dynamo.config.patch(fail_on_cache_limit_hit=True):
        for window in (512, 128):
            for T in [*range(100, 1300, 100), 65536, 120]:
                q = torch.randn(1, 8, T, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=T < 65536)
                k, v = (torch.randn(1, 2, T, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
                mask = causal_swa_block_mask(T, window, 4, q.device, copy_sinks=training_mask and q.requires_grad)
                out = swa_sinks_flex(q, k, v, mask, 64**-0.5)
                if q.requires_grad:
                    out.float().sum().backward()
                    assert torch.isfinite(q.grad).all()
                ref = swa_sinks_attention(q.detach(), k, v, torch.zeros(1, T, dtype=torch.long, device="cuda"), window,
                                          4, 64**-0.5)
                assert _rel(out.detach(), ref) < TOL[torch.bfloat16], (window, T)


def _student_pair(mixer: str, **config):
    """A tiny student on the native kernels (gates perturbed) and the same weights on backend 'tfla', and a batch of
    packed documents (TFLA resets through the forget gate)."""
    import xlstm_distill as xd
    from helpers import perturb_new_parameters, tiny_teacher

    teacher = tiny_teacher(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    native = xd.convert(teacher, xd.HybridConfig(mixer=mixer, window_size=64, num_sink_tokens=4, backend="native",
                                                 **config))
    perturb_new_parameters(native)
    fast = xd.HybridForCausalLM(xd.HybridConfig.from_dict({**native.config.to_dict(), "backend": "tfla"}))
    fast.load_state_dict(native.state_dict())
    ids = torch.randint(3, 128, (2, 640), generator=torch.Generator().manual_seed(0)).cuda()
    docs = torch.zeros_like(ids)
    docs[:, 300:] = 1
    docs[1, 500:] = 2
    return native, fast, ids, docs


def _student_run(model: torch.nn.Module, ids, docs, dtype: torch.dtype, autocast: bool = False):
    """Logits and the first layer's q_proj gradient of one training step, weights in ``dtype``, optionally under
    bf16 autocast (the stages' default on CUDA)."""
    model.cuda().to(dtype).train().zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids, document_ids=docs).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach().float(), model.model.layers[0].self_attn.q_proj.weight.grad.float()


def _fast_and_native_errors(native, fast, ids, docs, error_on_recompile: bool = False) -> dict[str, list[float]]:
    """Relative errors of logits and the q_proj gradient against backend 'native' in float32 (the truth), for backend
    'tfla' in bf16 ("tfla") and backend 'native' in bf16 ("native bf16")."""
    truth = _student_run(native, ids, docs, torch.float32)
    native_bf16 = _student_run(native, ids, docs, torch.bfloat16)
    torch._dynamo.reset()  # the compiled memory branch and FlexAttention: one graph each serves both layers
    with torch._dynamo.config.patch(error_on_recompile=error_on_recompile):
        fast_bf16 = _student_run(fast, ids, docs, torch.bfloat16)
    errors = {name: [_rel(a, b) for a, b in zip(result, truth)] for name, result in
              (("tfla", fast_bf16), ("native bf16", native_bf16))}
    print(errors)
    return errors


def _assert_fast_matches_native(errors: dict[str, list[float]]) -> None:
    """Logits within the tolerance or no worse than twice native bf16; the gradient within 5x it or likewise."""
    (fast_out, fast_grad), (native_out, native_grad) = errors["tfla"], errors["native bf16"]
    assert fast_out < max(TOL[torch.bfloat16], 2 * native_out), errors
    assert fast_grad < max(5 * TOL[torch.bfloat16], 2 * native_grad), errors


@pytest.mark.parametrize("copy_sinks", ["rows", "all"])
@pytest.mark.parametrize("mixer", ["mlstm_swa", "linear_swa"])
def test_student_fast_backend_matches_native_forward_backward(mixer, copy_sinks):
    """The whole student on CUDA, bf16: backend='tfla' (TFLA + FlexAttention, the memory branch through
    torch.compile) against backend='native' in float32 (the truth); logits and a q_proj gradient must be within the
    tolerance or no worse than twice backend='native' in bf16. The second layer must not compile again. The rows are
    packed: FlexAttention's sinks in place (the default, "rows") or copied per query block ("all")."""
    native, fast, ids, docs = _student_pair(mixer)
    fast.config.kernels = fast.config.kernels.replace(copy_sinks=copy_sinks)
    _assert_fast_matches_native(_fast_and_native_errors(native, fast, ids, docs, error_on_recompile=True))


def test_student_with_a_larger_feature_map_fast_backend_matches_native():
    """feature_dim = 4 x head_dim (q, k of the memory wider than v): backend 'tfla' against backend 'native' in float32,
    as above."""
    native, fast, ids, docs = _student_pair("mlstm_swa", feature_dim=128)  # head dim 32
    _assert_fast_matches_native(_fast_and_native_errors(native, fast, ids, docs))


def test_mixed_student_fast_backend_matches_native_and_graph_decodes():
    """Full-attention heads on CUDA: one KV head of layer 0 and all of layer 1 kept. The fast backend (TFLA +
    FlexAttention on the other heads, SDPA on the kept ones) against the float32 native truth, forward and backward;
    then greedy decoding through the CUDA-graph step equals the eager step."""
    from xlstm_distill.modeling.decode import greedy_generate

    native, fast, ids, docs = _student_pair("mlstm_swa", full_attention_heads=[[0, 1]], full_attention_layers=[1])
    _assert_fast_matches_native(_fast_and_native_errors(native, fast, ids, docs))
    fast.float().eval()
    with torch.no_grad():
        prompt = ids[:, :200]
        graphed = greedy_generate(fast, prompt, 40, use_graph=True)
        eager = greedy_generate(fast, prompt, 40, use_graph=False)
    assert torch.equal(graphed, eager)


def test_student_compiles_as_one_graph_on_cuda():
    """A user's torch.compile(model, fullgraph=True) (inductor) of the student on the fast backend: no graph break
    (TFLA's custom operators, FlexAttention and the memory branch traced in, the latter not through its own cached
    compiled function), and a bf16 training step's logits and q_proj gradient no further from the float32 native
    truth than twice the eager bf16 step (or the bf16 tolerance)."""
    import warnings

    native, fast, ids, docs = _student_pair("mlstm_swa")
    truth = _student_run(native, ids, docs, torch.float32)
    eager = _student_run(fast, ids, docs, torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True)
    fast.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = compiled(ids, document_ids=docs).logits
    assert not [w for w in caught if "lru_cache" in str(w.message)]  # no cache wrapper traced
    logits.float().logsumexp(-1).mean().backward()
    result = (logits.detach().float(), fast.model.layers[0].self_attn.q_proj.weight.grad.float())
    errors = {name: [_rel(a, b) for a, b in zip(got, truth)] for name, got in (("compiled", result), ("eager", eager))}
    print(errors)
    for got, reference in zip(errors["compiled"], errors["eager"]):
        assert got < max(TOL[torch.bfloat16], 2 * reference), errors


def test_compiled_memory_branch_under_autocast_matches_eager():
    """A training step under bf16 autocast with float32 weights (the stages' default on CUDA): backend 'tfla' with
    the memory branch through torch.compile against the same step with the branch eager, both against the float32
    native step (the truth): the compiled step no further from it than twice the eager one (or the bf16
    tolerance), and the second layer compiles nothing new."""
    native, fast, ids, docs = _student_pair("mlstm_swa")
    truth = _student_run(native, ids, docs, torch.float32)
    fast.config.kernels = fast.config.kernels.replace(compile_memory=False)
    eager = _student_run(fast, ids, docs, torch.float32, autocast=True)
    fast.config.kernels = fast.config.kernels.replace(compile_memory=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = _student_run(fast, ids, docs, torch.float32, autocast=True)
    errors = {name: [_rel(a, b) for a, b in zip(result, truth)] for name, result in
              (("compiled", compiled), ("eager", eager))}
    print(errors)
    for got, reference in zip(errors["compiled"], errors["eager"]):
        assert got < max(TOL[torch.bfloat16], 2 * reference), errors


def test_compiled_memory_branch_matches_eager_at_many_lengths():
    """The memory branch + mix through torch.compile (what the layer runs on CUDA) against the same function eager,
    forward and backward, at lengths on both sides of the Triton kernel's padding rules (up to 64 tokens padded to
    64, a multiple of 128 beyond; how many compilations the rule costs is tested on CPU, test_tfla.py). float32: the
    same function (1e-3); bf16: no further from the float32 result than twice the eager bf16 function (or 2e-2)
    (inductor rounds its fused work once, eager PyTorch after every operation)."""
    from xlstm_distill.modeling.attention import MemorySpec, _compiled_memory_and_mix, memory_and_mix

    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    NH, NKV, D = 4, 2, 64
    spec = MemorySpec(NH, gated=True, step=False, chunk_size=64, options=KernelOptions(mlstm="tfla"))
    for T in (12, 40, 100, 200, 333):
        q = torch.randn(1, NH, T, D, device="cuda", generator=g)
        k, v = (torch.randn(1, NKV, T, D, device="cuda", generator=g) for _ in "kv")
        gates = torch.randn(1, 3 * NH, T, device="cuda", generator=g)
        gates[:, NH:2 * NH] += 3.0  # forget gates mostly open
        swa = torch.randn(1, NH, T, D, device="cuda", generator=g)
        maps = [torch.eye(D, device="cuda") + 0.3 * torch.randn(NH, D, D, device="cuda", generator=g),
                0.1 * torch.randn(NH, D, device="cuda", generator=g)] * 2
        reset = torch.zeros(1, T, dtype=torch.bool, device="cuda")
        reset[:, 0] = True
        results = {}
        with torch._dynamo.config.patch(fail_on_cache_limit_hit=True):  # never silently eager
            for dtype in (torch.float32, torch.bfloat16):
                inputs = [x.to(dtype) for x in (q, k, v, gates, swa, *maps)]
                for name, fn in (("compiled", _compiled_memory_and_mix()), ("eager", memory_and_mix)):
                    out, grads = _grads(lambda *x: fn(*x[:5], tuple(x[5:]), None, reset, spec)[0], inputs)
                    results[name, dtype] = [out, *grads]
        truth = results["eager", torch.float32]
        errors = {key: [_rel(a, b) for a, b in zip(value, truth)] for key, value in results.items()}
        assert max(errors["compiled", torch.float32]) < 1e-3, (T, errors)
        for got, eager in zip(errors["compiled", torch.bfloat16], errors["eager", torch.bfloat16]):
            assert got < max(2e-2, 2 * eager), (T, errors)
