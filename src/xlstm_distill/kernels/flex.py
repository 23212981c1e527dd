"""SWA + sinks through PyTorch's FlexAttention (compiled on CUDA; eager reference on CPU, used by the tests).

Same function as :func:`xlstm_distill.kernels.swa.swa_sinks_attention`: a query sees the keys of its own document
inside the window and the document's first ``num_sinks`` tokens. The block mask depends on the documents of the
batch, so it is built once per forward and shared by every layer (``block_mask`` argument).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def _block_mask(window: int, num_sinks: int, T: int, device: torch.device,
                doc_start: torch.Tensor | None = None) -> BlockMask:
    """Causal, same document, inside the window or a sink. ``doc_start`` (B, T): each token's document start;
    None: every row is one document starting at 0 (the mask then does not depend on the batch row)."""
    def mask_mod(b, h, q_idx, kv_idx):
        if doc_start is None:
            start, same_doc = 0, True
        else:
            start = doc_start[b, q_idx]
            same_doc = doc_start[b, kv_idx] == start
        return (kv_idx <= q_idx) & same_doc & ((q_idx - kv_idx < window) | (kv_idx - start < num_sinks))

    B = None if doc_start is None else doc_start.shape[0]
    # compiled on CUDA: eager evaluation materializes all T x T mask values (hopeless at 64K+)
    return create_block_mask(mask_mod, B, None, T, T, device=device, _compile=device.type == "cuda")


def swa_block_mask(doc_start: torch.Tensor, window: int, num_sinks: int) -> BlockMask:
    """Block mask for (B, T) document starts (padding, packed documents): built once per forward."""
    return _block_mask(window, num_sinks, doc_start.shape[1], doc_start.device, doc_start)


@functools.lru_cache(maxsize=32)
def causal_swa_block_mask(seq_len: int, window: int, num_sinks: int, device: torch.device) -> BlockMask:
    """Block mask of one document per row (no padding, no packing), cached per (length, window, sinks, device):
    prefill and evaluation build it once per shape instead of once per forward."""
    return _block_mask(window, num_sinks, seq_len, device)


@functools.cache
def _compiled():
    return torch.compile(flex_attention, dynamic=False)


def swa_sinks_flex(
    q: torch.Tensor,  # (B, NH, T, D)
    k: torch.Tensor,  # (B, NKV, T, D)
    v: torch.Tensor,  # (B, NKV, T, DV)
    block_mask: BlockMask,
    scale: float,
) -> torch.Tensor:
    """Returns (B, NH, T, DV) in the dtype of v."""
    if q.is_cuda:
        return _compiled()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    with warnings.catch_warnings():  # eager FlexAttention warns that it is not compiled: intended on CPU
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
