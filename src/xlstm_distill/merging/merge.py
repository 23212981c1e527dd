"""Stage III: linear weight merging of experts (Eq. 14), ``theta = sum_i lambda_i theta_i``.

The experts are model folders written by ``save_pretrained`` (safetensors, one file or sharded with
``model.safetensors.index.json``), distilled from the same Stage-I checkpoint. The merge streams: it opens every
expert's safetensors files memory-mapped, and for one tensor at a time accumulates ``sum_i lambda_i theta_i`` in
float32 (float64 if the tensor is stored in float64), casts it back to the stored dtype and appends it to the
output shard being filled. Peak memory is about one output shard plus a few copies of the largest tensor, not
one model per expert.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
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

__all__ = ["MergeError", "merge", "normalize_weights"]


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


def _check_compatible(folders: list[Path]) -> tuple[dict[str, Path], dict[str, tuple[tuple[int, ...], str]]]:
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

    Floating tensors are accumulated in float32 (float64 for float64 tensors) and stored in expert 1's dtype.
    Non-floating tensors (integer buffers) must be identical across the merged experts and are copied.
    Returns the output folder, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folders = [Path(e).expanduser().resolve() for e in experts]
    lambdas = normalize_weights(weights, len(folders))
    for folder in folders:
        if not folder.is_dir():
            raise MergeError(f"Expert {folder} is not a folder (pass folders written by save_pretrained).")
    out = Path(out).expanduser().resolve()
    if out in folders:
        raise MergeError(f"The output folder {out} is one of the experts; choose a new folder.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"The output folder {out} is not empty; pass overwrite=True (--overwrite) to replace it.")

    ref_files, ref_specs = _check_compatible(folders)
    active = [(lam, folder) for lam, folder in zip(lambdas, folders) if lam > 0]
    shard_limit = _parse_size(max_shard_size)

    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + [out / SAFE_INDEX]:
        if old.exists():
            old.unlink()

    shards: list[list[str]] = []
    total_size = 0
    with ExitStack() as stack:
        handles: list[tuple[float, dict[str, Any]]] = []
        for lam, folder in active:
            files = _weight_files(folder)
            opened = {path: stack.enter_context(safe_open(path, framework="pt")) for path in set(files.values())}
            handles.append((lam, {name: opened[path] for name, path in files.items()}))

        current: dict[str, torch.Tensor] = {}
        current_size = 0

        def flush() -> None:
            nonlocal current, current_size
            if current:
                save_file(current, str(out / f"_shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
                shards.append(list(current))
                current, current_size = {}, 0

        for name in ref_files:  # expert 1's tensor order
            merged = _merge_tensor(name, handles)
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
            },
            indent=2,
        )
        + "\n"
    )
    return out


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
