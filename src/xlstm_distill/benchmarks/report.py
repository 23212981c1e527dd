"""Timing and the three result files every benchmark writes: JSON, markdown table, PNG plot."""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def environment() -> dict[str, str]:
    """Device and library versions, recorded with every result."""
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def first_line(err: BaseException, limit: int = 160) -> str:
    """An exception's first line, shortened: what a result row records of a failure."""
    return str(err).splitlines()[0][:limit] if str(err) else type(err).__name__


def student_folders(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Path]:
    """``--model NAME=PATH`` arguments as NAME -> folder; a malformed item or a missing folder is the parser's error."""
    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            parser.error(f"--model {item!r}: give NAME=PATH of a saved student folder.")
        models[name] = Path(path)
    return models


def sync() -> None:
    """Wait for queued CUDA work (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (CUDA synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def write_results(out_dir: Path, name: str, rows: list[dict], command: str, columns: Sequence[str],
                  plot: Callable[[list[dict], Path], None] | None = None) -> None:
    """Write ``name.json`` (rows + environment + command), ``name.md`` (table) and ``name.png`` (if ``plot``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out_dir / f"{name}.json").write_text(json.dumps({"command": command, "environment": env, "rows": rows}, indent=2))
    lines = [f"Command: `{command}`", "", f"Device: {env['device']}; torch {env['torch']}; transformers {env['transformers']}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    if plot is not None:
        plot(rows, out_dir / f"{name}.png")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return "" if value is None else str(value)
