"""Sources, packing, mixtures and resume with a tiny word-level tokenizer (no model files needed)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from xlstm_distill.data import PackedDataset, Source, collate

EOS = 2


class IntTokenizer:
    """Text of space-separated integers -> those integers; EOS = 2."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [int(w) for w in text.split()]}


TOK = IntTokenizer()


def make_docs(n: int, seed: int, base: int = 10, max_len: int = 23) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(0, max_len))  # includes empty documents and ones longer than seq_len
        docs.append(" ".join(str(base + int(t)) for t in rng.integers(0, 50, length)))
    return docs


def reference_packs(docs: list[str], seq_len: int) -> list[dict[str, np.ndarray]]:
    """Concatenate all documents (each + EOS), cut into seq_len chunks, derive ids/positions/mask from runs."""
    tokens, doc_of = [], []
    for i, d in enumerate(x for x in docs if x):
        ids = [int(w) for w in d.split()] + [EOS]
        tokens += ids
        doc_of += [i] * len(ids)
    packs = []
    for k in range(len(tokens) // seq_len):
        t = np.array(tokens[k * seq_len : (k + 1) * seq_len])
        d = np.array(doc_of[k * seq_len : (k + 1) * seq_len])
        new = np.r_[True, d[1:] != d[:-1]]
        doc_ids = np.cumsum(new) - 1
        starts = np.maximum.accumulate(np.where(new, np.arange(seq_len), 0))
        mask = np.r_[d[1:] == d[:-1], False]
        packs.append(
            {"input_ids": t, "document_ids": doc_ids, "position_ids": np.arange(seq_len) - starts, "loss_mask": mask}
        )
    return packs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def take(ds: PackedDataset, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(ds), n))


@pytest.mark.parametrize("seq_len", [7, 16, 64])
def test_packing_matches_reference(tmp_path: Path, seq_len: int) -> None:
    docs = make_docs(60, seed=seq_len)
    ds = PackedDataset(Source(write_jsonl(tmp_path / "d.jsonl", docs)), TOK, seq_len, loop=False)
    got = list(ds)
    want = reference_packs(docs, seq_len)
    assert len(got) == len(want) > 3
    for g, w in zip(got, want):
        for key in ("input_ids", "document_ids", "position_ids", "loss_mask"):
            assert g[key].shape == (seq_len,)
            np.testing.assert_array_equal(g[key].numpy(), w[key], err_msg=key)
    assert got[0]["loss_mask"].dtype == torch.bool and got[0]["input_ids"].dtype == torch.int64


def test_collate_stacks_to_batch(tmp_path: Path) -> None:
    ds = PackedDataset(Source(write_jsonl(tmp_path / "d.jsonl", make_docs(40, 1))), TOK, 12)
    batch = next(ds.iter_batches(5))
    assert batch["input_ids"].shape == batch["document_ids"].shape == batch["loss_mask"].shape == (5, 12)
    assert batch["source"].shape == (5,)
    assert not batch["loss_mask"][:, -1].any()  # last column never has a target inside the pack


def _mixture(seed: int) -> PackedDataset:
    def endless(base: int):
        return lambda: (f"{base + i % 7} {base + 1} {base + 2}" for i in itertools.count())

    sources = [Source(endless(100 * (k + 1)), weight=w, name=f"s{k}") for k, w in enumerate([0.6, 0.3, 0.1])]
    return PackedDataset(sources, TOK, 8, seed=seed)


def test_mixture_weights_and_determinism() -> None:
    packs = take(_mixture(seed=3), 3000)
    chosen = np.array([int(p["source"]) for p in packs])
    freq = np.bincount(chosen, minlength=3) / len(chosen)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.03)
    for p in packs[:200]:  # each pack holds only its own source's tokens
        k = int(p["source"])
        assert ((p["input_ids"] == EOS) | (p["input_ids"] // 100 == k + 1)).all()
    again = np.array([int(p["source"]) for p in take(_mixture(seed=3), 3000)])
    other = np.array([int(p["source"]) for p in take(_mixture(seed=4), 3000)])
    assert (again == chosen).all()
    assert (other != chosen).mean() > 0.2


def _resume_sources(tmp_path: Path) -> list[Source]:
    jsonl = write_jsonl(tmp_path / "a.jsonl", make_docs(30, 1))
    txt = tmp_path / "b.txt"
    txt.write_text("\n\n".join(d for d in make_docs(25, 2, base=200) if d) + "\n")
    table = pa.table({"text": make_docs(40, 3, base=300)})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=7)
    return [
        Source(jsonl, weight=2.0),
        Source(txt, weight=1.0),
        Source(tmp_path / "c.parquet", weight=1.0),
        Source(lambda: (f"{400 + i} {401 + i}" for i in range(3)), weight=0.5, name="gen"),
    ]


@pytest.mark.parametrize("n_first", [1, 7, 23])
def test_resume_equals_uninterrupted_run(tmp_path: Path, n_first: int) -> None:
    full = PackedDataset(_resume_sources(tmp_path), TOK, 11, seed=5)
    packs = take(full, (n_first + 6) * 3)
    reference = [collate(packs[i : i + 3]) for i in range(0, len(packs), 3)]
    assert max(s["epoch"] for s in full.state_dict()["streams"]) >= 1  # the run wrapped around epochs

    first = PackedDataset(_resume_sources(tmp_path), TOK, 11, seed=5)
    batches = first.iter_batches(3)
    head = [next(batches) for _ in range(n_first)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint

    fresh = PackedDataset(_resume_sources(tmp_path), TOK, 11, seed=5)
    fresh.load_state_dict(state)
    tail = list(itertools.islice(fresh.iter_batches(3), 6))
    for got, want in zip(head + tail, reference, strict=True):
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_resume_with_torch_dataloader(tmp_path: Path) -> None:
    def loader(ds: PackedDataset) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=0)

    uninterrupted = list(itertools.islice(loader(PackedDataset(_resume_sources(tmp_path), TOK, 9, seed=1)), 8))
    ds = PackedDataset(_resume_sources(tmp_path), TOK, 9, seed=1)
    head = list(itertools.islice(loader(ds), 5))
    fresh = PackedDataset(_resume_sources(tmp_path), TOK, 9, seed=1)
    fresh.load_state_dict(ds.state_dict())
    tail = list(itertools.islice(loader(fresh), 3))
    for got, want in zip(head + tail, uninterrupted, strict=True):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["loss_mask"], want["loss_mask"])


def test_load_state_rejects_other_config(tmp_path: Path) -> None:
    state = PackedDataset(_resume_sources(tmp_path), TOK, 9, seed=1).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(_resume_sources(tmp_path), TOK, 10, seed=1).load_state_dict(state)


def test_streaming_never_reads_ahead(tmp_path: Path) -> None:
    # An endless generator source: reading it whole would never finish.
    consumed = []

    def endless():
        for i in itertools.count():
            consumed.append(i)
            yield " ".join(["7"] * 5)

    packs = take(PackedDataset(Source(endless), TOK, 16), 4)
    assert len(packs) == 4 and len(consumed) < 20
    # A jsonl file whose tail is broken: the first packs come out, the error only when the reader gets there.
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": "5 6 7 8"}) + "\n" for _ in range(50)) + "{not json\n")
    ds = PackedDataset(Source(path), TOK, 10, loop=False)
    it = iter(ds)
    assert len(list(itertools.islice(it, 5))) == 5
    with pytest.raises(ValueError, match=r"big\.jsonl:51"):
        list(it)


def test_rank_shards_are_disjoint_and_complete(tmp_path: Path) -> None:
    docs = [f"{1000 + i} {1000 + i}" for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    seen = []
    for rank in range(2):
        packs = list(PackedDataset(Source(path), TOK, 3, loop=False, rank=rank, world_size=2))
        seen.append({int(t) for p in packs for t in p["input_ids"] if t != EOS})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {1000 + i for i in range(40)}


def test_txt_document_modes(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("1 2\n3\n\n4 5\n\n\n6\n")
    for mode, want in [("paragraph", ["1 2\n3", "4 5", "6"]), ("line", ["1 2", "3", "4 5", "6"]), ("document", None)]:
        got = [r for _, r in Source(path, sample_by=mode).records()]
        assert got == (want or [path.read_text()])


def test_arrow_and_folder_sources(tmp_path: Path) -> None:
    table = pa.table({"text": ["11 12", "13", "14 15 16"], "other": [1, 2, 3]})
    (tmp_path / "ds").mkdir()
    with pa.ipc.new_stream(tmp_path / "ds" / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    write_jsonl(tmp_path / "ds" / "more.jsonl", ["17"])
    records = [r for _, r in Source(tmp_path / "ds", shuffle_files=False).records()]
    assert [r["text"] for r in records] == ["11 12", "13", "14 15 16", "17"]
    assert [r for _, r in Source(tmp_path / "ds", shuffle_files=False).records(start=2)][0]["text"] == "14 15 16"


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Source(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"Unsupported data file type '\.csv'"):
        Source(tmp_path / "data.csv")
    path = write_jsonl(tmp_path / "c.jsonl", ["1 2 3"], field="content")
    with pytest.raises(ValueError, match="no text field 'text'.*content"):
        take(PackedDataset(Source(path), TOK, 4), 1)
    assert len(take(PackedDataset(Source(path, field="content"), TOK, 4), 1)) == 1
    pq.write_table(pa.table({"body": ["1 2"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="no text field 'text'"):
        take(PackedDataset(Source(tmp_path / "p.parquet"), TOK, 4), 1)
    with pytest.raises(ValueError, match="weight"):
        Source(path, weight=0)


def test_hub_dataset_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: `import datasets` raises ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        take(PackedDataset(Source("someone/some-dataset"), TOK, 4), 1)


def test_hub_dataset_goes_through_datasets_streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeStream:
        def __init__(self, rows: list[dict]) -> None:
            self.rows = rows

        def skip(self, n: int) -> FakeStream:
            calls.append(("skip", n))
            return FakeStream(self.rows[n:])

        def __iter__(self):
            return iter(self.rows)

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return FakeStream([{"text": f"{10 + i} {11 + i} {12 + i}"} for i in range(50)])

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    source = Source("org/corpus", hf_config="en", split="train")
    assert source.kind == "hf"
    ds = PackedDataset(source, TOK, 6)
    head = take(ds, 3)  # 18 tokens: documents 0-3 (4 tokens each with EOS) and half of document 4
    assert calls[0] == ("org/corpus", "en", "train", True)
    fresh = PackedDataset(Source("org/corpus", hf_config="en"), TOK, 6)
    fresh.load_state_dict(ds.state_dict())
    want = take(PackedDataset(Source("org/corpus", hf_config="en"), TOK, 6), 5)[3:]
    assert [p["input_ids"].tolist() for p in take(fresh, 2)] == [p["input_ids"].tolist() for p in want]
    assert ("skip", 4) in calls and head[0]["input_ids"].tolist() == [10, 11, 12, EOS, 11, 12]
