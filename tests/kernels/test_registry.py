"""The kernel dispatch: every operation has one signature; each registered implementation is chosen by its name (and
``auto`` by the device), and every implementation of an operation computes what the native one does."""

import pytest
import torch

from xlstm_distill import kernels
from xlstm_distill.kernels import KernelOptions, MLSTMState, choose_kernel, get_kernel, kernel_names

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_registered_implementations():
    assert set(kernel_names("mlstm")) == {"native", "tfla", "triton", "recurrent"}
    assert set(kernel_names("swa")) == {"native", "flex"}
    assert kernel_names("mlstm_step") == ("native",) and kernel_names("swa_cached") == ("native",)
    with pytest.raises(ValueError, match="No swa kernel named 'fast'; registered: native, flex"):
        get_kernel("swa", "fast")
    with pytest.raises(ValueError, match="Unknown kernel operation 'attention'"):
        get_kernel("attention", "native")


@pytest.mark.parametrize("name", ["native", "tfla", "triton", "recurrent", "auto"])
def test_choose_mlstm(name):
    """An explicit name is taken on any device (tfla: mlstm_kernels' PyTorch twin on CPU; triton: Triton's
    interpreter); auto picks tfla on CUDA, native on CPU; an ungated memory (linear attention) runs native whatever
    tfla or triton was asked for."""
    options = KernelOptions(mlstm=name)
    assert choose_kernel("mlstm", options, CPU) == ("native" if name == "auto" else name)
    assert choose_kernel("mlstm", options, CUDA) == ("tfla" if name == "auto" else name)
    assert choose_kernel("mlstm", options, CUDA, gated=False) == ("native" if name in ("auto", "tfla", "triton") else name)


@pytest.mark.parametrize("name", ["native", "flex", "auto"])
def test_choose_swa(name):
    """auto: flex on CUDA, native on CPU; flex on CPU only without gradients (FlexAttention has no CPU backward)."""
    options = KernelOptions(swa=name)
    assert choose_kernel("swa", options, CUDA) == ("flex" if name == "auto" else name)
    assert choose_kernel("swa", options, CPU) == ("native" if name == "auto" else name)
    assert choose_kernel("swa", options, CPU, needs_grad=True) == "native"
    assert choose_kernel("swa_cached", options, CUDA) == "native"


def test_options_are_validated():
    with pytest.raises(ValueError, match="kernels.mlstm='fused' is not a registered implementation"):
        KernelOptions(mlstm="fused")
    with pytest.raises(ValueError, match="kernels.tfla_min_chunk must be a power of two >= 64"):
        KernelOptions(tfla_min_chunk=96)
    with pytest.raises(ValueError, match="kernels: unknown key\\(s\\) copy; valid keys of kernels: mlstm, swa"):
        KernelOptions.of({"copy": "rows"})
    with pytest.raises(ValueError, match="kernels.keep_chunk_states must be true or false"):
        KernelOptions(keep_chunk_states="yes")


def _mlstm_inputs(gated: bool, B=2, NH=3, S=40, D=8):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, NH, S, D, generator=g).softmax(-1) for _ in "qk")
    v = torch.randn(B, NH, S, D, generator=g)
    i, f = (torch.randn(B, NH, S, generator=g), torch.randn(B, NH, S, generator=g) + 3) if gated else (None, None)
    reset = torch.zeros(B, S, dtype=torch.bool)
    reset[:, 0] = reset[1, 17] = True
    return q, k, v, i, f, reset


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("name", ["tfla", "recurrent"])
def test_every_mlstm_implementation_computes_the_native_function(name, gated):
    """Through the operation (the model's call), each implementation gives the native output and final state, with
    document resets and a continued state; ``mlstm_step`` continues them one token at a time."""
    q, k, v, i, f, reset = _mlstm_inputs(gated)
    cut = 25

    def run(options):
        first, state = kernels.mlstm(*(x[:, :, :cut] if x is not None else None for x in (q, k, v, i, f)),
                                     reset=reset[:, :cut], chunk_size=16, options=options)
        rest, state = kernels.mlstm(*(x[:, :, cut:] if x is not None else None for x in (q, k, v, i, f)), state,
                                    reset[:, cut:], chunk_size=16, options=options)
        return torch.cat([first, rest], 2), state

    want, want_state = run(KernelOptions(mlstm="native"))
    got, got_state = run(KernelOptions(mlstm=name))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for a, b in zip(got_state, want_state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    step = lambda x: None if x is None else x[:, :, -1]  # noqa: E731
    h, _ = kernels.mlstm_step(step(q), step(k), step(v), step(i), step(f),
                              MLSTMState(*kernels.mlstm(*(x[:, :, :-1] if x is not None else None
                                                          for x in (q, k, v, i, f)), reset=reset[:, :-1])[1]))
    torch.testing.assert_close(h, want[:, :, -1], atol=1e-5, rtol=1e-4)


def test_swa_implementations_and_the_cached_form_agree():
    """swa: flex (eager FlexAttention on CPU, no gradients) equals native on packed rows; swa_cached over all keys
    equals the full forward's last tokens."""
    g = torch.Generator().manual_seed(0)
    B, NH, NKV, T, D, W, S = 2, 4, 2, 50, 8, 8, 2
    q = torch.randn(B, NH, T, D, generator=g)
    k, v = (torch.randn(B, NKV, T, D, generator=g) for _ in "kv")
    doc_start = torch.zeros(B, T, dtype=torch.long)
    doc_start[1, 20:] = 20
    args = dict(window=W, num_sinks=S, scale=D**-0.5)
    with torch.no_grad():
        want = kernels.swa(q, k, v, doc_start, options=KernelOptions(swa="native"), **args)
        got = kernels.swa(q, k, v, doc_start, options=KernelOptions(swa="flex"), **args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pos = (torch.arange(T) - doc_start)  # (B, T) positions in each document
    row = 0
    cached = kernels.swa_cached(q[row:row + 1, :, -3:], pos[row:row + 1, -3:], k[row:row + 1], v[row:row + 1],
                                pos[row:row + 1], **args)
    torch.testing.assert_close(cached, want[row:row + 1, :, -3:], atol=1e-5, rtol=1e-5)
