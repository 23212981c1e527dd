"""The mlstm_kernels (TFLA) adapter computes the same function as the native chunkwise kernel.

On CPU it runs mlstm_kernels' PyTorch twin of its Triton TFLA kernel (`chunkwise--native_custbw`: same algorithm,
same custom backward), which checks the adapter itself: q scaling, gate conventions, padding to a chunk multiple,
state layout, initial states and the exact gradient."""

import pytest
import torch

import xlstm_distill as xd
from helpers import perturb_new_parameters, tiny_teacher
from xlstm_distill.kernels import KernelOptions, mlstm_chunkwise
from xlstm_distill.kernels import mlstm_tfla as tfla
from xlstm_distill.kernels.mlstm_tfla import mlstm_tfla


def _inputs(S, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, S, 16, generator=g).softmax(-1) for _ in range(2))
    v = torch.randn(2, 3, S, 8, generator=g)
    i, f = torch.randn(2, 3, S, generator=g) * 3, torch.randn(2, 3, S, generator=g) * 3 + 2
    return q, k, v, i, f


@pytest.mark.parametrize("S", [64, 100, 37])
def test_tfla_matches_native_with_and_without_state(S):
    q, k, v, i, f = _inputs(S)
    lf = torch.nn.functional.logsigmoid(f)
    ref, _ = mlstm_chunkwise(q, k, v, i, lf, chunk_size=16)
    out, _ = mlstm_tfla(q, k, v, i, f, chunk_size=64)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    cut = S // 3  # continue from a state made by the native kernel
    first, state = mlstm_chunkwise(*(x[:, :, :cut] for x in (q, k, v, i, lf)), chunk_size=16)
    second, _ = mlstm_tfla(*(x[:, :, cut:] for x in (q, k, v, i, f)), state, chunk_size=64)
    torch.testing.assert_close(torch.cat([first, second], 2), ref, atol=1e-5, rtol=1e-5)


def test_tfla_continues_a_state_with_rows_that_have_no_token_yet():
    """A batch state where row 0 has seen tokens and row 1 none (m = -inf, e.g. a row of padding only): each row
    continues its own state, outputs and final state as the native kernel's (the empty row as from no state)."""
    from xlstm_distill.kernels.mlstm_native import empty_state

    q, k, v, i, f = _inputs(48)
    lf = torch.nn.functional.logsigmoid(f)
    _, seen = mlstm_chunkwise(*(x[:, :, :16] for x in (q, k, v, i, lf)), chunk_size=16)
    empty = empty_state(2, 3, 16, 8, q.device)
    state = type(seen)(*(torch.stack([a[0], b[1]]) for a, b in zip(seen, empty)))
    ref, ref_state = mlstm_chunkwise(*(x[:, :, 16:] for x in (q, k, v, i, lf)), state, chunk_size=16)
    out, last = mlstm_tfla(*(x[:, :, 16:] for x in (q, k, v, i, f)), state, chunk_size=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(last, ref_state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_student_with_tfla_backend_equals_native(monkeypatch):
    calls = []
    monkeypatch.setattr(tfla, "mlstm_tfla", lambda *a, **k: calls.append(1) or mlstm_tfla(*a, **k))
    teacher = tiny_teacher("llama")
    students = {}
    for backend in ("native", "tfla"):
        students[backend] = xd.convert(teacher, xd.HybridConfig(window_size=8, num_sink_tokens=2, backend=backend))
        perturb_new_parameters(students[backend])
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    docs = torch.tensor([[0] * 25 + [1] * 15] * 2)
    with torch.no_grad():
        for kwargs, layers_on_tfla in (({}, 2), ({"document_ids": docs}, 2)):  # packed documents: forget-gate resets
            calls.clear()
            torch.testing.assert_close(students["tfla"](ids, **kwargs).logits, students["native"](ids, **kwargs).logits,
                                       atol=1e-4, rtol=1e-4)
            assert len(calls) == layers_on_tfla


def test_tfla_document_resets_match_native():
    """Packed documents: a reset (forget gate -100) gives the native kernel's exact per-document result."""
    q, k, v, i, f = _inputs(100)
    i = i * 3  # large input gates: old state terms must still vanish after a reset
    reset = torch.zeros(2, 100, dtype=torch.bool)
    reset[:, 0] = True
    reset[0, [30, 64, 65]] = True
    reset[1, 99] = True
    ref, ref_state = mlstm_chunkwise(q, k, v, i, torch.nn.functional.logsigmoid(f), reset=reset, chunk_size=16)
    out, state = mlstm_tfla(q, k, v, i, f, chunk_size=64, reset=reset)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(state, ref_state):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_resets", [False, True])
def test_tfla_adapter_gradients_match_native(with_resets):
    """Backward through the adapter (q scaling, forget pre-activations, padding, reset gates, the extra value column
    that makes the gradient exact) equals the native kernel's autograd, on CPU through mlstm_kernels' PyTorch twin of
    the TFLA kernel (same custom backward). The gates' gradients carry the eps next to the normalizer, which depends
    on the stabilizer m that the kernel holds constant (exact without eps: the next test)."""
    q, k, v, i, f = _inputs(100)
    reset = torch.zeros(2, 100, dtype=torch.bool)
    reset[:, 0], reset[0, 40] = True, True

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, i, f)]
        fn(*leaves).square().sum().backward()
        return [x.grad for x in leaves]

    r = reset if with_resets else None
    fast = grads(lambda q, k, v, i, f: mlstm_tfla(q, k, v, i, f, chunk_size=64, reset=r)[0])
    ref = grads(lambda q, k, v, i, f: mlstm_chunkwise(q, k, v, i, torch.nn.functional.logsigmoid(f), reset=r,
                                                      chunk_size=16)[0])
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(fast, ref)]  # relative error of each whole gradient
    assert max(rel[:3]) < 2e-5 and max(rel[3:]) < 3e-4, rel


def _wide_inputs(S: int, input_gate_offset: float, seed: int = 0):
    """64 softmax features and wide input gates: many tokens close to the normalizer's kink |q n| = exp(-m); an
    offset of 10 makes the stabilizer m large, where eps / |q n| is far from negligible."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, S, 64, generator=g, dtype=torch.float64).softmax(-1) for _ in range(2))
    v = torch.randn(2, 3, S, 8, generator=g, dtype=torch.float64)
    i = torch.randn(2, 3, S, generator=g, dtype=torch.float64) * 4 + input_gate_offset
    f = torch.randn(2, 3, S, generator=g, dtype=torch.float64) + 3
    return q, k, v, i, f


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("input_gate_offset", [0.0, 10.0])
def test_exact_backward_is_autograd_near_the_normalizers_kink(monkeypatch, eps, input_gate_offset):
    """Float64: the exact-backward path against the native kernel's autograd, on inputs with tokens near the kink
    and with a large stabilizer. Without eps all five gradients agree to rounding; with it q, k and v still do, and
    the gates' gradients differ only by eps's dependence on the stabilizer m, which the kernel holds constant."""
    from xlstm_distill.kernels import mlstm_native as mlstm

    monkeypatch.setattr(mlstm, "EPS", eps)  # both kernels read it
    inputs = [x.requires_grad_() for x in _wide_inputs(256, input_gate_offset)]
    q, k, v, i, f = inputs
    fast = torch.autograd.grad(mlstm_tfla(q, k, v, i, f)[0].square().sum(), inputs)
    ref = torch.autograd.grad(mlstm_chunkwise(q, k, v, i, torch.nn.functional.logsigmoid(f), chunk_size=16)[0]
                              .square().sum(), inputs)
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(fast, ref)]
    assert max(rel[:3]) < 1e-5 and max(rel[3:]) < (1e-5 if eps == 0 else 2e-3), rel


@pytest.mark.parametrize("with_state", [False, True])
def test_exact_backward_with_signed_features_small_gates_and_a_state(with_state):
    """Float64, features of both signs (q n < 0 happens), input gates around -1 and, with a state, a nonzero initial
    stabilizer: the exact-backward path equals the native kernel's autograd (gates up to eps's dependence on m).
    (Starting the stateless stabilizer at 0, as mlstm_kernels does, moves the kink by at most eps: below what this
    test can separate.)"""
    g = torch.Generator().manual_seed(1)

    def inputs(S):
        q, k = (0.5 * torch.randn(2, 3, S, 16, generator=g, dtype=torch.float64) for _ in range(2))
        v = torch.randn(2, 3, S, 8, generator=g, dtype=torch.float64)
        i = 0.3 * torch.randn(2, 3, S, generator=g, dtype=torch.float64) - 1
        return q, k, v, i, torch.randn(2, 3, S, generator=g, dtype=torch.float64) + 3

    state = None
    if with_state:
        q0, k0, v0, i0, f0 = inputs(40)
        _, state = mlstm_chunkwise(q0, k0, v0, i0 + 2, torch.nn.functional.logsigmoid(f0), chunk_size=16)
    leaves = [x.requires_grad_() for x in inputs(128)]
    q, k, v, i, f = leaves
    fast = torch.autograd.grad(mlstm_tfla(q, k, v, i, f, state)[0].square().sum(), leaves)
    ref = torch.autograd.grad(mlstm_chunkwise(q, k, v, i, torch.nn.functional.logsigmoid(f), state, chunk_size=16)[0]
                              .square().sum(), leaves)
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(fast, ref)]
    assert max(rel[:3]) < 1e-5 and max(rel[3:]) < 2e-3, rel


def test_normalizer_branch_is_decided_at_the_kink_of_each_token():
    """The |q n| branch is |w| >= 1 / (1 + eps exp(m)), not |w| close to 1: a token just below the kink (w = 0.998,
    m = 0) gets no normalizer term; a token with a large stabilizer (m = 12: eps exp(m) = 0.16, kink 0.86) whose
    w = 0.99 is on the |q n| branch and gets d out / d w = -u sign(w). The forward value is u either way."""
    from xlstm_distill.kernels.mlstm_tfla import _add_normalizer_gradient

    u, w = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.998, -0.99], dtype=torch.float64)
    h = torch.stack([u, w], -1)[None, None].requires_grad_()  # (1, 1, 2, DHV + 1 = 2)
    out = _add_normalizer_gradient(h, torch.tensor([[[0.0, 12.0]]], dtype=torch.float64))
    assert torch.equal(out.detach(), h.detach()[..., :1])
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert grad[0, 0, :, 0].tolist() == [1.0, 1.0] and grad[0, 0, :, 1].tolist() == [0.0, 3.0]


def test_flex_single_document_mask_is_cached_and_exact():
    """Unpadded, unpacked inputs use one cached block mask per length (broadcast over the batch)."""
    from xlstm_distill.kernels import swa_flex as flex, swa_sinks_attention

    flex._cached_swa_mask.cache_clear()
    student = xd.convert(tiny_teacher("llama"), xd.HybridConfig(mixer="swa", window_size=8, num_sink_tokens=2,
                                                                backend="tfla"))
    native = xd.convert(tiny_teacher("llama"), xd.HybridConfig(mixer="swa", window_size=8, num_sink_tokens=2,
                                                               backend="native"))
    ids = torch.randint(3, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(student(ids).logits, native(ids).logits, atol=1e-4, rtol=1e-4)
    info = flex._cached_swa_mask.cache_info()
    assert info.misses == 1 and info.hits == 1  # once per forward (shared by the layers), built once
    q, k, v = (torch.randn(3, 4, 40, 16) for _ in range(3))
    ref = swa_sinks_attention(q, k, v, torch.zeros(3, 40, dtype=torch.long), 8, 2, 0.25)
    out = flex.swa_sinks_flex(q, k, v, flex.causal_swa_block_mask(40, 8, 2, torch.device("cpu")), 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_long_inputs_run_in_groups_of_heads(monkeypatch):
    """The CUDA launch grid limits B * NH * chunks per call: fewer rows per call give the same outputs, states and
    gradients (here 6 rows in groups of 2, from a state)."""
    q, k, v, i, f = (x.requires_grad_() for x in _inputs(64))
    _, state = mlstm_tfla(*(x[:, :, :16].detach() for x in (q, k, v, i, f)), chunk_size=16)

    def run():
        out, last = mlstm_tfla(q, k, v, i, f, state, chunk_size=16)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, i, f))
        return out, last, grads

    calls = []
    call = tfla._call
    monkeypatch.setattr(tfla, "_call", lambda args, *rest: calls.append(args[0].shape[:2]) or call(args, *rest))
    whole = run()
    assert calls == [(2, 3)]
    monkeypatch.setattr(tfla, "MAX_GRID_Z", 8)  # 64 / 16 = 4 chunks -> 2 rows per call
    grouped = run()
    assert calls[1:] == [(2, 1)] * 3
    torch.testing.assert_close(grouped[0], whole[0])
    for a, b in zip((*grouped[1], *grouped[2]), (*whole[1], *whole[2])):
        torch.testing.assert_close(a, b)


def test_mlstm_kernels_backward_treats_the_normalizer_as_a_constant():
    """mlstm_kernels' own custom backward (the one its Triton TFLA kernel implements; `chunkwise--native_custbw` is
    its PyTorch version; ``exact_gradient=False``) does not differentiate the normalizer max(|q n|, exp(-m)): dv
    equals exact autograd (the normalizer does not depend on v), dq, dk and the gates' gradients do not. This is why
    the adapter adds the extra value column by default (docs/decisions.md)."""
    inputs = [x.requires_grad_() for x in _inputs(128)]
    q, k, v, i, f = inputs
    lf = torch.nn.functional.logsigmoid(f)
    exact = torch.autograd.grad(mlstm_chunkwise(q, k, v, i, lf, chunk_size=16)[0].square().sum(), inputs)
    out = mlstm_tfla(q, k, v, i, f, options=KernelOptions(exact_gradient=False))[0]
    torch.testing.assert_close(out, mlstm_tfla(q, k, v, i, f)[0])  # the same forward
    custom = torch.autograd.grad(out.square().sum(), inputs)
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(custom, exact)]
    assert rel[2] < 1e-5 and min(rel[:2] + rel[3:]) > 0.1, rel


def test_cuda_length_rule_compiles_once_for_short_and_once_for_long_inputs():
    """The Triton kernel's length rule as torch.compile sees it (attention.memory_and_mix compiles the padding): from
    the second length on each side of 64 tokens one symbolic length serves all, and every padded length is one the
    kernel takes (16, 32, 64 or a multiple of 128) with the chunk dividing it."""
    torch._dynamo.reset()

    @torch.compile(dynamic=None, backend="eager")  # dynamo's guards are the point, not inductor's kernels
    def padded(x: torch.Tensor) -> torch.Tensor:
        chunk, pad = tfla.kernel_layout(x.shape[-1], 64, cuda=True)
        return torch.nn.functional.pad(x, (0, pad), value=float(chunk))

    for S in (12, 40, 20, 33, 50, 100, 200, 333, 130):  # (dynamo specializes length 1 itself: one more graph)
        with torch._dynamo.config.patch(error_on_recompile=S not in (12, 40, 100)):
            out = padded(torch.zeros(S))
        length, chunk = out.shape[-1], tfla.kernel_layout(S, 64, cuda=True)[0]
        assert length >= S and (length in (16, 32, 64) or (length % 128 == 0 and length % chunk == 0)), S


@pytest.mark.parametrize("with_state", [False, True])
def test_kernel_ops_pass_opcheck(with_state):
    """The kernel's forward and backward as custom operators: schema, fake tensors (the shapes and strides
    torch.compile traces with) and the autograd registration that pairs them, checked by torch.library.opcheck; the
    gates are strided views, as the model passes them."""
    q, k, v, i, f = _inputs(64)
    i, f = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (i, f))  # (B, NH, S) with stride 1 over NH
    q, k, v, i, f = (x.requires_grad_() for x in (q, k, v, i, f))
    initial = [None, None, None]
    if with_state:
        _, state = mlstm_tfla(*(x[:, :, :16].detach() for x in (q, k, v, i, f)), chunk_size=16)
        initial = [state.C, state.n, state.m.unsqueeze(-1)]
    inputs = (q, k, v, i, f, *initial)
    torch.library.opcheck(torch.ops.xlstm_distill.tfla_forward.default, (*inputs, 16, False, "{}"))
    with torch.no_grad():
        h, n_out, m_out, C = torch.ops.xlstm_distill.tfla_forward(*inputs, 16, False, "{}")[:4]
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).transpose(0, 1).contiguous().transpose(0, 1)
    empty = q.new_empty(0)
    backward = (dh, torch.zeros_like(C), *(x.detach() if x is not None else None for x in inputs), empty, empty,
                empty, n_out, m_out, 16, "{}")
    torch.library.opcheck(torch.ops.xlstm_distill.tfla_backward.default, backward)


def test_tfla_compiles_with_fullgraph():
    """torch.compile(fullgraph=True) through the adapter (the kernel is an opaque custom operator, no graph break):
    outputs, final state and gradients as eager, with the exact gradient's extra value column and a state."""
    q, k, v, i, f = _inputs(100)
    _, state = mlstm_tfla(*(x[:, :, :16] for x in (q, k, v, i, f)), chunk_size=16)

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, i, f)]
        out, last = fn(*leaves)
        return out, last, torch.autograd.grad(out.square().sum(), leaves)

    def adapter(*x):
        return mlstm_tfla(*x, state, chunk_size=32)

    eager, compiled = run(adapter), run(torch.compile(adapter, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip((*compiled[1], *compiled[2]), (*eager[1], *eager[2])):  # fused element-wise work: float32
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)                # rounding (seen: 1.8e-5)
