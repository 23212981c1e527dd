"""Recall practice: real text with key-value facts hidden in it and questions about them further on.

A constant-size memory has to learn to keep a detail that the sliding window has long lost. Ordinary text rarely asks
for one, so its training signal for that is weak. Each recall document is a stretch of prose (the ``prose`` corpus's
text) with facts such as ``The locker of Vebraniko holds number 41726.`` inserted at line and sentence ends, and for
each fact a question with its answer (``Question: which number does the locker of Vebraniko hold? Answer: 41726.``)
inserted later in the text. The distance from a fact to its question is drawn log-uniformly from ``min_gap`` to
``max_gap`` characters, so that at every window and sequence length some questions reach beyond the window and some do
not; the teacher answers from its full attention, and distillation passes that on to the student's memory.

The templates, keys and values are deliberately unlike the prompts that evaluation uses (RULER's "special magic
number" haystacks, the head-selection needles ``The <key> code is <digits>.``). Deterministic from the seed.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Iterable, Iterator
from typing import Any

# (fact, question, answer) templates; {key} is an invented name, {value} a number
TEMPLATES = (
    ("The locker of {key} holds number {value}.", "Which number does the locker of {key} hold?", "{value}"),
    ("Remember that {key} was assigned badge {value}.", "What badge was {key} assigned?", "badge {value}"),
    ("For the record, the {key} account uses PIN {value}.", "What PIN does the {key} account use?", "PIN {value}"),
    ("Ticket {value} belongs to {key}.", "Which ticket belongs to {key}?", "ticket {value}"),
    ("The shipment labelled {key} weighs {value} grams.", "How many grams does the shipment labelled {key} weigh?",
     "{value} grams"),
)
SYLLABLES = ("ba", "ve", "ri", "ko", "lu", "ta", "ne", "mi", "so", "da", "fe", "gu", "ha", "jo", "ki", "pe", "ru",
             "sa", "ti", "zo", "bra", "dri", "gla", "plo", "stu", "tre", "vin", "mar", "nel", "tor")
BREAK = re.compile(r"(?<=[.!?])\s+|\n+")  # where an inserted sentence reads naturally: after a sentence or line


def invented_name(rng: random.Random) -> str:
    """A capitalized pronounceable non-word of 3-4 syllables (unlikely to occur in the haystack)."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(3, 4))).capitalize()


def recall_document(haystack: str, rng: random.Random, min_gap: int, max_gap: int,
                    facts_per_kchar: float) -> dict[str, Any] | None:
    """One recall document from ``haystack`` text, or None when the text is too short for one fact and its question.
    Returns ``{"text", "facts", "gaps"}``: the facts asked and each fact's distance to its question in characters."""
    found = list(BREAK.finditer(haystack))
    breaks = [m.end() for m in found]
    line_start = {m.end() for m in found if "\n" in m.group()}  # there an insert is a line of its own
    if len(haystack) < 2 * min_gap or len(breaks) < 2:
        return None
    count = max(1, round(len(haystack) / 1000 * facts_per_kchar))
    inserts: list[tuple[int, int, str]] = []  # (position in the haystack, order at that position, text)
    gaps = []
    for _ in range(count):
        gap = math.exp(rng.uniform(math.log(min_gap), math.log(max_gap)))
        if gap >= breaks[-1] - breaks[0]:
            continue
        fact_at = rng.uniform(breaks[0], breaks[-1] - gap)
        f = bisect.bisect_left(breaks, fact_at)
        q = bisect.bisect_left(breaks, breaks[f] + gap)
        if q >= len(breaks) or q == f:
            continue
        fact, question, answer = rng.choice(TEMPLATES)
        fields = {"key": invented_name(rng), "value": str(rng.randrange(10 ** rng.randint(3, 5), 10 ** 6))}
        asked = f"Question: {question.format(**fields)} Answer: {answer.format(**fields)}."
        for order, at, text in ((0, breaks[f], fact.format(**fields)), (1, breaks[q], asked)):
            inserts.append((at, order, text + ("\n" if at in line_start else " ")))
        gaps.append(breaks[q] - breaks[f])
    if not gaps:
        return None
    pieces, last = [], 0
    for at, _, text in sorted(inserts):
        pieces += [haystack[last:at], text]
        last = at
    pieces.append(haystack[last:])
    return {"text": "".join(pieces), "facts": len(gaps), "gaps": gaps}


def recall_documents(haystack: Iterable[dict[str, Any]], seed: int = 0, min_chars: int = 4_000,
                     max_chars: int = 32_000, min_gap: int = 200, max_gap: int = 24_000,
                     facts_per_kchar: float = 0.5) -> Iterator[dict[str, Any]]:
    """Recall documents from text records (``{"text": ...}``, e.g. the prose corpus's): consecutive records joined
    into stretches of ``min_chars`` to ``max_chars`` characters (drawn uniformly), each with about
    ``facts_per_kchar`` facts per 1,000 characters (see :func:`recall_document`). Ends with the haystack."""
    if not 0 < min_gap < max_gap or not 0 < min_chars <= max_chars or facts_per_kchar <= 0:
        raise ValueError("recall_documents needs 0 < min_gap < max_gap, 0 < min_chars <= max_chars and "
                         "facts_per_kchar > 0.")
    rng = random.Random(seed)
    target, parts, size = rng.randint(min_chars, max_chars), [], 0
    for record in haystack:
        text = record.get("text", "").strip()
        if not text:
            continue
        parts.append(text)
        size += len(text)
        while size >= target:
            joined = "\n\n".join(parts)
            stretch, rest = joined[:target], joined[target:]
            document = recall_document(stretch, rng, min_gap, max_gap, facts_per_kchar)
            if document is not None:
                yield document
            parts, size = ([rest], len(rest)) if rest.strip() else ([], 0)
            target = rng.randint(min_chars, max_chars)
