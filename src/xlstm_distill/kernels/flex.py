"""SWA + sinks through PyTorch's FlexAttention (compiled on CUDA; eager reference on CPU, used by the tests).

Same function as :func:`xlstm_distill.kernels.swa.swa_sinks_attention`: a query sees the keys of its own document
inside the window and the document's first ``num_sinks`` tokens. The block mask depends on the documents of the
batch, so it is built once per forward and shared by every layer (``block_mask`` argument).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def _variants() -> contextlib.AbstractContextManager:
    """Each dtype, window, batch layout and grad mode is one more compiled variant; past dynamo's default recompile
    limit (8) a call runs unfused (T x T scores), so the compiled FlexAttention calls get a larger one (nothing to
    change inside a model that the user compiles as a whole)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(cache_size_limit=max(torch._dynamo.config.cache_size_limit, 64))


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
    with _variants():
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
    """Compiled for the first length seen, then (from the second) with a symbolic length that serves every later one.
    With ``dynamic=False`` each new length compiled again (about 6 s) and after dynamo's recompile limit the call ran
    unfused, materializing (B, NH, T, T) scores: out of memory at 32K (benchmarks/flex_lengths.py, docs/decisions.md)."""
    return torch.compile(flex_attention, dynamic=None)


# Inductor picks its FlexAttention decoding kernel for queries shorter than 128 tokens, and has no config of it for a
# symbolic length (NoValidChoicesError on the H100, torch 2.11); one-token decode steps do not come here.
_KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}


def swa_sinks_flex(
    q: torch.Tensor,  # (B, NH, T, D)
    k: torch.Tensor,  # (B, NKV, T, D)
    v: torch.Tensor,  # (B, NKV, T, DV)
    block_mask: BlockMask,
    scale: float,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Returns (B, NH, T, DV) in the dtype of v. ``compiled``: through torch.compile (default: on CUDA; on CPU it
    compiles too, forward only, which the tests use to check the compiled path's variants)."""
    if q.is_cuda if compiled is None else compiled:
        with _variants():
            return _compiled()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                               kernel_options=_KERNEL_OPTIONS)
    with warnings.catch_warnings():  # eager FlexAttention warns that it is not compiled: intended on CPU
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
