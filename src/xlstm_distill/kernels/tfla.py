"""mLSTM through NX-AI's `mlstm_kernels` (optional extra ``xlstm-distill[gpu]``): TFLA Triton kernels on CUDA.

Same function as :func:`xlstm_distill.kernels.mlstm.mlstm_chunkwise` (tested against it), with three adaptations:
- `mlstm_kernels` scales q by DHQK^-0.5 internally; our feature maps own the scale, so q is multiplied back.
- it takes the forget gate *pre-activation* (logsigmoid inside), and float32 gates (bf16 gates crash Triton 3.6).
- it needs a length divisible by the chunk size: the tail is padded with tokens that write nothing (input gate -30)
  and keep the state (forget pre-activation +30), so outputs and the final state are unchanged.
Its launch grid has B * NH * S / chunk programs on CUDA's third axis (at most 65,535): longer inputs are run in groups
of heads (independent of each other), e.g. 128K tokens x 32 heads in two calls.
Document resets (packed sequences) are forget gates of -100 at the first token of a document: the old state is
scaled by exp(-100) (0 in float32 next to the new document's terms), so the kernel needs no reset support.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from xlstm_distill.kernels.mlstm import MLSTMState

CUDA_KERNEL = "chunkwise--triton_xl_chunk"
CPU_KERNEL = "chunkwise--native_autograd"  # the same algorithm in PyTorch: lets the adapter be tested on CPU
PAD_INPUT_GATE, PAD_FORGET_GATE = -30.0, 30.0
RESET_FORGET_GATE = -100.0
MAX_GRID_Z = 65_535  # CUDA's limit on a launch grid's third dimension


def available() -> bool:
    return importlib.util.find_spec("mlstm_kernels") is not None


def mlstm_tfla(
    q: torch.Tensor,  # (B, NH, S, DHQK)
    k: torch.Tensor,  # (B, NH, S, DHQK)
    v: torch.Tensor,  # (B, NH, S, DHV)
    i: torch.Tensor,  # (B, NH, S) input gate pre-activation
    f: torch.Tensor,  # (B, NH, S) forget gate pre-activation (not its logsigmoid)
    state: MLSTMState | None = None,
    chunk_size: int = 64,
    reset: torch.Tensor | None = None,  # (B, S) bool, True at the first token of a document
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM via `mlstm_kernels`. Returns h (B, NH, S, DHV) and the final state."""
    from mlstm_kernels.torch import get_mlstm_kernel

    kernel = get_mlstm_kernel(CUDA_KERNEL if q.is_cuda else CPU_KERNEL)
    B, NH, S, DHQK = q.shape
    if q.is_cuda:  # the Triton kernel takes S in {16, 32, 64} or a multiple of 128, chunks a multiple of 64
        chunk = 64 * max(1, -(-chunk_size // 64))
        pad = (1 << max(4, (S - 1).bit_length())) - S if S <= 64 else -S % math.lcm(128, chunk)
    else:
        chunk = min(chunk_size, S)
        pad = -S % chunk
    i, f = i.float(), f.float()
    if reset is not None:
        f = torch.where(reset[:, None, :], RESET_FORGET_GATE, f)
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        i = torch.nn.functional.pad(i, (0, pad), value=PAD_INPUT_GATE)
        f = torch.nn.functional.pad(f, (0, pad), value=PAD_FORGET_GATE)
    kernel_args = (q * math.sqrt(DHQK), k, v, i, f)
    initial = () if state is None or not torch.isfinite(state.m).all() else (state.C, state.n, state.m)
    rows = max(1, MAX_GRID_Z // max(1, (S + pad) // chunk))  # (B * NH) rows per call
    if rows >= B * NH:
        h, last = _call(kernel, kernel_args, initial, chunk)
    else:  # heads in groups that fit the launch grid
        flat = [x.flatten(0, 1).unsqueeze(1) for x in (*kernel_args, *initial)]  # (B * NH, 1, ...)
        parts = [_call(kernel, group[:5], group[5:], chunk) for group in zip(*(x.split(rows) for x in flat))]
        h = torch.cat([p[0] for p in parts]).view(B, NH, S + pad, -1)
        last = tuple(torch.cat([p[1][n] for p in parts]).view(B, NH, *parts[0][1][n].shape[2:]) for n in range(3))
    C, n, m = last
    return h[:, :, :S], MLSTMState(C.float(), n.float(), m.float())


def _call(kernel, args: tuple[torch.Tensor, ...], initial: tuple[torch.Tensor, ...], chunk: int):
    """One kernel call: h (B, NH, S, DHV) and the last (C, n, m) with m as (B, NH)."""
    states = {} if not initial else dict(c_initial=initial[0], n_initial=initial[1], m_initial=initial[2].unsqueeze(-1))
    h, (C, n, m) = kernel(*args, return_last_states=True, chunk_size=chunk, **states)
    return h, (C, n, m.squeeze(-1))
