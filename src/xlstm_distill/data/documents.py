"""Whole long documents (not packed): what long-context measurements run on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from xlstm_distill.data.encoding import encode_chat, encode_text
from xlstm_distill.data.sources import Source, to_document


def long_documents(sources: Sequence[Source], tokenizer: Any, length: int, count: int,
                   scan: int = 100_000) -> list[torch.Tensor]:
    """Up to ``count`` documents of at least ``length`` tokens, each cut to its first ``length`` tokens (1-D long
    tensors), taken from the sources in turn (so that every domain with long documents is represented); at most
    ``scan`` records are read per source."""
    if length < 2 or count < 1:
        raise ValueError(f"long_documents needs length >= 2 and count >= 1, got {length} and {count}.")
    streams = [_long(source, tokenizer, length, scan) for source in sources]
    out: list[torch.Tensor] = []
    while streams and len(out) < count:
        for stream in list(streams):
            doc = next(stream, None)
            if doc is None:
                streams.remove(stream)
            elif len(out) < count:
                out.append(doc)
    return out


def _long(source: Source, tokenizer: Any, length: int, scan: int):
    for index, record in source.records():
        if index >= scan:
            return
        doc = to_document(record, source, index)
        if doc is None:
            continue
        kind, content = doc
        if kind == "text" and len(content) < length:  # fewer characters than tokens needed: too short
            continue
        ids = (encode_text(tokenizer, content) if kind == "text" else encode_chat(tokenizer, content))[0]
        if len(ids) >= length:
            yield torch.tensor(ids[:length], dtype=torch.long)
