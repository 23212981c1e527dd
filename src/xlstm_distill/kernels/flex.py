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


def swa_block_mask(doc_start: torch.Tensor, window: int, num_sinks: int) -> BlockMask:
    """Block mask for (B, T) document starts: causal, same document, inside the window or a sink."""
    B, T = doc_start.shape

    def mask_mod(b, h, q_idx, kv_idx):
        start = doc_start[b, q_idx]
        same_doc = doc_start[b, kv_idx] == start
        return (kv_idx <= q_idx) & same_doc & ((q_idx - kv_idx < window) | (kv_idx - start < num_sinks))

    # compiled on CUDA: eager evaluation materializes all T x T mask values (hopeless at 64K+)
    return create_block_mask(mask_mod, B, None, T, T, device=doc_start.device, _compile=doc_start.is_cuda)


@functools.lru_cache(maxsize=32)
def causal_swa_block_mask(seq_len: int, window: int, num_sinks: int, device: torch.device) -> BlockMask:
    """Block mask of one document per row (no padding, no packing), cached per (length, window, sinks, device):
    prefill and evaluation build it once per shape instead of once per forward."""
    def mask_mod(b, h, q_idx, kv_idx):  # every row is one document starting at 0: the batch index is not needed
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < num_sinks))

    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device, _compile=device.type == "cuda")


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
