"""Token layout (documents, padding, positions) and the constant-size generation cache of the hybrid student.

Padding and packed documents are handled the same way: a maximal run of tokens with the same attention-mask
value and document id is a *document*. Nothing crosses a document boundary: attention is restricted to the
query's document, the recurrent state is reset at its first token, and sinks are its first tokens. Positions
(RoPE, window, sinks) count from the document start, as transformers does for left padding.

The cache keeps, per layer (:class:`LayerCache`), the mLSTM state (C, n, m), the K/V of the current document's sink
tokens and a ring buffer of the last W tokens' K/V: its size does not depend on how many tokens were generated.
Layers may differ in window and sinks (a teacher's own sliding-window layers, ``HybridConfig.layer_window``): the
layers of one (window, sinks) pair share their slot bookkeeping, a *window group*.
Only heads that keep the teacher's full attention (``HybridConfig.full_attention_heads`` / ``_layers``) add keys
and values that grow with the context (:class:`FullWrite`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from xlstm_distill.kernels.mlstm_native import MLSTMState

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the old names still work,
# with a deprecation warning): the student takes both and uses the installed version's name itself.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_of(output: CausalLMOutputWithPast) -> HybridCache | None:
    """The cache a forward returned, under either transformers naming."""
    return getattr(output, CACHE_FIELD)


WindowGroup = tuple[int, int]  # (window, sinks) of some layers


@dataclass
class CacheWrite:
    """Where the K/V of this forward's tokens go in the cache (same for every layer).

    For every sink slot and ring slot: whether it receives a new token (else it keeps its content) and that
    token's index in this forward's sequence.
    """

    sink_from_new: torch.Tensor  # (B, S) bool
    sink_src: torch.Tensor  # (B, S) long
    ring_from_new: torch.Tensor  # (B, W) bool
    ring_src: torch.Tensor  # (B, W) long
    sink_pos: torch.Tensor  # (B, S) positions held after the write, -1 = empty
    ring_pos: torch.Tensor  # (B, W)
    doc_length: torch.Tensor  # (B,) tokens of the current document after this forward


@dataclass
class FullWrite:
    """Where the kept full-attention heads' K/V of this forward go: one slot per input token (padding included), the
    same slots in every row and layer; slots of tokens outside the row's current document hold position -1."""

    slots: torch.Tensor  # (T,) long, the slots this forward writes
    key_pos: torch.Tensor  # (B, CAP) document position held by every slot after the write, -1 = empty
    capacity: int  # slots allocated (CAP)


@dataclass
class TokenLayout:
    """How the tokens of one forward call are arranged in documents."""

    position: torch.Tensor  # (B, T) position of every token inside its document
    doc_start: torch.Tensor  # (B, T) index of the first token of every token's document (full forward only)
    reset: torch.Tensor  # (B, T) bool, True at the first token of a document
    continues_cache: bool  # True: the tokens continue the document held by the cache
    single_document: bool = False  # known without looking at the data: one document per row, no padding
    write: dict[WindowGroup, CacheWrite] | None = None  # set when a cache is to be filled, per window group
    # per window group: (B, S + W) positions of the cached sink + ring K/V, -1 = empty
    cached_key_pos: dict[WindowGroup, torch.Tensor] | None = None
    full: FullWrite | None = None  # set when the cache keeps full-attention heads
    memo: dict[Any, Any] = field(default_factory=dict)  # per-forward objects the layers share (a block mask)


def _slot_plan(length: torch.Tensor, pos0: torch.Tensor, offset: torch.Tensor, window: int, sinks: int,
               old_sink_pos: torch.Tensor | None, old_ring_pos: torch.Tensor | None) -> CacheWrite:
    """Cache slots after a forward. Document positions p >= pos0 were computed in this forward, at index
    offset + (p - pos0); ``length`` is the document length afterwards. All arguments (B,) long."""
    B = length.shape[0]
    dev = length.device
    j = torch.arange(sinks, device=dev).expand(B, sinks)
    sink_valid = j < length[:, None]
    sink_from_new = sink_valid & (j >= pos0[:, None])
    s = torch.arange(window, device=dev).expand(B, window)
    p = length[:, None] - 1 - torch.remainder(length[:, None] - 1 - s, window)  # latest position in slot s
    ring_valid = (p >= sinks) & (p >= 0)
    ring_from_new = ring_valid & (p >= pos0[:, None])
    empty_s, empty_r = torch.full_like(j, -1), torch.full_like(s, -1)
    sink_pos = torch.where(sink_valid, j, empty_s if old_sink_pos is None else old_sink_pos)
    ring_pos = torch.where(ring_valid, p, empty_r if old_ring_pos is None else old_ring_pos)
    return CacheWrite(
        sink_from_new=sink_from_new,
        sink_src=(offset[:, None] + j - pos0[:, None]).clamp(min=0),
        ring_from_new=ring_from_new,
        ring_src=(offset[:, None] + p - pos0[:, None]).clamp(min=0),
        sink_pos=sink_pos,
        ring_pos=ring_pos,
        doc_length=length,
    )


def full_layout(
    batch_size: int,
    seq_len: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = padding
    document_ids: torch.Tensor | None = None,  # (B, T) packed-document ids
) -> TokenLayout:
    """Layout of a forward that does not continue a cache."""
    boundary = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
    boundary[:, 0] = True
    for ids in (attention_mask, document_ids):
        if ids is not None:
            if ids.shape != (batch_size, seq_len):
                raise ValueError(f"Expected a ({batch_size}, {seq_len}) mask / document_ids, got {tuple(ids.shape)}.")
            boundary[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    idx = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
    doc_start = torch.cummax(torch.where(boundary, idx, 0), dim=1).values
    single = attention_mask is None and document_ids is None
    return TokenLayout(idx - doc_start, doc_start, boundary, continues_cache=False, single_document=single)


@dataclass
class LayerCache:
    """One layer's part of the cache: the recurrent state and the window's keys and values (each None until the
    first forward writes it, and for a mixer without that branch)."""

    memory: MLSTMState | None = None  # C (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH), float32
    sink_k: torch.Tensor | None = None  # (B, NKV, S, DH) K of the current document's sink tokens
    sink_v: torch.Tensor | None = None  # (B, NKV, S, DH)
    ring_k: torch.Tensor | None = None  # (B, NKV, W, DH) K of the last W tokens, slot = position mod W
    ring_v: torch.Tensor | None = None  # (B, NKV, W, DH)
    full_k: torch.Tensor | None = None  # (B, NKVF, CAP, DH) K of the kept full-attention heads, slot = input index
    full_v: torch.Tensor | None = None  # (B, NKVF, CAP, DH)

    WINDOW_FIELDS: ClassVar[tuple[str, ...]] = ("sink_k", "sink_v", "ring_k", "ring_v")
    FULL_FIELDS: ClassVar[tuple[str, ...]] = ("full_k", "full_v")

    def window_keys(
        self,
        k: torch.Tensor,  # (B, NKV, T, DH) this forward's keys
        v: torch.Tensor,  # (B, NKV, T, DH)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (B, NKV, S + W + T, DH) each
        """The cached sink and ring keys and values followed by this forward's (positions: ``layout.cached_key_pos``
        then ``layout.position``)."""
        return torch.cat([self.sink_k, self.ring_k, k], dim=2), torch.cat([self.sink_v, self.ring_v, v], dim=2)

    def write_window(self, k: torch.Tensor, v: torch.Tensor, write: CacheWrite) -> None:
        """Store this forward's sink and window K/V (``write`` says which slot takes which token); allocates the
        buffers on first use."""
        B, KV, _, D = k.shape
        if self.sink_k is None:
            S, W = write.sink_src.shape[1], write.ring_src.shape[1]
            self.sink_k, self.sink_v = k.new_zeros(B, KV, S, D), k.new_zeros(B, KV, S, D)
            self.ring_k, self.ring_v = k.new_zeros(B, KV, W, D), k.new_zeros(B, KV, W, D)
        for kind, src, from_new in (("sink", write.sink_src, write.sink_from_new),
                                    ("ring", write.ring_src, write.ring_from_new)):
            idx = src[:, None, :, None].expand(B, KV, src.shape[1], D)
            keep = from_new[:, None, :, None]
            for name, x in ((f"{kind}_k", k), (f"{kind}_v", v)):
                setattr(self, name, torch.where(keep, torch.gather(x, 2, idx), getattr(self, name)))

    def write_full(
        self,
        k: torch.Tensor,  # (B, NKVF, T, DH) this forward's keys of the kept heads
        v: torch.Tensor,  # (B, NKVF, T, DH)
        layout: TokenLayout,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (B, NKVF, CAP, DH) K, V; (B, CAP) positions
        """Store the kept heads' K/V in their slots (in place: a decode step writes one slot) and return everything
        the cache holds for them. The buffers are allocated here; ``HybridCache.reserve`` grows them."""
        full = layout.full
        if self.full_k is None:
            self.full_k, self.full_v = (x.new_zeros(*x.shape[:2], full.capacity, x.shape[3]) for x in (k, v))
        for buffer, x in ((self.full_k, k), (self.full_v, v)):
            buffer.index_copy_(2, full.slots, x.to(buffer.dtype))
        return self.full_k, self.full_v, full.key_pos

    def resize_full(self, capacity: int) -> None:
        """Grow the full-attention buffers to ``capacity`` slots (before a static decoder captures its step)."""
        for name in self.FULL_FIELDS:
            buffer = getattr(self, name)
            if buffer is not None and buffer.shape[2] < capacity:
                grown = buffer.new_zeros(*buffer.shape[:2], capacity, buffer.shape[3])
                grown[:, :, :buffer.shape[2]] = buffer
                setattr(self, name, grown)

    def update_memory(self, state: MLSTMState) -> None:
        self.memory = MLSTMState(*state)

    def tensors(self) -> list[torch.Tensor]:
        """The layer's tensors in a fixed order: C, n, m, then sink K/V, ring K/V and full K/V (those that exist)."""
        out = list(self.memory) if self.memory is not None else []
        return out + [getattr(self, name) for name in self.WINDOW_FIELDS + self.FULL_FIELDS
                      if getattr(self, name) is not None]

    def set_tensors(self, tensors: Iterator[torch.Tensor]) -> None:
        """Inverse of :meth:`tensors`: take this layer's tensors from ``tensors`` in the same order."""
        if self.memory is not None:
            self.memory = MLSTMState(next(tensors), next(tensors), next(tensors))
        for name in self.WINDOW_FIELDS + self.FULL_FIELDS:
            if getattr(self, name) is not None:
                setattr(self, name, next(tensors))

    def select(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (B',) in this order (beam search)."""
        self.set_tensors(iter([t.index_select(0, rows.to(t.device)) for t in self.tensors()]))


class HybridCache:
    """Constant-size decoding state: per layer a :class:`LayerCache` (the recurrent state, the sink K/V and a ring
    buffer of the window's K/V), plus the positions those slots hold, shared by the layers of one window group. With
    ``keeps_full`` (heads that keep full attention) also the kept heads' K/V of every token, which grow with the
    context. ``layer_windows``: each layer's (window, sinks) where they differ from ``window`` and ``num_sinks``
    (``HybridConfig.layer_window``)."""

    def __init__(self, num_layers: int, window: int, num_sinks: int, keeps_full: bool = False,
                 layer_windows: list[WindowGroup] | None = None) -> None:
        self.layer_windows = [tuple(w) for w in layer_windows] if layer_windows else [(window, num_sinks)] * num_layers
        if len(self.layer_windows) != num_layers:
            raise ValueError(f"layer_windows names {len(self.layer_windows)} layers, the model has {num_layers}.")
        self.groups: list[WindowGroup] = sorted(set(self.layer_windows))
        self.keeps_full = keeps_full
        self.full_pos: torch.Tensor | None = None  # (B, CAP) document position held by each full slot, -1 = empty
        self.full_len: torch.Tensor | None = None  # (1,) full slots written so far (a tensor: static decode steps)
        self.layers: list[LayerCache] = [LayerCache() for _ in range(num_layers)]
        self.seen_tokens = 0  # input positions consumed so far (padding included)
        self.doc_length: torch.Tensor | None = None  # (B,) tokens of the current document
        self.sink_pos: dict[WindowGroup, torch.Tensor] = {}  # per group (B, S): position held by each sink slot, -1 = empty
        self.ring_pos: dict[WindowGroup, torch.Tensor] = {}  # per group (B, W): position held by each ring slot

    @property
    def is_empty(self) -> bool:
        return self.doc_length is None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def plan(
        self,
        batch_size: int,
        seq_len: int,
        device: torch.device,
        attention_mask: torch.Tensor | None,  # (B, T) or (B, seen + T)
        document_ids: torch.Tensor | None,
    ) -> TokenLayout:
        """Layout of the next forward and where its K/V go in the cache."""
        if attention_mask is not None and attention_mask.shape[-1] == self.seen_tokens + seq_len:
            attention_mask = attention_mask[:, -seq_len:]  # generate() passes the mask of past + new tokens
        if self.is_empty:
            layout = full_layout(batch_size, seq_len, device, attention_mask, document_ids)
            if attention_mask is not None and not bool(attention_mask[:, -1].all()):
                raise ValueError("Right padding cannot be cached: pad on the left for generation (padding_side='left').")
            start = layout.doc_start[:, -1]
            length = seq_len - start
            layout.write = {(w, s): _slot_plan(length, torch.zeros_like(length), start, w, s, None, None)
                            for w, s in self.groups}
            if self.keeps_full:  # only the row's last document stays visible to later tokens
                in_last = torch.arange(seq_len, device=device)[None, :] >= start[:, None]
                layout.full = self._full_write(torch.where(in_last, layout.position, -1), seq_len)
            return layout
        if document_ids is not None or (attention_mask is not None and not bool(attention_mask.all())):
            raise ValueError(
                "Tokens that continue a cache must all belong to the cached document: padding and document_ids "
                "are only supported in the first forward (left padding)."
            )
        if self.doc_length.shape[0] != batch_size:
            raise ValueError(f"The cache holds batch size {self.doc_length.shape[0]}, got {batch_size}.")
        pos0 = self.doc_length
        position = pos0[:, None] + torch.arange(seq_len, device=device)
        write = {g: _slot_plan(pos0 + seq_len, pos0, torch.zeros_like(pos0), *g, self.sink_pos[g], self.ring_pos[g])
                 for g in self.groups}
        no_reset = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
        cached_key_pos = {g: torch.cat([self.sink_pos[g], self.ring_pos[g]], dim=1) for g in self.groups}
        full = self._full_write(position, seq_len) if self.keeps_full else None
        return TokenLayout(position, position, no_reset, continues_cache=True, write=write, cached_key_pos=cached_key_pos,
                           full=full)

    def _full_write(self, new_pos: torch.Tensor, seq_len: int) -> FullWrite:
        """Slots and positions of the kept heads' K/V after this forward (``new_pos``: (B, T) position of each new
        token, -1 for tokens no later token may see); grows the slots when the context outgrows them."""
        if self.full_len is None:
            self.full_len = torch.zeros(1, dtype=torch.long, device=new_pos.device)
            self.full_pos = new_pos.new_full((new_pos.shape[0], 0), -1)
        needed = self.seen_tokens + seq_len  # a static decode step keeps seen_tokens at 0: no growth inside a graph
        if needed > self.full_pos.shape[1]:
            self.reserve(needed)
        slots = self.full_len + torch.arange(seq_len, device=new_pos.device)  # (T,)
        return FullWrite(slots, self.full_pos.index_copy(1, slots, new_pos), self.full_pos.shape[1])

    def reserve(self, capacity: int) -> None:
        """Room for ``capacity`` input tokens in the full-attention heads' K/V (a static decoder reserves what it will
        generate before capturing its step)."""
        if not self.keeps_full or self.full_pos is None or capacity <= self.full_pos.shape[1]:
            return
        pad = self.full_pos.new_full((self.full_pos.shape[0], capacity - self.full_pos.shape[1]), -1)
        self.full_pos = torch.cat([self.full_pos, pad], dim=1)
        for layer in self.layers:
            layer.resize_full(capacity)

    @property
    def full_capacity(self) -> int:
        """Input tokens the full-attention heads' K/V have room for (0 without such heads)."""
        return 0 if self.full_pos is None else self.full_pos.shape[1]

    def commit(self, layout: TokenLayout, seq_len: int) -> None:
        """Advance the bookkeeping after every layer has written its part of ``layout.write``."""
        self.doc_length = layout.write[self.groups[0]].doc_length
        self.sink_pos = {g: w.sink_pos for g, w in layout.write.items()}
        self.ring_pos = {g: w.ring_pos for g, w in layout.write.items()}
        if layout.full is not None:
            self.full_pos, self.full_len = layout.full.key_pos, self.full_len + seq_len
        self.seen_tokens += seq_len

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for layer in self.layers:
            layer.select(beam_idx)
        per_row = self._bookkeeping()[:-1] if self.full_pos is not None else self._bookkeeping()  # (full_len: a count)
        rows = [x.index_select(0, beam_idx.to(x.device)) for x in per_row]
        self._set_bookkeeping(iter(rows + ([self.full_len] if self.full_pos is not None else [])))

    def _bookkeeping(self) -> list[torch.Tensor]:
        """The document length, each window group's sink and ring positions, the full slots' positions and count."""
        windows = [x for g in self.groups for x in (self.sink_pos[g], self.ring_pos[g])]
        full = [self.full_pos, self.full_len] if self.full_pos is not None else []
        return [self.doc_length] + windows + full

    def _set_bookkeeping(self, tensors: Iterator[torch.Tensor]) -> None:
        """Inverse of :meth:`_bookkeeping`."""
        self.doc_length = next(tensors)
        for g in self.groups:
            self.sink_pos[g], self.ring_pos[g] = next(tensors), next(tensors)
        if self.full_pos is not None:
            self.full_pos, self.full_len = next(tensors), next(tensors)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the cache in a fixed order (each layer's, then the bookkeeping)."""
        return [t for layer in self.layers for t in layer.tensors()] + self._bookkeeping()

    def set_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Inverse of :meth:`tensors`: point the cache at ``tensors`` (same order, shapes and dtypes)."""
        current = self.tensors()
        if len(tensors) != len(current) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(tensors, current)):
            raise ValueError("set_tensors needs the tensors of this cache's layout (same count, shapes and dtypes).")
        it = iter(tensors)
        for layer in self.layers:
            layer.set_tensors(it)
        self._set_bookkeeping(it)

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (constant once the first forward has filled it)."""
        return 0 if self.is_empty else sum(t.numel() * t.element_size() for t in self.tensors())
