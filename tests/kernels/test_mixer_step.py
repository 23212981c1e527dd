"""The fused decode step of the whole mixer (``mixer_step``, implementation ``triton``) against the native reference
(the unfused step), and the student decoding through it.

Without a GPU the Triton kernel runs in Triton's interpreter on CPU tensors (``tests/conftest.py``); with one, the same
tests run it compiled on CUDA, and the ``cuda`` tests add the compiled, CUDA-graphed decode step. On the GPU:
``python -m pytest -q tests/kernels/test_mixer_step.py``."""

import contextlib
import math

import pytest
import torch

import xlstm_distill as xd
from helpers import perturb_new_parameters, tiny_teacher
from xlstm_distill import kernels
from xlstm_distill.kernels import KernelOptions, MLSTMState, choose_kernel, kernel_names
from xlstm_distill.kernels.mixer_step_native import mixer_step_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NATIVE, TRITON = KernelOptions(mixer_step="native"), KernelOptions(mixer_step="triton")
FP32 = dict(atol=2e-5, rtol=2e-4)
BF16 = 2e-2  # relative error (norm) from the float32 computation on the same bf16 inputs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def _slot_positions(length: int, sinks: int, slots: int) -> list[int]:
    """Positions the cache's sink and ring slots hold after ``length`` tokens of a document (-1: empty); the ring slot
    of position p is p mod slots (as ``modeling.cache._slot_plan``)."""
    sink = [j if j < length else -1 for j in range(sinks)]
    ring = []
    for s in range(slots):
        p = length - 1 - (length - 1 - s) % slots
        ring.append(p if p >= sinks and p >= 0 else -1)
    return sink + ring


def _inputs(B, NH, NKV, DH, DF, S, W, gated, lengths, dtype=torch.float32, empty_row=None, seed=0):
    """Random step inputs; row b continues a document of ``lengths[b]`` tokens (its cache slots filled as the
    model's cache fills them); ``empty_row``: that row's state has seen no token (C = n = 0, m = -inf)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    q, k, v = rand(B, NH, DH), rand(B, NKV, DH), rand(B, NKV, DH)
    gates = torch.cat([torch.randn(B, NH, generator=g), torch.randn(B, NH, generator=g) + 3,
                       torch.randn(B, NH, generator=g)] if gated else [torch.randn(B, NH, generator=g)], 1)
    gates = gates.to(DEVICE, dtype)
    maps = (rand(NH, DH, DF, scale=0.5), rand(NH, DF, scale=0.5), rand(NH, DH, DF, scale=0.5), rand(NH, DF, scale=0.5))
    C = torch.randn(B, NH, DF, DH, generator=g) * 0.3
    n = torch.rand(B, NH, DF, generator=g)
    m = torch.randn(B, NH, generator=g) * 2
    if empty_row is not None:
        C[empty_row], n[empty_row], m[empty_row] = 0.0, 0.0, -math.inf
    state = MLSTMState(C.to(DEVICE), n.to(DEVICE), m.to(DEVICE))
    cache = [rand(B, NKV, S, DH), rand(B, NKV, S, DH), rand(B, NKV, W, DH), rand(B, NKV, W, DH)]
    key_pos = torch.tensor([_slot_positions(n_tokens, S, W) for n_tokens in lengths], device=DEVICE)
    position = torch.tensor(lengths, device=DEVICE)
    return (q, k, v, gates, maps, state, *cache, key_pos, position)


def _cast(args, dtype):
    """The same inputs in ``dtype`` (the float32 state and the positions keep theirs)."""
    def cast(x):
        if isinstance(x, MLSTMState):
            return x
        if isinstance(x, tuple):
            return tuple(cast(y) for y in x)
        return x.to(dtype) if x.is_floating_point() else x

    return tuple(cast(x) for x in args)


# B, NH, NKV, DH, DF, sinks, ring slots (= window), gated, softcap, document length before the step of every row
CASES = {
    "gqa-partly-empty-and-wrapped": (2, 4, 2, 16, 16, 2, 8, True, None, (3, 20)),
    "mha-df-below-dh-no-sinks-softcap": (1, 3, 3, 24, 12, 0, 6, True, 0.5, (9,)),
    "mqa-ungated-df-above-dh-softcap": (2, 4, 1, 8, 32, 4, 16, False, 30.0, (1, 40)),
    "several-key-blocks-first-steps": (3, 2, 1, 16, 8, 2, 40, True, None, (2, 41, 100)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_step_equals_the_native_step_float32(case):
    B, NH, NKV, DH, DF, S, W, gated, softcap, lengths = CASES[case]
    args = _inputs(B, NH, NKV, DH, DF, S, W, gated, lengths, empty_row=0 if gated else None)
    kw = dict(gated=gated, window=W, num_sinks=S, scale=DH ** -0.5, softcap=softcap)
    want, want_state = mixer_step_reference(*args, **kw, options=NATIVE)
    got, got_state = kernels.mixer_step(*args, **kw, options=TRITON)
    assert got.shape == (B, NH, DH) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **FP32)
    for name, a, b in zip("Cnm", got_state, want_state):
        torch.testing.assert_close(a, b, **FP32, msg=lambda text: f"{name}: {text}")
    assert args[5].C is not got_state.C  # a new state: the input state is left as it was


@pytest.mark.parametrize("case", ["gqa-partly-empty-and-wrapped", "mqa-ungated-df-above-dh-softcap"])
def test_triton_step_bfloat16(case):
    """bf16 model tensors (the state stays float32): the fused step (float32 inside) is as close to the float32
    computation on the same inputs as the native bf16 step is."""
    B, NH, NKV, DH, DF, S, W, gated, softcap, lengths = CASES[case]
    args = _cast(_inputs(B, NH, NKV, DH, DF, S, W, gated, lengths), torch.bfloat16)
    kw = dict(gated=gated, window=W, num_sinks=S, scale=DH ** -0.5, softcap=softcap)
    truth, truth_state = mixer_step_reference(*_cast(args, torch.float32), **kw, options=NATIVE)
    native, _ = mixer_step_reference(*args, **kw, options=NATIVE)
    got, got_state = kernels.mixer_step(*args, **kw, options=TRITON)
    assert got.dtype == torch.bfloat16 and got_state.C.dtype == torch.float32
    assert _rel(got, truth) < BF16 and _rel(native, truth) < BF16, (_rel(got, truth), _rel(native, truth))
    assert all(_rel(a, b) < BF16 for a, b in zip(got_state[:2], truth_state[:2]))


def test_ring_loop_unrolled_or_not(monkeypatch):
    """Long rings run the ring loop as a loop (short ones unrolled): the same function."""
    from xlstm_distill.kernels import mixer_step_triton

    B, NH, NKV, DH, DF, S, W, gated, softcap, lengths = CASES["several-key-blocks-first-steps"]
    args = _inputs(B, NH, NKV, DH, DF, S, W, gated, lengths)
    kw = dict(gated=gated, window=W, num_sinks=S, scale=DH ** -0.5, softcap=softcap)
    unrolled, _ = kernels.mixer_step(*args, **kw, options=TRITON)
    monkeypatch.setattr(mixer_step_triton, "MAX_UNROLLED_BLOCKS", 1)
    assert not mixer_step_triton.launch_constants(NH, NKV, DH, DF, S, W, gated, False)["UNROLL_RING"]
    looped, _ = kernels.mixer_step(*args, **kw, options=TRITON)
    torch.testing.assert_close(looped, unrolled, **FP32)


def test_window_rule_on_arbitrary_slot_positions():
    """Slots holding any positions (future ones, stale ones outside the window, sinks past the sink count, empty):
    the kernel's mask is the reference's."""
    B, NH, NKV, DH, DF, S, W = 2, 2, 1, 8, 8, 3, 12
    args = list(_inputs(B, NH, NKV, DH, DF, S, W, True, (30, 30)))
    g = torch.Generator().manual_seed(1)
    args[10] = torch.randint(-1, 40, (B, S + W), generator=g).to(DEVICE)  # key_pos
    args[11] = torch.tensor([30, 13], device=DEVICE)  # position
    kw = dict(gated=True, window=5, num_sinks=2, scale=0.3, softcap=None)
    want, _ = mixer_step_reference(*args, **kw, options=NATIVE)
    got, _ = kernels.mixer_step(*args, **kw, options=TRITON)
    torch.testing.assert_close(got, want, **FP32)


def test_registry_and_options():
    """``auto`` is the unfused step until the GPU measures the fused one; ``triton`` runs where Triton does (CUDA, or
    the interpreter on CPU), never with gradients."""
    assert set(kernel_names("mixer_step")) == {"native", "triton"}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_kernel("mixer_step", KernelOptions(), cuda) == "native"
    assert choose_kernel("mixer_step", TRITON, cuda) == "triton"
    assert choose_kernel("mixer_step", TRITON, cuda, needs_grad=True) == "native"
    assert choose_kernel("mixer_step", TRITON, cpu) == ("triton" if DEVICE.type == "cpu" else "native")
    with pytest.raises(ValueError, match="kernels.mixer_step='fused' is not a registered implementation"):
        KernelOptions(mixer_step="fused")


def test_bad_inputs_are_refused_with_the_fix():
    args = list(_inputs(1, 4, 2, 8, 8, 2, 4, True, (5,)))
    kw = dict(gated=True, window=4, num_sinks=2, scale=0.3, softcap=None)
    with pytest.raises(ValueError, match=r"gates must be \(B, NH\): the output gate's pre-activations"):
        kernels.mixer_step(*args, **{**kw, "gated": False}, options=TRITON)
    bad = list(args)
    bad[0] = args[0][:, :, None]
    with pytest.raises(ValueError, match="take the token axis out"):
        kernels.mixer_step(*bad, **kw, options=TRITON)
    bad = list(args)
    bad[5] = MLSTMState(args[5].C[..., :4], *args[5][1:])
    with pytest.raises(ValueError, match=r"the mLSTM state must be C \(B, NH, DF, DH\)"):
        kernels.mixer_step(*bad, **kw, options=TRITON)


def test_custom_operator_passes_opcheck():
    """The operator's schema, fake implementation (what torch.compile and graph capture see) and real outputs agree."""
    args = _inputs(2, 4, 2, 8, 8, 2, 4, True, (2, 9))
    q, k, v, gates, maps, state, *cache, key_pos, position = args
    flat = (q, k, v, gates, *maps, *state, *cache, key_pos, position, True, 4, 2, 0.3, None)
    torch.library.opcheck(torch.ops.xlstm_distill.mixer_step.default, flat,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# The whole student: cached decoding through the fused step equals the unfused one.
STUDENTS = {
    "llama-mlstm_swa": ("llama", "mlstm_swa", {}),
    "llama-linear_swa-feature-dim": ("llama", "linear_swa", {"feature_dim": 8}),
    "gemma2-softcap": ("gemma2", "mlstm_swa", {}),
}


def student_of(mixer: str, family: str, **config) -> xd.HybridForCausalLM:
    """A tiny student (4 query / 2 KV heads of 16, 2 layers; window 8, 2 sinks) with random mixer parameters."""
    student = xd.convert(tiny_teacher(family), xd.HybridConfig(mixer=mixer, window_size=8, num_sink_tokens=2,
                                                                chunk_size=4, **config))
    perturb_new_parameters(student)
    return student.to(DEVICE)


def tokens(B: int, T: int) -> torch.Tensor:
    return torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def _decode(student, ids, prompt, options, compile=False, use_graph=False, steps_guard=contextlib.nullcontext):
    """Logits of every step after a prefill of ``prompt`` tokens, under ``options``; ``steps_guard()`` is entered
    around the decoder and its steps (not the prefill)."""
    from xlstm_distill.modeling.decode import StaticDecoder

    assert choose_kernel("mixer_step", options, DEVICE) == options.mixer_step  # the kernel asked for runs
    student.config.kernels = options
    with torch.no_grad():
        cache = student(ids[:, :prompt], use_cache=True).past_key_values
    with steps_guard():
        decoder = StaticDecoder(student, cache, use_graph=use_graph, compile=compile)
        return torch.stack([decoder.step(ids[:, t:t + 1]).clone() for t in range(prompt, ids.shape[1])], 1)


@pytest.mark.parametrize("name", list(STUDENTS))
def test_student_decodes_the_same_through_the_fused_step(name):
    """Window 8 and 2 sinks, a 7-token prompt, two rows: the ring buffer is partly empty (the step after 7 tokens),
    then full (10), then wraps (11)."""
    family, mixer, extra = STUDENTS[name]
    student = student_of(mixer, family, **extra)
    ids = tokens(2, 12)
    want = _decode(student, ids, 7, NATIVE)
    got = _decode(student, ids, 7, TRITON)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_decode_step_with_the_fused_kernel_traces_as_one_graph():
    """torch.compile sees the fused step as one operator: the whole decode step is one graph, no break."""
    from xlstm_distill.modeling.decode import StaticDecoder

    student = student_of("mlstm_swa", "llama")
    student.config.kernels = TRITON
    ids = tokens(2, 8)
    with torch.no_grad():
        cache = student(ids, use_cache=True).past_key_values
    torch._dynamo.reset()
    explained = torch._dynamo.explain(StaticDecoder(student, cache, use_graph=False)._step)()
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    ops = [str(node.target) for graph in explained.graphs for node in graph.graph.nodes]
    assert sum("mixer_step" in op for op in ops) == student.config.num_hidden_layers, ops


# CUDA only: the kernel compiled for the GPU at a real shape, inside torch.compile, and in the graphed decode step.
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("shape", ["llama3.1-8b", "gemma2-9b"])
def test_triton_step_at_model_shapes_on_cuda(shape, gated, dtype):
    """Llama-3.1-8B's layer (32 / 8 heads of 128, window 512, 4 sinks) and Gemma 2 9B's (16 / 8 heads of 256,
    soft-capped): eager and inside torch.compile(fullgraph=True)."""
    NH, NKV, DH, softcap = (32, 8, 128, None) if shape == "llama3.1-8b" else (16, 8, 256, 50.0)
    args = _inputs(2, NH, NKV, DH, DH, 4, 512, gated, (100, 2000), empty_row=None)
    args = _cast(args, dtype)
    kw = dict(gated=gated, window=512, num_sinks=4, scale=DH ** -0.5, softcap=softcap)
    truth, truth_state = mixer_step_reference(*_cast(args, torch.float32), **kw, options=NATIVE)
    got, got_state = kernels.mixer_step(*args, **kw, options=TRITON)

    def step(*x):
        return kernels.mixer_step(*x, **kw, options=TRITON)

    compiled, _ = torch.compile(step, fullgraph=True)(*args)
    if dtype == torch.float32:
        torch.testing.assert_close(got, truth, **FP32)
        for a, b in zip(got_state, truth_state):
            torch.testing.assert_close(a, b, **FP32)
    else:
        assert _rel(got, truth) < BF16 and all(_rel(a, b) < BF16 for a, b in zip(got_state[:2], truth_state[:2]))
    torch.testing.assert_close(compiled, got, atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(STUDENTS))
def test_compiled_graphed_decode_through_the_fused_step_on_cuda(name):
    """``StaticDecoder(compile=True)`` replayed as a CUDA graph with ``mixer_step=triton`` equals the eager unfused
    step, compiled once for every step (the prefill before it may compile FlexAttention once per window: Gemma 2's
    kept sliding layers have the teacher's)."""
    family, mixer, extra = STUDENTS[name]
    student = student_of(mixer, family, **extra)
    ids = tokens(2, 24)
    want = _decode(student, ids, 6, NATIVE)
    torch._dynamo.reset()
    got = _decode(student, ids, 6, TRITON, compile=True, use_graph=True,
                  steps_guard=lambda: torch._dynamo.config.patch(error_on_recompile=True))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


COMPILE_FOR_SM90 = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from xlstm_distill.kernels.mixer_step_kernel import mixer_step_kernel as kernel
from xlstm_distill.kernels.mixer_step_triton import launch_constants

for DH, W, gated, softcap in ((128, 512, True, False), (256, 512, False, True), (64, 4096, True, False)):
    const = launch_constants(NH=16, NKV=8, DH=DH, DF=DH, S=4, W=W, gated=gated, softcap=softcap)
    assert const["UNROLL_RING"] == (DH <= 128 and W == 512)  # both forms of the ring loop
    warps = const.pop("num_warps")
    floats, pointers = ("scale", "softcap", "eps"), {"key_pos_ptr": "*i64", "pos_ptr": "*i64"}
    state = ("C_ptr", "n_ptr", "m_ptr", "C_out_ptr", "n_out_ptr", "m_out_ptr")
    signature = {name: "constexpr" if name in const else pointers.get(name, "*fp32" if name in state else "*bf16")
                 if name.endswith("_ptr") else "fp32" if name in floats else "i32" for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in const.items()})
    assert "cubin" in compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps)).asm
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernel")
def test_kernel_compiles_for_sm90_without_a_gpu():
    """Triton's compiler (with its own ptxas) builds the kernel for an H100 / H200 (sm_90) without a GPU: the
    interpreter runs Python semantics, this checks what only the compiler checks (types of loop-carried values,
    constexpr branches)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
