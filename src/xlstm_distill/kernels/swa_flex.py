"""SWA + sinks through PyTorch's FlexAttention (compiled on CUDA; eager reference on CPU, used by the tests).

Same function as :func:`xlstm_distill.kernels.swa_native.swa_sinks_attention`: a query sees the keys of its own document
inside the window and the document's first ``num_sinks`` tokens. Two masks of the same function:
- sinks in place: every query block also sees the key block holding its document's sinks. FlexAttention's backward
  computes a key block's gradient in one program per head, walking every query block that sees it; the sinks'
  block is seen by all of them, so that one program took most of the backward (docs/decisions.md);
- copied sinks (``copy_sinks=True``; training on rows of one document): keys and values get one more key block per
  query block of 128 tokens, holding copies of the sinks of the documents in that query block, and only that query
  block sees it.
  Every key block then has a few query blocks, and the copies' gradients flow back to the sinks through the copy.
  The copies follow the T keys directly: for T not a multiple of 128 they straddle key blocks (still seen by their
  own query block only). Cost: keys and values of T + 128 * ceil(T / 128) tokens, kept for the backward (about twice
  the SWA branch's K/V activations). A query block has room for the sinks of 128 // num_sinks documents; the
  sinks of any further document that starts in it stay in place, inside that block (no host read decides it).
The mask depends on the documents of the batch, so it is built once per forward and shared by every layer (``mask``
argument). Attention-logit soft-capping (Gemma 2) is FlexAttention's ``score_mod`` on the scaled scores.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from xlstm_distill.kernels.compiling import many_variants
from xlstm_distill.kernels.registry import register_kernel
from xlstm_distill.kernels.swa_native import gather_tokens

if TYPE_CHECKING:
    from xlstm_distill.kernels.options import KernelOptions

BLOCK = 128  # FlexAttention's block-mask granularity (its default), the query blocks that get their own sink copies


class SWAMask(NamedTuple):
    """What one forward's SWA + sinks needs besides q, k, v: the block mask over the keys, and how the sink copies
    that follow the keys are made: ``row_sinks`` > 0: the first ``row_sinks`` tokens of each row (one document per
    row); ``sink_pos`` (B, NB * BLOCK): each copy's source position (packed documents), -1 on unused slots. Neither:
    sinks in place."""

    block_mask: BlockMask
    row_sinks: int
    sink_pos: torch.Tensor | None


def _num_blocks(T: int) -> int:
    return -(-T // BLOCK)


def _sink_copies(doc_start: torch.Tensor, num_sinks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each query block, a key block of copies of the sinks of its first BLOCK // num_sinks documents. Returns
    each copy's source position and document start, (B, NB * BLOCK) each, -1 on unused slots, and which tokens'
    documents got no copies (B, T) (a later document of a crowded block: it starts in the block, so its sinks stay
    in place there)."""
    B, T = doc_start.shape
    NB = _num_blocks(T)
    starts = torch.cat([doc_start, doc_start[:, -1:].expand(B, NB * BLOCK - T)], 1).view(B, NB, BLOCK)
    new_doc = torch.ones_like(starts, dtype=torch.bool)
    new_doc[..., 1:] = starts[..., 1:] != starts[..., :-1]  # the block's first token and each document start in it
    rank = new_doc.cumsum(-1) - 1  # (B, NB, BLOCK) the token's document's index within the block
    per_block = BLOCK // num_sinks
    in_place = rank >= per_block
    docs = starts.new_full((B, NB, per_block + 1), -1)  # the last column takes the writes of the other tokens
    docs.scatter_(-1, torch.where(new_doc & ~in_place, rank, per_block), starts)
    docs = docs[..., :per_block, None].expand(B, NB, per_block, num_sinks)  # (B, NB, documents, S)
    pos = docs + torch.arange(num_sinks, device=doc_start.device)
    own = pos.clamp(0, T - 1)
    valid = (docs >= 0) & (pos < T) & (doc_start.gather(1, own.flatten(1)).view_as(pos) == docs)  # a short document
    pad = (0, BLOCK - per_block * num_sinks)  # has fewer sinks
    pos, docs = (torch.nn.functional.pad(torch.where(valid, x, -1).flatten(2), pad, value=-1).flatten(1)
                 for x in (pos, docs))
    return pos, docs, in_place.flatten(1)[:, :T]


def _swa_mask(window: int, num_sinks: int, T: int, device: torch.device, doc_start: torch.Tensor | None,
              copy_sinks: bool) -> SWAMask:
    """Causal, same document, inside the window or a sink (in place, or copied: ``copy_sinks``). ``doc_start``
    (B, T): each token's document start; None: every row is one document starting at 0 (the block mask then does
    not depend on the batch row, and its mask is arithmetic: no lookups in FlexAttention's inner loop)."""
    copy_sinks = copy_sinks and 0 < num_sinks <= BLOCK  # else in place
    copies = _sink_copies(doc_start, num_sinks) if copy_sinks and doc_start is not None else None
    sink_pos, sink_doc, sinks_in_place = copies or (None, None, None)
    row_sinks = min(num_sinks, T) if copy_sinks and doc_start is None else 0

    def in_place(b, h, q_idx, kv_idx):
        if doc_start is None:  # constants: the CPU's compiled FlexAttention fails on captured tensors here
            start, same_doc = 0, True
        else:
            start = doc_start[b, q_idx]
            same_doc = doc_start[b, kv_idx] == start
        return (kv_idx <= q_idx) & same_doc & ((q_idx - kv_idx < window) | (kv_idx - start < num_sinks))

    def row_copies(b, h, q_idx, kv_idx):  # each query block's copies: the row's first tokens, at slots 0..S-1
        slot = kv_idx - T
        in_window = (kv_idx <= q_idx) & (q_idx - kv_idx < window) & (kv_idx >= num_sinks)
        sink = (slot // BLOCK == q_idx // BLOCK) & (slot % BLOCK < row_sinks) & (slot % BLOCK <= q_idx)
        return torch.where(kv_idx < T, in_window, sink)

    def document_copies(b, h, q_idx, kv_idx):
        start, slot, token = doc_start[b, q_idx], (kv_idx - T).clamp(min=0), kv_idx.clamp(max=T - 1)
        near, is_sink = q_idx - kv_idx < window, kv_idx - start < num_sinks
        in_doc = (kv_idx <= q_idx) & (doc_start[b, token] == start)
        in_doc = in_doc & torch.where(sinks_in_place[b, q_idx], near | is_sink, near & ~is_sink)  # or copied
        pos, doc = sink_pos[b, slot], sink_doc[b, slot]
        copy = (slot // BLOCK == q_idx // BLOCK) & (pos >= 0) & (pos <= q_idx) & (doc == start)
        return torch.where(kv_idx < T, in_doc, copy)

    mask_mod, keys = in_place, T
    if row_sinks or copies is not None:
        mask_mod, keys = (row_copies if row_sinks else document_copies), T + _num_blocks(T) * BLOCK
    B = None if doc_start is None else doc_start.shape[0]
    # compiled on CUDA: eager evaluation materializes all T x T mask values (hopeless at 64K+); inside a model that
    # its user compiles, traced with it
    with many_variants():
        block_mask = create_block_mask(mask_mod, B, None, T, keys, device=device, BLOCK_SIZE=BLOCK,
                                       _compile=device.type == "cuda" and not torch.compiler.is_compiling())
    return SWAMask(block_mask, row_sinks, sink_pos)


_cached_swa_mask = functools.lru_cache(maxsize=32)(_swa_mask)  # one-document masks (no doc_start tensor)


def swa_block_mask(doc_start: torch.Tensor, window: int, num_sinks: int, copy_sinks: bool = False) -> SWAMask:
    """Mask for (B, T) document starts (padding, packed documents): built once per forward."""
    return _swa_mask(window, num_sinks, doc_start.shape[1], doc_start.device, doc_start, copy_sinks)


def causal_swa_block_mask(seq_len: int, window: int, num_sinks: int, device: torch.device,
                          copy_sinks: bool = False) -> SWAMask:
    """Mask of one document per row (no padding, no packing), cached per (length, window, sinks, device, copies):
    prefill and evaluation build it once per shape instead of once per forward. Inside a model that its user
    compiles it is traced with the model (dynamo does not trace through the cache)."""
    build = _swa_mask if torch.compiler.is_compiling() else _cached_swa_mask
    return build(window, num_sinks, seq_len, device, None, copy_sinks)


@functools.cache
def soft_cap_mod(softcap: float):
    """FlexAttention ``score_mod`` of attention-logit soft-capping: scaled score s -> softcap * tanh(s / softcap) (one
    function per value, so that a compiled call is guarded on the function, not retraced)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


def _attend(
    q: torch.Tensor,  # (B, NH, T, D)
    k: torch.Tensor,  # (B, NKV, T, D)
    v: torch.Tensor,  # (B, NKV, T, DV)
    mask: SWAMask,
    scale: float,
    kernel_options: dict | None,
    softcap: float | None = None,
) -> torch.Tensor:  # (B, NH, T, DV)
    """FlexAttention under the block mask, over the keys followed by the copied sinks if any. The copies' gradients
    are summed into the sinks' in float32 (over 256 query blocks at 32K tokens, bf16 sums lost 2.5% of dk)."""
    if mask.row_sinks or mask.sink_pos is not None:
        B, NKV, T, _ = k.shape
        NB = _num_blocks(T)
        if mask.row_sinks:  # (B, NKV, BLOCK, D): the row's sinks, then zeros; the same for each query block
            pad = (0, 0, 0, BLOCK - mask.row_sinks)
            first = [torch.nn.functional.pad(x[:, :, :mask.row_sinks], pad) for x in (k, v)]
            copies = (x.float().unsqueeze(2).expand(B, NKV, NB, BLOCK, x.shape[-1]).flatten(2, 3) for x in first)
        else:
            idx = mask.sink_pos.clamp(min=0)  # (B, NB * BLOCK)
            copies = (gather_tokens(x.float(), idx) for x in (k, v))
        k, v = (torch.cat([x, c.to(x.dtype)], 2) for x, c in zip((k, v), copies))  # (B, NKV, T + NB * BLOCK, D)
    score_mod = None if softcap is None else soft_cap_mod(softcap)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=mask.block_mask, scale=scale,
                          enable_gqa=q.shape[1] != k.shape[1], kernel_options=kernel_options)


@functools.cache
def _compiled():
    """Compiled for the first length seen, then (from the second) with a symbolic length that serves every later one.
    With ``dynamic=False`` each new length compiled again (about 6 s) and after dynamo's recompile limit the call ran
    unfused, materializing (B, NH, T, T) scores: out of memory at 32K (benchmarks/flex_lengths.py, docs/decisions.md)."""
    return torch.compile(_attend, dynamic=None)


# Inductor picks its FlexAttention decoding kernel for queries shorter than 128 tokens, and has no config of it for a
# symbolic length (NoValidChoicesError on the H100, torch 2.11); one-token decode steps do not come here.
FORCED_KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}


def swa_sinks_flex(
    q: torch.Tensor,  # (B, NH, T, D)
    k: torch.Tensor,  # (B, NKV, T, D)
    v: torch.Tensor,  # (B, NKV, T, DV)
    mask: SWAMask,
    scale: float,
    compiled: bool | None = None,
    kernel_options: dict | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Returns (B, NH, T, DV) in the dtype of v. ``compiled``: through torch.compile (default: on CUDA; on CPU it
    compiles too, forward only, which the tests use to check the compiled path's variants). ``kernel_options``:
    FlexAttention's launch settings (block sizes, warps, stages). ``softcap``: attention-logit soft-capping."""
    options = {**FORCED_KERNEL_OPTIONS, **(kernel_options or {})}
    if torch.compiler.is_compiling():  # traced into a model that its user compiles
        return _attend(q, k, v, mask, scale, options, softcap)
    if q.is_cuda if compiled is None else compiled:
        with many_variants():
            return _compiled()(q, k, v, mask, scale, options, softcap)
    with warnings.catch_warnings():  # eager FlexAttention warns that it is not compiled: intended on CPU
        warnings.simplefilter("ignore")
        return _attend(q, k, v, mask, scale, kernel_options or None, softcap)


@register_kernel("swa", "flex")
def _flex(q, k, v, doc_start, window: int, num_sinks: int, scale: float, softcap: float | None, single_document: bool,
          memo: dict, options: KernelOptions) -> torch.Tensor:
    """The registered implementation: the block mask is built once per forward (``memo``, shared by the layers) or,
    for one document per row, once per length. With gradients, rows of one document (``copy_sinks='rows'``; packed
    rows too with ``'all'``) read their sinks from copies per query block."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    copies = needs_grad and (options.copy_sinks == "all" or options.copy_sinks == "rows" and single_document)
    key = ("flex_block_mask", window, num_sinks, copies)
    if key not in memo:
        if single_document:  # the same mask for every row and every forward of this length
            memo[key] = causal_swa_block_mask(q.shape[2], window, num_sinks, q.device, copies)
        else:
            memo[key] = swa_block_mask(doc_start, window, num_sinks, copies)
    return swa_sinks_flex(q, k, v, memo[key], scale, kernel_options=options.flex_kernel_params, softcap=softcap)
