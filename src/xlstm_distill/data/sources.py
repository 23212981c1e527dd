"""Document sources: local ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` / ``.arrow`` / ``.txt`` files (or folders of
them), Hugging Face datasets, and Python iterables.

Every source is read lazily (line by line, or one Arrow record batch at a time) and can restart at any record
index, which is what makes the packed stream in :mod:`xlstm_distill.data.packing` resumable.
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

Record = dict[str, Any] | str
SUPPORTED_EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet", ".arrow", ".txt")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def file_kind(path: Path) -> str:
    """The supported extension of ``path`` (``.jsonl``, ...) or a ValueError naming the supported ones."""
    name = path.name.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if name.endswith(ext):
            return ext
    raise ValueError(
        f"Unsupported data file type '{''.join(path.suffixes) or path.name}' for {path}; "
        f"supported: {', '.join(SUPPORTED_EXTENSIONS)} (or a Hugging Face dataset name)."
    )


@dataclass
class Source:
    """One text source (one domain of a mixture).

    ``path`` is a local file, a folder (all supported files below it), a glob pattern, a Hugging Face dataset
    name (``"hf:"`` prefix optional; needs the ``datasets`` package), a callable returning an iterable of records,
    or a re-iterable (e.g. a list). A record is a dict or a plain string. A dict holds either plain text under
    ``field`` or a chat under ``messages_field`` (a list of ``{"role", "content"}``; ShareGPT-style
    ``{"from", "value"}`` lists under ``conversations`` are accepted too).
    """

    path: str | Path | Callable[[], Iterable[Record]] | Iterable[Record]
    weight: float = 1.0
    name: str | None = None
    field: str = "text"
    messages_field: str = "messages"
    loss_on: Literal["all", "assistant"] = "all"  # chats: train on all tokens or on assistant turns only
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"  # what one document is in a .txt file
    split: str = "train"  # Hugging Face datasets only
    hf_config: str | None = None  # Hugging Face datasets only
    shuffle_files: bool = True  # visit the files of a folder / glob in a seeded order, new each epoch

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"Source weight must be > 0, got {self.weight}.")
        if self.loss_on not in ("all", "assistant"):
            raise ValueError(f"loss_on must be 'all' or 'assistant', got {self.loss_on!r}.")
        if self.sample_by not in ("line", "paragraph", "document"):
            raise ValueError(f"sample_by must be 'line', 'paragraph' or 'document', got {self.sample_by!r}.")
        self._kind, self._files = self._resolve()
        if self.name is None:
            self.name = str(self.path) if self._kind != "python" else getattr(self.path, "__name__", "iterable")

    # -- resolution -------------------------------------------------------------------------------------------
    def _resolve(self) -> tuple[str, list[Path]]:
        path = self.path
        if callable(path) or not isinstance(path, (str, Path)):
            if not callable(path) and not isinstance(path, Iterable):
                raise TypeError(f"Source path must be a path, a dataset name, a callable or an iterable, got {path!r}.")
            return "python", []
        text = str(path)
        if text.startswith("hf:"):
            return "hf", []
        if any(ch in text for ch in "*?["):
            files = sorted(Path(p) for p in globlib.glob(str(Path(text).expanduser()), recursive=True))
            files = [f for f in files if f.is_file()]
            if not files:
                raise FileNotFoundError(f"No files match the pattern {text}.")
            for f in files:
                file_kind(f)
            return "files", files
        local = Path(text).expanduser()
        if local.is_file():
            file_kind(local)
            return "files", [local]
        if local.is_dir():
            files = sorted(f for f in local.rglob("*") if f.is_file() and _supported(f))
            if not files:
                raise FileNotFoundError(f"Folder {local} holds no {', '.join(SUPPORTED_EXTENSIONS)} files.")
            return "files", files
        if local.suffix or text.startswith(("/", ".", "~")) or "\\" in text:
            raise FileNotFoundError(f"Data file {local} does not exist.")
        return "hf", []  # e.g. "HuggingFaceTB/smoltalk": a hub dataset id

    @property
    def kind(self) -> str:
        """``files``, ``hf`` or ``python``."""
        return self._kind

    # -- reading ----------------------------------------------------------------------------------------------
    def records(self, epoch: int = 0, start: int = 0, seed: int = 0) -> Iterator[tuple[int, Record]]:
        """Yield ``(index, record)`` for this epoch, starting at record ``start`` (skipped records are not parsed)."""
        if self._kind == "python":
            items = self.path() if callable(self.path) else self.path
            yield from enumerate(islice(items, start, None), start)
        elif self._kind == "hf":
            yield from enumerate(self._hf_records(start), start)
        else:
            files = list(self._files)
            if self.shuffle_files and len(files) > 1:
                random.Random(f"{seed}/{epoch}").shuffle(files)
            index = 0
            for file in files:
                for record in _read_file(file, max(0, start - index), self):
                    if record is not None:
                        yield index, record
                    index += 1

    def _hf_records(self, start: int) -> Iterator[Record]:
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                f"'{self.path}' is not a local file or folder, so it is read as a Hugging Face dataset; that needs the "
                "optional package `datasets` (pip install datasets). For local data pass an existing "
                f"{'/'.join(SUPPORTED_EXTENSIONS)} file or folder."
            ) from err
        name = str(self.path).removeprefix("hf:")
        if Path(name).expanduser().is_dir() and (Path(name).expanduser() / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(Path(name).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[self.split]
            ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(name, self.hf_config, split=self.split, streaming=True)
        yield from ds.skip(start) if start else ds


def _supported(path: Path) -> bool:
    try:
        file_kind(path)
        return True
    except ValueError:
        return False


def _read_file(path: Path, skip: int, source: Source) -> Iterator[Record | None]:
    """Records of one file, in order; the first ``skip`` ones are yielded as ``None`` without being parsed."""
    kind = file_kind(path)
    if kind in (".jsonl", ".jsonl.gz"):
        opener = gzip.open if kind == ".jsonl.gz" else open
        with opener(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if skip > 0:
                    skip -= 1
                    yield None
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg}).") from err
    elif kind == ".txt":
        yield from _read_txt(path, skip, source.sample_by)
    else:
        yield from _read_arrow_like(path, kind, skip, source)


def _read_txt(path: Path, skip: int, sample_by: str) -> Iterator[str | None]:
    def emit(doc: str) -> Iterator[str | None]:
        nonlocal skip
        if skip > 0:
            skip -= 1
            yield None
        else:
            yield doc

    with open(path, encoding="utf-8") as fh:
        if sample_by == "document":
            yield from emit(fh.read())
            return
        lines: list[str] = []
        for line in fh:
            if sample_by == "line":
                if line.strip():
                    yield from emit(line.rstrip("\n"))
            elif line.strip():
                lines.append(line)
            elif lines:
                yield from emit("".join(lines).rstrip("\n"))
                lines = []
        if lines:
            yield from emit("".join(lines).rstrip("\n"))


def _read_arrow_like(path: Path, kind: str, skip: int, source: Source) -> Iterator[Record | None]:
    """Parquet or Arrow (IPC stream, as written by ``datasets.save_to_disk``, or IPC file), one batch at a time."""
    import pyarrow as pa

    if kind == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        columns = _columns(pf.schema_arrow.names, source, path)

        def batches() -> Iterator[tuple[int, Callable[[], pa.RecordBatch] | None]]:
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                yield n, (lambda rg=rg: pf.read_row_group(rg, columns=columns))

        groups = batches()
    else:
        mm = pa.memory_map(str(path))
        try:
            reader: Any = pa.ipc.open_stream(mm)
            groups = ((b.num_rows, (lambda b=b: b)) for b in reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(mm)
            groups = (
                (reader.get_batch(i).num_rows, (lambda i=i: reader.get_batch(i)))
                for i in range(reader.num_record_batches)
            )
        columns = _columns(reader.schema.names, source, path)
    for n, load in groups:
        if skip >= n:
            skip -= n
            yield from (None for _ in range(n))
            continue
        yield from (None for _ in range(skip))
        table = load().select(columns)
        yield from table.slice(skip).to_pylist()
        skip = 0


def _columns(names: list[str], source: Source, path: Path) -> list[str]:
    columns = [c for c in (source.field, source.messages_field, "conversations") if c in names]
    if not columns:
        raise ValueError(_missing_field_message(source, f"{path}", names))
    return columns[:1]


def _missing_field_message(source: Source, where: str, fields: Iterable[str]) -> str:
    return (
        f"{where} has no text field '{source.field}' and no chat field '{source.messages_field}' "
        f"(fields: {sorted(fields)}); pass Source(field=...) or Source(messages_field=...)."
    )


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chat turns as ``[{"role", "content"}]`` with roles system/user/assistant (ShareGPT ``from/value`` accepted)."""
    out = []
    for msg in messages:
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"Chat message needs string 'role' and 'content' (or 'from' and 'value'), got {msg!r}.")
        out.append({"role": ROLE_ALIASES.get(role, role), "content": content})
    return out


def to_document(record: Record, source: Source, index: int) -> tuple[str, Any] | None:
    """``("text", str)`` or ``("chat", messages)`` for a record, ``None`` for an empty one."""
    if isinstance(record, str):
        return ("text", record) if record else None
    if not isinstance(record, dict):
        raise ValueError(f"Record {index} of source '{source.name}' is a {type(record).__name__}, not a dict or str.")
    if source.field in record:
        text = record[source.field]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"Field '{source.field}' of record {index} of '{source.name}' is not a string.")
        return ("text", text) if text else None
    for key in (source.messages_field, "conversations"):
        if key in record:
            messages = normalize_messages(record[key] or [])
            return ("chat", messages) if messages else None
    raise ValueError(_missing_field_message(source, f"Record {index} of source '{source.name}'", record))
