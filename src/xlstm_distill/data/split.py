"""The held-out split: one document in ``HELD_OUT_EVERY``, chosen by a hash of its content, is kept out of training
(the same documents in every run, whatever the order or the mixture)."""

from __future__ import annotations

import hashlib
import json

from xlstm_distill.data.sources import Source

HELD_OUT_EVERY = 50


def held_out_split(source: Source, held_out: bool) -> Source:
    """A view of ``source`` holding only its held-out (or only its training) documents."""
    def records():
        for _, record in source.records(seed=0):
            digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).digest()
            if (int.from_bytes(digest[:4], "little") % HELD_OUT_EVERY == 0) == held_out:
                yield record
    records.__name__ = f"{source.name}:{'held_out' if held_out else 'train'}"
    return Source(records, weight=source.weight, name=records.__name__, field=source.field,
                  messages_field=source.messages_field, loss_on=source.loss_on)
