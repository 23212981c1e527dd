"""Stage III: linear weight merging of experts (Eq. 14), ``theta = sum_i lambda_i theta_i``.

The experts are model folders written by ``save_pretrained`` (safetensors, one file or sharded with
``model.safetensors.index.json``), distilled from the same Stage-I checkpoint. The merge streams: it opens every
expert's safetensors files, and for one tensor at a time accumulates ``sum_i lambda_i theta_i`` in
float32 (float64 if the tensor is stored in float64), casts it back to the stored dtype and appends it to the
output shard being filled. The experts are read with plain file reads, not memory-mapped (:class:`TensorFile`), so
peak memory is about one output shard plus a few copies of the largest tensor, not one model per expert.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

# config.json keys that do not describe the architecture (or describe only how the weights were stored).
IGNORED_CONFIG_KEYS = frozenset(
    {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash", "use_cache"}
)
# Tokenizer files compared (by content hash) and copied to the merged folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Keys of tokenizer JSON files that record where the tokenizer was loaded from, not what it is.
IGNORED_TOKENIZER_KEYS = frozenset({"name_or_path", "_name_or_path", "is_local", "local_files_only"})
OTHER_FILES = ("generation_config.json",)
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
MERGE_INFO = "merge_info.json"

__all__ = ["MergeError", "check_compatible", "check_output_folder", "merge", "merged_tensors", "normalize_weights", "open_experts"]


class MergeError(ValueError):
    """The experts cannot be merged (different architecture, tensors or tokenizer; bad weights; bad paths)."""


# ---------------------------------------------------------------------------------------------- checks


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Uniform weights by default; otherwise non-negative, finite, not all zero, normalized to sum 1."""
    if n < 1:
        raise MergeError("Give at least one expert to merge.")
    if weights is None:
        return [1.0 / n] * n
    weights = list(weights)
    if len(weights) != n:
        raise MergeError(f"Got {len(weights)} weights for {n} experts; give one weight per expert (or none).")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise MergeError(f"Weight {i + 1} must be a finite number, not {w!r}.")
        if w < 0:
            raise MergeError(f"Weights must be non-negative (lambda_i >= 0); weight {i + 1} is {w}.")
    total = math.fsum(weights)
    if total <= 0:
        raise MergeError("The weights sum to 0; at least one expert needs a positive weight.")
    return [float(w) / total for w in weights]


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise MergeError(f"{folder} has no config.json: pass folders written by save_pretrained.")
    return json.loads(path.read_text())


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        if not prefix and key in IGNORED_CONFIG_KEYS:
            continue
        name = f"{prefix}{key}"
        if key not in a:
            diffs.append(f"{name}: missing vs {b[key]!r}")
        elif key not in b:
            diffs.append(f"{name}: {a[key]!r} vs missing")
        elif isinstance(a[key], dict) and isinstance(b[key], dict):
            diffs.extend(_config_diff(a[key], b[key], prefix=f"{name}."))
        elif a[key] != b[key]:
            diffs.append(f"{name}: {a[key]!r} vs {b[key]!r}")
    return diffs


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file of a model folder."""
    index = folder / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise MergeError(f"{index} lists {path.name}, which is missing.")
        return files
    single = folder / SAFE_SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as fh:
            return {name: single for name in fh.keys()}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise MergeError(
            f"{folder} has PyTorch pickle weights but no safetensors; re-save it with "
            "model.save_pretrained(folder) (safetensors is the default)."
        )
    raise MergeError(f"{folder} has no {SAFE_SINGLE} or {SAFE_INDEX}.")


def _tensor_specs(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    specs = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as fh:
            available = set(fh.keys())
            for name in names:
                if name not in available:
                    raise MergeError(f"The index of {path.parent} puts '{name}' in {path.name}, which lacks it.")
                sl = fh.get_slice(name)
                specs[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return specs


def _tokenizer_fingerprint(folder: Path) -> dict[str, str]:
    out = {}
    for fname in TOKENIZER_FILES:
        path = folder / fname
        if not path.is_file():
            continue
        data = path.read_bytes()
        if fname.endswith(".json"):
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                obj = {k: v for k, v in obj.items() if k not in IGNORED_TOKENIZER_KEYS}
                data = json.dumps(obj, sort_keys=True).encode()
        out[fname] = hashlib.sha256(data).hexdigest()
    return out


def _short(diffs: list[str], limit: int = 8) -> str:
    text = "; ".join(diffs[:limit])
    return text + (f"; ... ({len(diffs) - limit} more)" if len(diffs) > limit else "")


def check_compatible(folders: list[Path]) -> tuple[dict[str, Path], dict[str, tuple[tuple[int, ...], str]]]:
    """Refuse experts that differ in config, tensor names, shapes or tokenizer. Returns expert 1's layout."""
    ref = folders[0]
    ref_config = _config(ref)
    ref_files = _weight_files(ref)
    ref_specs = _tensor_specs(ref_files)
    ref_tok = _tokenizer_fingerprint(ref)
    for i, folder in enumerate(folders[1:], start=2):
        what = f"Expert {i} ({folder}) differs from expert 1 ({ref})"
        diffs = _config_diff(ref_config, _config(folder))
        if diffs:
            raise MergeError(f"{what} in config.json (different architecture): {_short(diffs)}")
        specs = _tensor_specs(_weight_files(folder))
        missing, extra = sorted(set(ref_specs) - set(specs)), sorted(set(specs) - set(ref_specs))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"tensors missing: {_short(missing)}")
            if extra:
                parts.append(f"extra tensors: {_short(extra)}")
            raise MergeError(f"{what} in tensor names: " + "; ".join(parts))
        shape_diffs = [
            f"{name}: {list(ref_specs[name][0])} vs {list(specs[name][0])}"
            for name in ref_specs
            if ref_specs[name][0] != specs[name][0]
        ]
        if shape_diffs:
            raise MergeError(f"{what} in tensor shapes: {_short(shape_diffs)}")
        tok = _tokenizer_fingerprint(folder)
        tok_diffs = [
            f"{fname} ({'missing' if fname not in ref_tok else 'present'} in expert 1, "
            f"{'missing' if fname not in tok else 'present'} in expert {i})"
            if (fname in ref_tok) != (fname in tok)
            else f"{fname} (content differs)"
            for fname in sorted(set(ref_tok) | set(tok))
            if ref_tok.get(fname) != tok.get(fname)
        ]
        if tok_diffs:
            raise MergeError(f"{what} in its tokenizer: {_short(tok_diffs)}")
    return ref_files, ref_specs


# ---------------------------------------------------------------------------------------------- merge


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise MergeError(f"Cannot parse the shard size {size!r} (use e.g. 5GB, 500MB or a byte count).")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def merge(
    experts: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    out: str | os.PathLike = "merged",
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
) -> Path:
    """Merge expert checkpoints linearly: ``theta = sum_i lambda_i theta_i`` (paper Eq. 14).

    Args:
        experts: model folders written by ``save_pretrained`` (safetensors, single file or sharded), all of the
            same architecture, tensor layout and tokenizer (checked; a ``MergeError`` names the difference).
        weights: ``lambda_i >= 0``, one per expert, normalized to sum 1; uniform when ``None``. Experts with
            weight 0 are not read (so weights ``(1, 0)`` reproduce expert 1 bit for bit).
        out: output folder (created). It receives the merged safetensors (sharded above ``max_shard_size``),
            expert 1's config, generation config and tokenizer files, and ``merge_info.json`` (experts, weights).
        max_shard_size: bytes per output shard (int or e.g. ``"5GB"``).
        overwrite: replace the files of a non-empty ``out`` folder.
        info: more entries for ``merge_info.json`` (``merge --sweep`` records its search there).

    Floating tensors are accumulated in float32 (float64 for float64 tensors) and stored in expert 1's dtype.
    Non-floating tensors (integer buffers) must be identical across the merged experts and are copied.
    Returns the output folder, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    from safetensors.torch import save_file

    folders = [Path(e).expanduser().resolve() for e in experts]
    lambdas = normalize_weights(weights, len(folders))
    for folder in folders:
        if not folder.is_dir():
            raise MergeError(f"Expert {folder} is not a folder (pass folders written by save_pretrained).")
    out = Path(out).expanduser().resolve()
    check_output_folder(out, folders, overwrite)

    ref_files, _ = check_compatible(folders)
    shard_limit = _parse_size(max_shard_size)

    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + [out / SAFE_INDEX]:
        if old.exists():
            old.unlink()

    shards: list[list[str]] = []
    total_size = 0
    with ExitStack() as stack:
        experts_open = open_experts(stack, folders)
        current: dict[str, torch.Tensor] = {}
        current_size = 0

        def flush() -> None:
            nonlocal current, current_size
            if current:
                save_file(current, str(out / f"_shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
                shards.append(list(current))
                current, current_size = {}, 0

        for name, merged in merged_tensors(list(ref_files), experts_open, lambdas):  # expert 1's tensor order
            size = _nbytes(merged)
            if current and current_size + size > shard_limit:
                flush()
            current[name] = merged
            current_size += size
            total_size += size
        flush()

    _write_shards(out, shards, total_size)
    _copy_side_files(folders[0], out)
    (out / MERGE_INFO).write_text(
        json.dumps(
            {
                "method": "linear",
                "experts": [str(f) for f in folders],
                "weights": None if weights is None else [float(w) for w in weights],
                "normalized_weights": lambdas,
                **(info or {}),
            },
            indent=2,
        )
        + "\n"
    )
    return out


def check_output_folder(out: Path, folders: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output folder that is one of the experts, or not empty without ``overwrite``."""
    if out in folders:
        raise MergeError(f"The output folder {out} is one of the experts; choose a new folder.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"The output folder {out} is not empty; pass overwrite=True (--overwrite) to replace it.")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class TensorFile:
    """One safetensors file, read one tensor at a time with plain file reads.

    ``safetensors.safe_open`` memory-maps the file, and every page a merge touches then counts in the process's
    resident memory until the file is closed: all experts, about n models. Read into a fresh tensor instead, the
    pages stay in the OS page cache and the process holds only the tensors it uses (``benchmarks/merge_speed.py``).
    """

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, open(path, "rb")
        size = int.from_bytes(self.file.read(8), "little")
        self.header = json.loads(self.file.read(size))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + size

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise MergeError(f"{self.path}: tensor '{name}' has the dtype {entry['dtype']}, which merging does not "
                             f"read ({', '.join(SAFETENSORS_DTYPES)}).")
        tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        self.file.seek(self.data_start + begin)
        if self.file.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
            raise MergeError(f"{self.path} ends inside tensor '{name}': the file is truncated.")
        return tensor


def open_experts(stack: ExitStack, folders: Sequence[Path]) -> list[dict[str, Any]]:
    """For every expert folder, tensor name -> its safetensors file (:class:`TensorFile`) opened in ``stack``."""
    experts_open = []
    for folder in folders:
        files = _weight_files(folder)
        opened = {path: stack.enter_context(TensorFile(path)) for path in set(files.values())}
        experts_open.append({name: opened[path] for name, path in files.items()})
    return experts_open


def merged_tensors(names: Sequence[str], experts_open: list[dict[str, Any]],
                   lambdas: Sequence[float]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, sum_i lambda_i theta_i[name])`` one tensor at a time, in the experts' stored dtype; experts of weight
    0 are not read. ``experts_open``: from :func:`open_experts`; ``lambdas``: normalized, one per expert."""
    handles = [(lam, tensors) for lam, tensors in zip(lambdas, experts_open) if lam > 0]
    for name in names:
        yield name, _merge_tensor(name, handles)


def _merge_tensor(name: str, handles: list[tuple[float, dict[str, Any]]]) -> torch.Tensor:
    first = handles[0][1][name].get_tensor(name)
    if not first.is_floating_point():
        for _, tensors in handles[1:]:
            other = tensors[name].get_tensor(name)
            if not torch.equal(first, other):
                raise MergeError(f"The non-floating tensor '{name}' differs between experts; it cannot be averaged.")
        return first
    if len(handles) == 1 and handles[0][0] == 1.0:
        return first  # a single expert with weight 1: exact copy
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    acc = first.to(acc_dtype) * handles[0][0]
    for lam, tensors in handles[1:]:
        acc.add_(tensors[name].get_tensor(name).to(acc_dtype), alpha=lam)
    return acc.to(first.dtype)


def _write_shards(out: Path, shards: list[list[str]], total_size: int) -> None:
    tmp = [out / f"_shard-{i:05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        tmp[0].rename(out / SAFE_SINGLE)
        return
    n = len(shards)
    weight_map = {}
    for i, (path, names) in enumerate(zip(tmp, shards), start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        path.rename(out / fname)
        weight_map.update({name: fname for name in names})
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(src: Path, out: Path) -> None:
    shutil.copy2(src / "config.json", out / "config.json")
    for fname in (*OTHER_FILES, *TOKENIZER_FILES):
        if (src / fname).is_file():
            shutil.copy2(src / fname, out / fname)
    for code in src.glob("*.py"):  # remote-code models keep their modeling files
        shutil.copy2(code, out / code.name)
