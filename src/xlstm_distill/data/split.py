"""The data splits, decided per document by a hash of its content (the same documents in every run, whatever the
order or the mixture): one document in ``HELD_OUT_EVERY`` is held out for the report and training sees the rest. A
recipe that chooses Stage III's merge weights on held-out text (``experts.sweep``) holds out another one in
``HELD_OUT_EVERY``, the sweep split: the report's documents and the sweep's never overlap, and no stage trains on
either. Without it those documents stay in training, so recipes without a sweep train on the same text as before."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from xlstm_distill.data.sources import Source

HELD_OUT_EVERY = 50
SPLITS = ("train", "held_out", "sweep")
# How a document's split is decided with a sweep split; then part of the fingerprint of Stage II's targets (made from
# the train split).
SPLIT_RULE = f"sha1(record)[:4] % {HELD_OUT_EVERY}: 0 held_out, 1 sweep, else train"


def split_of(record: Any, sweep_split: bool = True) -> str:
    """``"held_out"``, ``"sweep"`` or ``"train"``: the split of one source record (a dict or a string); without
    ``sweep_split`` the sweep documents belong to ``"train"``."""
    digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).digest()
    bucket = int.from_bytes(digest[:4], "little") % HELD_OUT_EVERY
    return "held_out" if bucket == 0 else "sweep" if bucket == 1 and sweep_split else "train"


def data_split(source: Source, split: str, sweep_split: bool = True) -> Source:
    """A view of ``source`` holding only the documents of ``split`` (one of ``SPLITS``); ``sweep_split=False``
    leaves the sweep documents in training (a recipe without ``experts.sweep``)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown data split {split!r}; choose one of {', '.join(SPLITS)}.")
    if split == "sweep" and not sweep_split:
        raise ValueError("The sweep split exists only where it is held out of training: give the recipe an "
                         "`experts.sweep` section (before Stage I, so that no stage trains on it).")

    def records():
        for _, record in source.records(seed=0):
            if split_of(record, sweep_split) == split:
                yield record
    records.__name__ = f"{source.name}:{split}"
    return Source(records, weight=source.weight, name=records.__name__, field=source.field,
                  messages_field=source.messages_field, loss_on=source.loss_on)


def held_out_split(source: Source, held_out: bool, sweep_split: bool = False) -> Source:
    """A view of ``source`` holding only its held-out (report) or only its training documents."""
    return data_split(source, "held_out" if held_out else "train", sweep_split)
