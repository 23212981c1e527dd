"""mLSTM through NX-AI's `mlstm_kernels` (optional extra ``xlstm-distill[gpu]``): TFLA Triton kernels on CUDA.

Same function as :func:`xlstm_distill.kernels.mlstm.mlstm_chunkwise` (tested against it), with three adaptations:
- `mlstm_kernels` scales q by DHQK^-0.5 internally; our feature maps own the scale, so q is multiplied back.
- it takes the forget gate *pre-activation* (logsigmoid inside), and float32 gates (bf16 gates crash Triton 3.6).
- it needs a length divisible by the chunk size: the tail is padded with tokens that write nothing (input gate -30)
  and keep the state (forget pre-activation +30), so outputs and the final state are unchanged.
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
    initial = {}
    if state is not None and torch.isfinite(state.m).all():
        initial = dict(c_initial=state.C, n_initial=state.n, m_initial=state.m.unsqueeze(-1))
    h, (C, n, m) = kernel(q * math.sqrt(DHQK), k, v, i, f, return_last_states=True, chunk_size=chunk, **initial)
    return h[:, :, :S], MLSTMState(C.float(), n.float(), m.float().squeeze(-1))
