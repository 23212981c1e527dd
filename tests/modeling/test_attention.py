"""The memory branch + mix as one pure function: compiled (CUDA's path, compiled on CPU here) against eager."""

import torch

from xlstm_distill.kernels import KernelOptions
from xlstm_distill.modeling.attention import MemorySpec, _compiled_memory_and_mix, memory_and_mix

B, NH, NKV, T, D = 2, 4, 2, 160, 16
TFLA = KernelOptions(mlstm="tfla")  # on CPU: mlstm_kernels' PyTorch twin, as a custom operator


def _inputs(seed: int, T: int = T) -> list:
    """q, k, v, gates, swa, the feature maps' weights and biases, reset; every floating tensor a leaf."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, T, D, generator=g)
    k, v = (torch.randn(B, NKV, T, D, generator=g) for _ in "kv")
    gates = torch.randn(B, 3 * NH, T, generator=g) + torch.tensor([0.0] * NH + [3.0] * NH + [0.0] * NH)[:, None]
    swa = torch.randn(B, NH, T, D, generator=g)
    maps = [torch.eye(D) + 0.3 * torch.randn(NH, D, D, generator=g), 0.1 * torch.randn(NH, D, generator=g)] * 2
    leaves = [x.requires_grad_() for x in (q, k, v, gates, swa, *maps)]
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = reset[1, T // 2] = True  # two documents in the second row
    return leaves + [reset]


def _run(fn, inputs: list) -> list[torch.Tensor]:
    """Output, final state and the gradients of every leaf under a fixed random output gradient."""
    q, k, v, gates, swa, *maps, reset = inputs
    y, state = fn(q, k, v, gates, swa, tuple(maps), None, reset, MemorySpec(NH, gated=True, step=False, chunk_size=64, options=TFLA))
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((y * cotangent).sum(), inputs[:-1])
    return [y.detach(), *state, *grads]


def test_compiled_memory_and_mix_matches_eager_and_compiles_once_for_all_layers():
    """Through torch.compile (the TFLA kernel a custom operator, here mlstm_kernels' PyTorch twin) the output, the final
    state and all gradients equal the eager function's; a second layer (other weights, same shapes) reuses the
    compiled graphs (a recompile per layer would run past dynamo's recompile limit in a 32-layer model)."""
    torch._dynamo.reset()
    compiled = _compiled_memory_and_mix()
    inputs = _inputs(0)
    for got, want in zip(_run(compiled, inputs), _run(memory_and_mix, inputs)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert _run(compiled, inputs)[0].transpose(1, 2).is_contiguous()  # (B, T, NH, D): o_proj's input is a view
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = _inputs(1)
        for got, want in zip(_run(compiled, second), _run(memory_and_mix, second)):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_compiled_memory_and_mix_serves_new_lengths_without_compiling():
    """Prompts of many lengths (generation): from the second length on the graphs have a symbolic length, and later
    lengths run through them (no compilation) with the eager function's results."""
    torch._dynamo.reset()
    compiled = _compiled_memory_and_mix()
    for n, length in enumerate((100, 160, 333, 250)):
        with torch._dynamo.config.patch(error_on_recompile=n >= 2):
            inputs = _inputs(n, length)
            for got, want in zip(_run(compiled, inputs), _run(memory_and_mix, inputs)):
                torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
