"""The compact encoding of teacher top-k targets: about a quarter of the exact format's bytes at k = 256.

Per position the teacher's top k (ids, log-probabilities) and the log of the probability mass outside them are
stored as:

- ids: the k ids as a set, renumbered by how often each id is in a top k of the shard (the shard's ``vocab_order``,
  most frequent first), sorted and stored as gaps in an Exp-Golomb code of order ``k0`` (chosen per shard) with its
  unary and binary parts in two bit streams, so that both decode with array operations only;
- the ``exact_head`` largest log-probabilities as float16 with their positions in the sorted id list;
- the others quantized to ``value_bits`` bits, uniform in log-probability between the smallest head value and the
  position's smallest value (float16), then rescaled on reading so that they sum to the stored tail mass;
- float16 logs of the tail's mass and of the mass outside the top k: decoded log-probabilities are normalized with
  them, so the residual bucket of Stage II's loss is kept.

The data itself is packed too: token ids at the vocabulary's bit width, document ids at the width their largest
value needs, the loss mask one bit per token. ``benchmarks/target_formats.py`` measures bytes per token and the KL
between the exact and the stored top-k distribution (docs/decisions.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

MAX_FIELD_BITS = 25  # every bit field is read through a 4-byte window (up to 7 bits of offset + 25 bits of value)


# -- bit fields ---------------------------------------------------------------------------------------------------
def bit_width(max_value: int) -> int:
    """Bits that hold every value in [0, max_value] (at least 1)."""
    return max(1, int(max_value).bit_length())


def pack_bits(values: np.ndarray, widths: np.ndarray | int) -> np.ndarray:
    """Unsigned ``values`` (n,) written most significant bit first, value i in ``widths[i]`` bits (0 allowed),
    back to back; uint8 bytes, the last one zero-padded. Fields are OR-ed into big-endian 64-bit words, each
    field into the word where it starts and the next one."""
    values = np.asarray(values, dtype=np.int64).ravel()
    widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), values.shape)
    if values.size and (values.min() < 0 or (values >> widths).max() > 0):
        raise ValueError("pack_bits: a value is negative or does not fit its width.")
    if widths.size and widths.max() > MAX_FIELD_BITS:
        raise ValueError(f"pack_bits: fields of {widths.max()} bits; at most {MAX_FIELD_BITS} are supported.")
    ends = np.cumsum(widths)
    total = int(ends[-1]) if ends.size else 0
    word = (ends - widths) >> 6
    spill = (ends - widths & 63) + widths - 64  # > 0: bits that reach into the next word
    v = values.astype(np.uint64)
    first = np.where(spill <= 0, v << np.maximum(-spill, 0).astype(np.uint64), v >> np.maximum(spill, 0).astype(np.uint64))
    second = np.where(spill > 0, v << (64 - np.clip(spill, 1, 63)).astype(np.uint64), np.uint64(0))
    words = np.zeros((total + 63) // 64 + 1, dtype=np.uint64)
    for index, part in ((word, first), (word + 1, second)):
        if index.size:  # fields are in order, so each word's parts are one run
            starts = np.flatnonzero(np.diff(index, prepend=-1))
            words[index[starts]] |= np.bitwise_or.reduceat(part, starts)
    return np.frombuffer(words.astype(">u8").tobytes(), dtype=np.uint8)[: (total + 7) // 8].copy()


def unpack_bits(data: np.ndarray, widths: np.ndarray | int, count: int | None = None, start: int = 0) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values (int64) of ``widths`` bits each from bit ``start`` of ``data``.
    Each field is read from the big-endian 32-bit window at its first byte."""
    widths = np.asarray(widths, dtype=np.int64)
    if widths.ndim == 0:
        offsets = start + widths * np.arange(count, dtype=np.int64)
    else:
        offsets = start + np.cumsum(widths) - widths
    padded = np.concatenate([np.asarray(data, dtype=np.uint8).ravel(), np.zeros(4, dtype=np.uint8)])
    windows = np.ndarray(shape=(len(padded) - 3,), dtype=">u4", buffer=padded, strides=(1,))  # one per byte
    window = windows[offsets >> 3].astype(np.int64)
    return (window >> (32 - (offsets & 7) - widths)) & ((np.int64(1) << widths) - 1)


def unary_lengths(data: np.ndarray, count: int) -> np.ndarray:
    """Lengths (int64) of the first ``count`` unary codes in ``data``: a code of length m is m zero bits then a one."""
    ones = np.flatnonzero(np.unpackbits(np.asarray(data, dtype=np.uint8)))
    if len(ones) < count:
        raise ValueError(f"unary stream holds {len(ones)} codes, {count} expected: the shard is damaged.")
    return np.diff(ones[:count], prepend=-1) - 1


def exp_golomb_encode(values: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Exp-Golomb code of order ``order`` for values >= 0 (n,), split in two streams: the unary lengths and the
    binary remainders (bytes each)."""
    shifted = np.asarray(values, dtype=np.int64) + (1 << order)
    length = np.frexp(shifted.astype(np.float64))[1].astype(np.int64)  # bit length, exact below 2**53
    unary = pack_bits(np.ones_like(shifted), length - order)  # length - order - 1 zeros, then a one
    binary = pack_bits(shifted - (np.int64(1) << (length - 1)), length - 1)  # the bits below the leading one
    return unary, binary


def exp_golomb_decode(unary: np.ndarray, binary: np.ndarray, count: int, order: int) -> np.ndarray:
    """Inverse of :func:`exp_golomb_encode`: ``count`` values (int64)."""
    width = unary_lengths(unary, count) + order
    return (unpack_bits(binary, width) | (np.int64(1) << width)) - (1 << order)


def exp_golomb_bits(values: np.ndarray, order: int) -> int:
    """Size in bits of :func:`exp_golomb_encode`'s two streams (without byte padding)."""
    length = np.frexp((np.asarray(values, dtype=np.int64) + (1 << order)).astype(np.float64))[1]
    return int((2 * length.astype(np.int64) - order - 1).sum())


# -- the codec ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompactCodec:
    """How a shard of top-k targets is compacted (its settings are written into the targets' manifest)."""

    exact_head: int = 8  # largest log-probabilities per position kept as float16
    value_bits: int = 4  # bits per quantized log-probability of the rest

    def __post_init__(self) -> None:
        if self.exact_head < 1 or not 1 <= self.value_bits <= 16:
            raise ValueError(f"CompactCodec needs exact_head >= 1 and 1 <= value_bits <= 16, got {self}.")

    def settings(self) -> dict[str, int]:
        return asdict(self)

    def encode(
        self,
        data: dict[str, torch.Tensor],  # input_ids, document_ids (N, T) int, loss_mask (N, T) bool
        topk_ids: torch.Tensor,  # (N, T, k) int
        topk_logprobs: torch.Tensor,  # (N, T, k) float32, largest first
        log_rest: torch.Tensor,  # (N, T) log of the probability mass outside the top k
        vocab_size: int,
    ) -> dict[str, torch.Tensor]:
        """The tensors of one shard (rows are encoded one at a time: memory is bounded by one sequence)."""
        N, T, k = topk_ids.shape
        order = np.argsort(-np.bincount(topk_ids.reshape(-1).long().numpy(), minlength=vocab_size), kind="stable")
        code = np.empty(vocab_size, dtype=np.int64)  # vocabulary id -> code, most frequent first
        code[order] = np.arange(vocab_size)
        k0 = _best_order(code[topk_ids[: max(1, N // 8)].long().numpy()])
        vbits, doc_bits = bit_width(vocab_size - 1), bit_width(int(data["document_ids"].max()))
        rows = [self._encode_row(code[topk_ids[n].long().numpy()], topk_logprobs[n].float(), log_rest[n].float(), k0)
                for n in range(N)]
        out: dict[str, torch.Tensor] = {}
        for name in ("ids_unary", "ids_binary", "tail_levels"):
            out[name] = torch.from_numpy(np.concatenate([row[name] for row in rows]))
            out[f"{name}_offsets"] = torch.from_numpy(np.cumsum([0] + [len(row[name]) for row in rows]))
        for name in ("head_slots", "head_values", "scales"):
            out[name] = torch.stack([torch.as_tensor(row[name]) for row in rows])
        for name, width in (("input_ids", vbits), ("document_ids", doc_bits)):
            out[name] = torch.from_numpy(np.stack([pack_bits(row.numpy(), width) for row in data[name]]))
        out["loss_mask"] = torch.from_numpy(np.packbits(data["loss_mask"].bool().numpy(), axis=-1))
        out["vocab_order"] = torch.from_numpy(pack_bits(order, vbits))
        out["layout"] = torch.tensor([T, k, vocab_size, k0, doc_bits])
        return out

    def _encode_row(self, codes: np.ndarray, logp: torch.Tensor, log_rest: torch.Tensor, k0: int
                    ) -> dict[str, Any]:
        """One sequence: ``codes`` (T, k) renumbered ids, ``logp`` (T, k) largest first, ``log_rest`` (T,)."""
        T, k = codes.shape
        head = min(self.exact_head, k)
        rank = np.argsort(codes, axis=-1, kind="stable")  # (T, k) slot -> rank: slots hold the codes ascending
        codes = np.take_along_axis(codes, rank, -1)
        unary, binary = exp_golomb_encode((np.diff(codes, axis=-1, prepend=-1) - 1).ravel(), k0)
        head_slot = torch.from_numpy(np.argsort(rank, axis=-1, kind="stable")[:, :head])  # (T, head) of ranks 0..
        head_values = logp[:, :head].half()  # (T, head)
        values = logp.gather(-1, torch.from_numpy(rank))  # (T, k) in slot order
        is_tail = torch.ones(T, k, dtype=torch.bool).scatter_(1, head_slot, False)
        tail = values[is_tail].view(T, k - head)
        low = logp[:, -1].half()  # (T,) smallest top-k log-prob
        levels = _quantize(tail, head_values[:, -1].float(), low.float(), self.value_bits)
        return {"ids_unary": unary, "ids_binary": binary,
                "tail_levels": pack_bits(levels.numpy().ravel(), self.value_bits),
                "head_slots": pack_bits(head_slot.numpy().ravel(), bit_width(k - 1)), "head_values": head_values,
                "scales": torch.stack([low, tail.logsumexp(-1).half(), log_rest.half()], -1)}  # (T, 3)

    def decode(self, shard: dict[str, torch.Tensor], row: int, order: np.ndarray | None = None
               ) -> dict[str, torch.Tensor]:
        """Sequence ``row`` of a shard: input_ids, document_ids (T,) int64, loss_mask (T,) bool, topk_ids (T, k)
        int64 and topk_logprobs (T, k) float32. ``order``: the shard's :meth:`vocab_order` (decoded once)."""
        T, k, vocab_size, k0, doc_bits = shard["layout"].tolist()
        head = min(self.exact_head, k)
        vbits = bit_width(vocab_size - 1)
        order = self.vocab_order(shard) if order is None else order

        def stream(name: str) -> np.ndarray:
            start, end = shard[f"{name}_offsets"][row: row + 2].tolist()
            return shard[name][start:end].numpy()

        gaps = exp_golomb_decode(stream("ids_unary"), stream("ids_binary"), T * k, k0).reshape(T, k)
        ids = order[np.cumsum(gaps + 1, axis=-1) - 1]  # (T, k) in slot order
        head_slot = torch.from_numpy(unpack_bits(shard["head_slots"][row].numpy(), bit_width(k - 1), T * head))
        head_values = shard["head_values"][row].float()  # (T, head)
        low, log_tail, log_rest = shard["scales"][row].float().unbind(-1)  # (T,) each
        levels = torch.from_numpy(unpack_bits(stream("tail_levels"), self.value_bits, T * (k - head)))
        tail = _dequantize(levels.view(T, k - head), head_values[:, -1], low, self.value_bits)
        tail = tail + (log_tail - tail.logsumexp(-1)).unsqueeze(-1) if k > head else tail
        logp = torch.empty(T, k)
        is_head = torch.zeros(T, k, dtype=torch.bool)
        is_head.scatter_(1, head_slot.view(T, head), True)
        logp[~is_head] = tail.reshape(-1)
        logp.scatter_(1, head_slot.view(T, head), head_values)
        logp = logp - torch.logaddexp(logp.logsumexp(-1), log_rest).unsqueeze(-1)  # with the rest: sums to 1
        return {"input_ids": torch.from_numpy(unpack_bits(shard["input_ids"][row].numpy(), vbits, T)),
                "document_ids": torch.from_numpy(unpack_bits(shard["document_ids"][row].numpy(), doc_bits, T)),
                "loss_mask": torch.from_numpy(np.unpackbits(shard["loss_mask"][row].numpy(), count=T).astype(bool)),
                "topk_ids": torch.from_numpy(ids), "topk_logprobs": logp}

    @staticmethod
    def vocab_order(shard: dict[str, torch.Tensor]) -> np.ndarray:
        """The shard's renumbering: code -> vocabulary id (V,)."""
        vocab_size = int(shard["layout"][2])
        return unpack_bits(shard["vocab_order"].numpy(), bit_width(vocab_size - 1), vocab_size)


def _best_order(codes: np.ndarray) -> int:
    """The Exp-Golomb order that codes the sorted ``codes`` (..., k) in the fewest bits."""
    codes = np.sort(codes, axis=-1)
    gaps = np.diff(codes, axis=-1, prepend=-1) - 1
    return min(range(12), key=lambda order: exp_golomb_bits(gaps, order))


def _quantize(values: torch.Tensor, high: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels 0..2^bits-1 of log-probs ``values`` (N, T, m) on the uniform grid from ``high`` (N, T) down to ``low``."""
    span = (high - low).clamp(min=1e-6).unsqueeze(-1)
    steps = (1 << bits) - 1
    return ((high.unsqueeze(-1) - values) / span * steps).round().clamp(0, steps).to(torch.int64)


def _dequantize(levels: torch.Tensor, high: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """Log-probs (T, m) of :func:`_quantize`'s ``levels`` (T, m) for ``high``, ``low`` (T,)."""
    span = (high - low).clamp(min=1e-6).unsqueeze(-1)
    return high.unsqueeze(-1) - levels.float() / ((1 << bits) - 1) * span
