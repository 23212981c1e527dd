"""The fused mixer forward (``kernels.mixer: triton``) against its native PyTorch reference (``mixer_native``), and
the rule that routes what it does not cover to the existing path.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so the shapes are small; on a CUDA machine the same tests run the compiled kernels on the GPU,
and the tests marked ``cuda`` add Llama-like shapes and torch.compile:

    python -m pytest -q tests/kernels/test_mixer_fused.py          # all (on a GPU: compiled Triton kernels)
    python -m pytest -q -m cuda tests/kernels/test_mixer_fused.py  # the GPU-only ones
"""

import pytest
import torch

import xlstm_distill as xd
from helpers import perturb_new_parameters, tiny_teacher
from xlstm_distill import kernels
from xlstm_distill.kernels import KernelOptions, MLSTMState, choose_kernel

CUDA_AVAILABLE = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA_AVAILABLE else "cpu")  # on CPU: Triton's interpreter
TRITON, NATIVE = KernelOptions(mixer="triton"), KernelOptions(mixer="native")
# students: the rest of the model on the native kernels (on CUDA `auto` would be TFLA / FlexAttention, with TF32)
STUDENT_TRITON, STUDENT_NATIVE = (KernelOptions(mixer=name, mlstm="native", swa="native")
                                  for name in ("triton", "native"))
# relative error (norm) from the float32 reference; float32 dots are exact ("ieee"), bf16 inputs round everywhere
TOL = {torch.float32: 1e-4 if CUDA_AVAILABLE else 2e-5, torch.bfloat16: 2e-2}
needs_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def _layout(B: int, T: int, starts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_start (B, T) and reset (B, T) of rows whose documents start at ``starts[row]`` (0 always)."""
    reset = torch.zeros(B, T, dtype=torch.bool)
    for row, positions in enumerate(starts):
        reset[row, [0, *positions]] = True
    idx = torch.arange(T).expand(B, T)
    doc_start = torch.cummax(torch.where(reset, idx, 0), dim=1).values
    return doc_start.to(DEVICE), reset.to(DEVICE)


def _inputs(B=2, NH=4, NKV=2, T=40, DH=16, DF=32, seed=0, dtype=torch.float32):
    """q (B, NH, T, DH), k, v (B, NKV, T, DH), gates (B, 3 NH, T) (forget gates mostly open), the feature maps."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, T, DH, generator=g)
    k, v = (torch.randn(B, NKV, T, DH, generator=g) for _ in "kv")
    gates = torch.randn(B, 3 * NH, T, generator=g) + torch.tensor([0.0] * NH + [3.0] * NH + [0.0] * NH)[:, None]
    maps = (0.5 * torch.randn(NH, DH, DF, generator=g), 0.1 * torch.randn(NH, DF, generator=g),
            0.5 * torch.randn(NH, DH, DF, generator=g), 0.1 * torch.randn(NH, DF, generator=g))
    return [x.to(DEVICE, dtype) for x in (q, k, v, gates)], tuple(x.to(DEVICE) for x in maps)


def _compare(tensors, maps, doc_start, reset, state=None, dtype=torch.float32, **kw):
    """The triton op against the native reference run in float32 on the same (rounded) inputs: y and final state."""
    y, last = kernels.mixer(*tensors, maps, doc_start, reset, state, options=TRITON, **kw)
    ref, ref_last = kernels.mixer(*(x.float() for x in tensors), maps, doc_start, reset, state, options=NATIVE, **kw)
    assert y.dtype == dtype and y.shape == ref.shape and y.transpose(1, 2).is_contiguous()  # (B, T, NH, DH) layout
    errors = [_rel(y, ref)] + [_rel(a, b) for a, b in zip(last, ref_last)]
    assert all(e < TOL[dtype] for e in errors), errors


def test_one_document_per_row_with_an_initial_state():
    """GQA, DF != DH, T (70) not a multiple of the query block (16) and past the first state chunk (64 tokens),
    window 8 < T, 2 sinks; the state continues a first part of the rows computed by the reference."""
    tensors, maps = _inputs(T=94)
    first, rest = ([x[:, :, :24] for x in tensors], [x[:, :, 24:] for x in tensors])
    doc_start, reset = _layout(2, 24, [[], []])
    _, state = kernels.mixer(*first, maps, doc_start, reset, options=NATIVE, window=8, num_sinks=2, scale=0.25,
                             chunk_size=16)
    doc_start = torch.zeros(2, 70, dtype=torch.long, device=DEVICE)  # continuing rows: no reset, sinks at 0
    _compare(rest, maps, doc_start, None, state, window=8, num_sinks=2, scale=0.25, chunk_size=16)


@pytest.mark.parametrize("window,num_sinks,softcap", [(8, 0, None), (64, 3, 5.0), (5, 2, None)])
def test_packed_documents(window, num_sinks, softcap):
    """Documents packed in a row: the state resets at each start, each document has its own sinks; a one-token
    document, documents starting on a query block's and a state chunk's boundary (16, 64), one shorter than its
    sinks, one crossing a state chunk; window smaller and larger than T (75, odd), with and without soft-capping."""
    tensors, maps = _inputs(NH=2, NKV=1, T=75, seed=1)
    doc_start, reset = _layout(2, 75, [[16, 17, 30, 64], [5]])
    _compare(tensors, maps, doc_start, reset, window=window, num_sinks=num_sinks, scale=0.25, softcap=softcap,
             chunk_size=16)


def test_head_sizes_that_are_not_powers_of_two():
    """DH = 24, DF = 20 (masked tile columns), no GQA, chunk 32, packed documents and a state of the first part."""
    tensors, maps = _inputs(B=1, NH=2, NKV=2, T=45, DH=24, DF=20, seed=2)
    g = torch.Generator().manual_seed(3)
    state = MLSTMState(torch.randn(1, 2, 20, 24, generator=g).to(DEVICE), torch.rand(1, 2, 20, generator=g).to(DEVICE),
                       torch.tensor([[0.5, float("-inf")]], device=DEVICE))  # the second head has seen no token
    doc_start, _ = _layout(1, 45, [[33]])
    reset = torch.zeros(1, 45, dtype=torch.bool, device=DEVICE)
    reset[0, 33] = True  # the state continues the first document
    _compare(tensors, maps, doc_start, reset, state, window=16, num_sinks=1, scale=0.2, chunk_size=30)


@pytest.mark.parametrize("T", [1, 3])
def test_short_prompts(T):
    """Prompts shorter than a query block (a prefill of one token included)."""
    tensors, maps = _inputs(B=2, NH=2, NKV=1, T=T, seed=T)
    doc_start, reset = _layout(2, T, [[], [T - 1] if T > 1 else []])
    _compare(tensors, maps, doc_start, reset, window=4, num_sinks=2, scale=0.3, chunk_size=64)


def test_bfloat16_inputs():
    tensors, maps = _inputs(T=40, seed=4, dtype=torch.bfloat16)
    doc_start, reset = _layout(2, 40, [[20], []])
    _compare(tensors, maps, doc_start, reset, dtype=torch.bfloat16, window=8, num_sinks=2, scale=0.25, softcap=5.0,
             chunk_size=16)


def test_routing_to_the_existing_path():
    """``triton`` only where it computes the call: forward only, gated memory, no cache continuation, CUDA or the
    interpreter; ``auto`` is ``native`` until the kernel is measured; the native op also takes the ungated memory."""
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert choose_kernel("mixer", KernelOptions(), device) == "native"
    cuda = torch.device("cuda")
    assert choose_kernel("mixer", TRITON, cuda) == "triton"
    assert choose_kernel("mixer", TRITON, cuda, needs_grad=True) == "native"
    assert choose_kernel("mixer", TRITON, cuda, gated=False) == "native"
    assert choose_kernel("mixer", TRITON, cuda, continues_cache=True) == "native"
    assert choose_kernel("mixer", TRITON, cuda, head_dim=128) == "triton"
    assert choose_kernel("mixer", TRITON, cuda, head_dim=256) == "native"  # Gemma's 256: tiles too large
    # ungated (linear attention + output gate): the op takes (B, NH, T) gates and runs the reference
    (q, k, v, gates), maps = _inputs(B=1, T=20)
    doc_start, reset = _layout(1, 20, [[]])
    y, _ = kernels.mixer(q, k, v, gates[:, -4:], maps, doc_start, reset, options=TRITON, window=4, num_sinks=1,
                         scale=0.25)
    ref, _ = kernels.mixer(q, k, v, gates[:, -4:], maps, doc_start, reset, options=NATIVE, window=4, num_sinks=1,
                           scale=0.25)
    torch.testing.assert_close(y, ref)
    # with gradients: the reference runs (and differentiates)
    q.requires_grad_()
    y, _ = kernels.mixer(q, k, v, gates, maps, doc_start, reset, options=TRITON, window=4, num_sinks=1, scale=0.25)
    y.sum().backward()
    assert q.grad is not None


def test_bad_inputs_are_refused_with_the_fix():
    (q, k, v, gates), maps = _inputs(B=1, T=20)
    doc_start, reset = _layout(1, 20, [[]])
    with pytest.raises(ValueError, match=r"gates must be \(B, 3\*NH, T\)"):
        kernels.mixer(q, k, v, gates[:, :5], maps, doc_start, reset, window=4, num_sinks=1, scale=0.25)
    with pytest.raises(ValueError, match="k and v must be"):
        kernels.mixer(q, k[:, :, :10], v, gates, maps, doc_start, reset, window=4, num_sinks=1, scale=0.25)
    with pytest.raises(ValueError, match="doc_start must be"):
        kernels.mixer(q, k, v, gates, maps, doc_start[:, :5], reset, window=4, num_sinks=1, scale=0.25)
    with pytest.raises(ValueError, match="kernels.mixer='fused' is not a registered implementation"):
        KernelOptions(mixer="fused")


def test_custom_operator_traces_with_its_fake_implementation():
    """The custom operator passes torch.library.opcheck (schema, fake tensors, AOT dispatch); torch.compile(fullgraph
    =True) sees it as one call with the fake's shapes and strides (on CPU with aot_eager: the op runs as it is, the
    graph around it is traced)."""
    tensors, maps = _inputs(B=1, T=20)
    doc_start, reset = _layout(1, 20, [[9]])

    def run(*args):
        return kernels.mixer(*args, maps, doc_start, reset, options=TRITON, window=4, num_sinks=1, scale=0.25,
                             chunk_size=16)

    state = (torch.zeros(1, 4, 32, 16, device=DEVICE), torch.zeros(1, 4, 32, device=DEVICE),
             torch.zeros(1, 4, device=DEVICE))
    torch.library.opcheck(torch.ops.xlstm_distill.mixer_forward, (*tensors, *maps, doc_start, reset, *state, 4, 1, 0.25,
                                                                  None, 16))
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="inductor" if CUDA_AVAILABLE else "aot_eager")
    (y, state), (ref, ref_state) = compiled(*tensors), run(*tensors)
    assert y.stride() == ref.stride()
    for a, b in zip((y, *state), (ref, *ref_state)):
        torch.testing.assert_close(a, b)


def _student(mixer: str, options: KernelOptions, **config) -> xd.HybridForCausalLM:
    student = xd.convert(tiny_teacher("llama"), xd.HybridConfig(mixer=mixer, window_size=8, num_sink_tokens=2,
                                                                chunk_size=16, kernels=options, **config))
    perturb_new_parameters(student)
    return student.to(DEVICE)


def _count_kernel_calls(monkeypatch) -> list:
    """A list that gets one entry per launch of the fused kernels."""
    from xlstm_distill.kernels import mixer_triton

    calls, launch = [], mixer_triton.mixer_forward
    monkeypatch.setattr(mixer_triton, "mixer_forward", lambda *args: calls.append(1) or launch(*args))
    return calls


def test_student_forward_with_the_fused_mixer_equals_native(monkeypatch):
    """A whole student (2 layers, GQA) with kernels.mixer='triton' gives the logits of today's path, on packed
    documents and on a prefill that fills the cache, after which decoding continues (on the existing path) as
    without the fused kernel."""
    calls = _count_kernel_calls(monkeypatch)
    fused, native = _student("mlstm_swa", STUDENT_TRITON), _student("mlstm_swa", STUDENT_NATIVE)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    doc_ids = torch.tensor([[0] * 13 + [1] * 6 + [2] * 11, [0] * 30], device=DEVICE)
    with torch.no_grad():
        got, want = fused(ids, document_ids=doc_ids).logits, native(ids, document_ids=doc_ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        outs = []
        for model in (fused, native):
            out = model(ids[:, :20], use_cache=True)
            step = model(ids[:, 20:21], past_key_values=out.past_key_values, use_cache=True)
            outs.append(torch.cat([out.logits, step.logits], 1))
    torch.testing.assert_close(*outs, atol=1e-4, rtol=1e-4)
    assert len(calls) == 4  # two layers, two full forwards; the decode step ran the existing path


def test_student_with_gradients_or_an_ungated_memory_keeps_the_existing_path(monkeypatch):
    """Training (gradients) and linear_swa run today's kernels under kernels.mixer='triton': same logits."""
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for mixer in ("mlstm_swa", "linear_swa"):
        fused, native = _student(mixer, STUDENT_TRITON), _student(mixer, STUDENT_NATIVE)
        got = fused(ids).logits
        got.sum().backward()  # the existing path differentiates
        torch.testing.assert_close(got, native(ids).logits, atol=1e-5, rtol=1e-5)
    assert not calls


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_llama_shape_on_cuda(dtype, packed):
    """Llama-3.1-8B heads (32 / 8 x 128), 1,000 tokens (not a multiple of the chunk), window 128, 4 sinks, a batch
    of two, compiled Triton kernels; packed rows have documents of 1 to 300 tokens."""
    tensors, maps = _inputs(B=2, NH=32, NKV=8, T=1000, DH=128, DF=128, seed=5, dtype=dtype)
    starts = [[1, 2, 64, 300, 301, 777], [128, 500]] if packed else [[], []]
    doc_start, reset = _layout(2, 1000, starts)
    _compare(tensors, maps, doc_start, reset, dtype=dtype, window=128, num_sinks=4, scale=128 ** -0.5,
             chunk_size=64)


@needs_cuda
@pytest.mark.cuda
def test_llama_shape_compiled_model_on_cuda():
    """bf16, inside a torch.compile'd function with a state (as a compiled model calls it), against eager."""
    tensors, maps = _inputs(B=1, NH=32, NKV=8, T=777, DH=128, DF=128, seed=6, dtype=torch.bfloat16)
    doc_start, reset = _layout(1, 777, [[400]])
    reset[:, 0] = False  # the first document continues the state
    g = torch.Generator().manual_seed(7)
    state = MLSTMState(torch.randn(1, 32, 128, 128, generator=g).cuda() * 0.01,
                       torch.rand(1, 32, 128, generator=g).cuda(), torch.zeros(1, 32, device="cuda"))

    def run(*args):
        return kernels.mixer(*args, maps, doc_start, reset, state, options=TRITON, window=256, num_sinks=4,
                             scale=128 ** -0.5, softcap=30.0)

    torch._dynamo.reset()
    y, last = torch.compile(run, fullgraph=True)(*tensors)
    ref, ref_last = kernels.mixer(*(x.float() for x in tensors), maps, doc_start, reset, state, options=NATIVE,
                                  window=256, num_sinks=4, scale=128 ** -0.5, softcap=30.0)
    errors = [_rel(y, ref)] + [_rel(a, b) for a, b in zip(last, ref_last)]
    assert all(e < TOL[torch.bfloat16] for e in errors), errors
