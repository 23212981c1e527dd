"""Pack tokenized documents into fixed-length sequences that keep documents apart, from a weighted mixture.

Each packed example (all tensors of shape (seq_len,)) holds consecutive segments, one per document (a document longer
than the room left continues as a new segment in the next pack of the same source):

- ``input_ids``    int64  token ids
- ``document_ids`` int64  0, 1, 2, ... one id per segment inside the pack (attention / recurrent state must not cross)
- ``position_ids`` int64  0, 1, 2, ... restarting at every segment
- ``loss_mask``    bool   ``loss_mask[t]``: train on predicting ``input_ids[t + 1]`` from position ``t``. False on the
                          last token of every segment (its next token is another document) and before tokens that are
                          no target (user turns when ``loss_on="assistant"``). The last column is always False.
- ``source``       int64  scalar: index of the mixture source this pack came from

The trainer computes ``loss = CE(logits[:, :-1], input_ids[:, 1:])`` weighted by ``loss_mask[:, :-1]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from xlstm_distill.data.encoding import Document, encode_chat, encode_text
from xlstm_distill.data.sources import Source, to_document

STATE_VERSION = 1


class _SourceStream:
    """Documents of one source as token segments; its position is ``(epoch, record, offset)``.

    ``record`` is the index of the document being consumed (or of the next record to read) and ``offset`` the next
    token of that document, so a fresh stream built from the same position continues exactly.
    """

    def __init__(self, source: Source, encoder: Any, seed: int, rank: int, world_size: int, loop: bool) -> None:
        self.source, self.encode, self.seed = source, encoder, seed
        self.rank, self.world_size, self.loop = rank, world_size, loop
        self.epoch = self.record = self.offset = 0
        self._records: Iterator[tuple[int, Any]] | None = None
        self._doc: Document | None = None
        self._docs_this_epoch = 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "record": self.record, "offset": self.offset}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.record, self.offset = state["epoch"], state["record"], state["offset"]
        self._records, self._doc, self._docs_this_epoch = None, None, 1  # resumed epochs did yield documents

    def _load(self) -> bool:
        """Make ``self._doc`` the current document; False when a single-pass source is exhausted."""
        while self._doc is None:
            if self._records is None:
                self._records = self.source.records(self.epoch, self.record, self.seed)
            item = next(self._records, None)
            if item is None:
                if self._docs_this_epoch == 0:
                    raise ValueError(f"Source '{self.source.name}' yielded no documents (for rank {self.rank}).")
                if not self.loop:
                    return False
                self.epoch, self.record, self.offset = self.epoch + 1, 0, 0  # next epoch
                self._records, self._docs_this_epoch = None, 0
                continue
            index, record = item
            self.record = index
            if index % self.world_size != self.rank:
                continue
            doc = to_document(record, self.source, index)
            ids, target = self.encode(doc, self.source) if doc is not None else ([], [])
            if self.offset >= len(ids):  # empty document (or stale offset): skip it
                self.record, self.offset = index + 1, 0
                continue
            self._doc = (ids, target)
            self._docs_this_epoch += 1
        return True

    def take(self, room: int) -> tuple[list[int], list[bool]] | None:
        """Up to ``room`` next tokens of the current document and the target mask of the tokens after each."""
        if not self._load():
            return None
        ids, target = self._doc
        start, stop = self.offset, min(self.offset + room, len(ids))
        if stop == len(ids):
            self._doc, self.record, self.offset = None, self.record + 1, 0
        else:
            self.offset = stop
        return ids[start:stop], target[start + 1 : stop]


class PackedDataset(torch.utils.data.IterableDataset):
    """Packed fixed-length examples from one source or a weighted mixture, deterministic and resumable.

    Every pack comes from a single source, chosen at step ``k`` from ``(seed, rank, k)`` with probability
    proportional to ``Source.weight`` (so token shares follow the weights). Iterating continues from the current
    position; ``state_dict()`` after ``n`` yielded packs restores exactly the same continuation in a fresh dataset.
    Use ``num_workers=0`` with a DataLoader (the position lives in this object).
    """

    def __init__(
        self,
        sources: Source | Sequence[Source],
        tokenizer: Any,
        seq_len: int,
        seed: int = 0,
        *,
        loop: bool = True,
        add_eos: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sources = [sources] if isinstance(sources, Source) else list(sources)
        if not self.sources:
            raise ValueError("PackedDataset needs at least one Source.")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size}).")
        self.tokenizer, self.seq_len, self.seed, self.loop, self.add_eos = tokenizer, seq_len, seed, loop, add_eos
        self.rank, self.world_size = rank, world_size
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())
        self.step = 0
        self.streams = [_SourceStream(s, self._encode, seed, rank, world_size, loop) for s in self.sources]

    def _encode(self, doc: tuple[str, Any], source: Source) -> Document:
        kind, content = doc
        if kind == "text":
            return encode_text(self.tokenizer, content, add_eos=self.add_eos)
        return encode_chat(self.tokenizer, content, loss_on=source.loss_on)

    def choose_source(self, step: int) -> int:
        """Index of the source that pack number ``step`` is drawn from (deterministic in seed, rank and step)."""
        u = np.random.default_rng([self.seed, self.rank, step]).random()
        return min(int(np.searchsorted(self.cum_weights, u, side="right")), len(self.sources) - 1)

    def _pack(self, stream: _SourceStream) -> dict[str, torch.Tensor] | None:
        S = self.seq_len
        input_ids = np.zeros(S, dtype=np.int64)  # (S,)
        document_ids = np.zeros(S, dtype=np.int64)  # (S,)
        position_ids = np.zeros(S, dtype=np.int64)  # (S,)
        loss_mask = np.zeros(S, dtype=bool)  # (S,)
        fill, doc = 0, 0
        while fill < S:
            segment = stream.take(S - fill)
            if segment is None:
                return None  # single pass exhausted: the partial pack is dropped
            ids, next_target = segment
            n = len(ids)
            input_ids[fill : fill + n] = ids
            document_ids[fill : fill + n] = doc
            position_ids[fill : fill + n] = np.arange(n)
            loss_mask[fill : fill + n - 1] = next_target  # the segment's last token predicts nothing here
            fill, doc = fill + n, doc + 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "document_ids": torch.from_numpy(document_ids),
            "position_ids": torch.from_numpy(position_ids),
            "loss_mask": torch.from_numpy(loss_mask),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("PackedDataset keeps its resume position in-process: use DataLoader(num_workers=0).")
        while True:
            index = self.choose_source(self.step)
            example = self._pack(self.streams[index])
            if example is None:
                return
            example["source"] = torch.tensor(index)
            self.step += 1
            yield example

    def iter_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches of ``batch_size`` packs (tensors (B, S)); a final incomplete batch is dropped."""
        batch: list[dict[str, torch.Tensor]] = []
        for example in self:
            batch.append(example)
            if len(batch) == batch_size:
                yield collate(batch)
                batch = []

    def state_dict(self) -> dict[str, Any]:
        """Position after the packs yielded so far (JSON-serializable)."""
        return {
            "version": STATE_VERSION,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "sources": [s.name for s in self.sources],
            "step": self.step,
            "streams": [s.state() for s in self.streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by ``state_dict`` (same sources, seq_len, seed, rank, world_size)."""
        mine = self.state_dict()
        for key in ("version", "seq_len", "seed", "rank", "world_size", "sources"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"Data state mismatch on '{key}': saved {state.get(key)!r}, this dataset {mine[key]!r}."
                )
        self.step = int(state["step"])
        for stream, s in zip(self.streams, state["streams"]):
            stream.set_state(s)


def collate(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed examples: every (S,) tensor becomes (B, S), scalars become (B,)."""
    return {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}
