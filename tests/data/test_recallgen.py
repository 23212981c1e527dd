"""Recall practice documents: every fact precedes its question, the answer is the fact's value, the distances follow
the settings, the stream is deterministic, and the offline corpora gain the domain without losing the others."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from xlstm_distill.data import build_offline_corpora, offline_sources
from xlstm_distill.data.recallgen import TEMPLATES, recall_document, recall_documents

TEXT = [{"text": " ".join(f"Sentence {i} of paragraph {p} says something plain." for i in range(40)) + "\n"}
        for p in range(60)]


def _pairs(text: str) -> list[tuple[int, int, str, str]]:
    """(fact position, question position, the fact's value, the answer's value) for every question in ``text``."""
    out = []
    for question in re.finditer(r"Question: (.+?)\? Answer: (.+?)\.(?:\n| )", text):
        key = next(k for k in re.findall(r"[A-Z][a-z]{5,}", question.group(1)) if not k.startswith(("Which", "What", "How")))
        fact = next(m for m in re.finditer(rf"[^.?]*\b{key}\b[^.?]*\.", text) if "Question" not in m.group())
        value = re.search(r"\d+", fact.group()).group()
        out.append((fact.start(), question.start(), value, re.search(r"\d+", question.group(2)).group()))
    return out


def test_facts_come_before_their_questions_with_the_same_value():
    docs = list(itertools.islice(recall_documents(TEXT, seed=3, min_chars=3_000, max_chars=6_000, min_gap=300,
                                                  max_gap=2_000, facts_per_kchar=1.0), 6))
    assert len(docs) == 6
    for doc in docs:
        pairs = _pairs(doc["text"])
        assert len(pairs) == doc["facts"] >= 2
        for fact_at, question_at, value, answer in pairs:
            assert fact_at < question_at and value == answer
        assert all(300 <= gap <= 2_000 + 200 for gap in doc["gaps"])  # drawn gap, moved to the next sentence end
    # deterministic in the seed, different across seeds
    again = list(itertools.islice(recall_documents(TEXT, seed=3, min_chars=3_000, max_chars=6_000, min_gap=300,
                                                   max_gap=2_000, facts_per_kchar=1.0), 6))
    assert again == docs
    other = next(recall_documents(TEXT, seed=4, min_chars=3_000, max_chars=6_000, min_gap=300, max_gap=2_000))
    assert other["text"] != docs[0]["text"]


def test_templates_are_not_the_evaluation_prompts():
    words = " ".join(part for template in TEMPLATES for part in template).lower()
    assert "magic number" not in words and " code is" not in words


def test_short_text_and_bad_settings():
    import random

    assert recall_document("Too short.", random.Random(0), 200, 2_000, 1.0) is None
    with pytest.raises(ValueError, match="min_gap < max_gap"):
        next(recall_documents(TEXT, min_gap=500, max_gap=100))


def test_offline_corpora_add_the_domain_to_an_existing_folder(tmp_path, monkeypatch):
    """Building `recall` into a folder with other corpora keeps them in the manifest; a recipe weight naming a
    domain the folder lacks is refused with the command that adds it."""
    from xlstm_distill.data import offline

    monkeypatch.setattr(offline, "prose_records", lambda seed, linux_doc=True: iter(TEXT))
    build_offline_corpora(tmp_path, max_bytes_per_domain=40_000, domains=["prose"], decontaminate_docs=False)
    with pytest.raises(ValueError, match="data offline --out .* --domain recall"):
        offline_sources(tmp_path, {"prose": 1.0, "recall": 0.5})
    manifest = build_offline_corpora(tmp_path, max_bytes_per_domain=40_000, domains=["recall"],
                                     decontaminate_docs=False)
    assert set(manifest["domains"]) == {"prose", "recall"}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    record = json.loads((tmp_path / "recall.jsonl").read_text().splitlines()[0])
    assert "Question:" in record["text"] and record["facts"] >= 1
    assert [s.name for s in offline_sources(tmp_path, {"prose": 1.0, "recall": 0.5})] == ["prose", "recall"]
