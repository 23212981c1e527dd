"""The held-out report: perplexity and KL(teacher || student) of every student the recipe produced, on documents no
stage trained on; for a windowed student the KL also split inside / beyond the window's reach; each model's change
from the one before it, paired over the held-out sequences, with its standard error; with
``evaluate.long_documents``, the same by position on long held-out documents (``report/by_position.*``); with an
``experts`` section, every expert, the merged model, the generalist and the teacher on each domain's held-out
documents (``report/domains.*``, :mod:`xlstm_distill.stages.domains`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from xlstm_distill.evaluation.long_context import by_position, output_gates, write_by_position, write_output_gates
from xlstm_distill.metrics import paired_kl_difference
from xlstm_distill.stages import domains
from xlstm_distill.stages.common import autocast, compare_to_teacher
from xlstm_distill.stages.context import RunContext
from xlstm_distill.stages.trainer import is_main_process


def run(ctx: RunContext) -> dict[str, dict[str, float]]:
    """Prints the table; writes ``report/held_out.json`` and ``report/held_out.png`` (and the optional reports of the
    module docstring). Returns the rows by model."""
    if not is_main_process():
        return {}
    students = ctx.students()
    if not students:
        raise FileNotFoundError(f"No student under {ctx.out}: run the recipe's stages first.")
    batches = ctx.held_out_batches()
    rows: dict[str, dict[str, float]] = {}
    for label, path in students.items():
        with autocast(ctx.device, ctx.autocast):
            rows[label] = compare_to_teacher(ctx.load_student(path).eval(), ctx.teacher, batches)
    Console().print(_table(ctx.recipe.name, ctx.recipe.teacher, rows))
    changes = stage_changes(rows)
    for line in _change_lines(changes):
        Console().print(line)
    out = ctx.report_dir
    out.mkdir(exist_ok=True)
    (out / "held_out.json").write_text(json.dumps({"teacher": ctx.recipe.teacher, "data": fingerprint(batches),
                                                   "rows": rows, "changes": changes}, indent=2))
    plot(rows, out / "held_out.png")
    if ctx.recipe.evaluate.long_documents:
        position_report(ctx, students, out)
    domains.run(ctx)
    return rows


def fingerprint(batches: list[dict[str, torch.Tensor]]) -> str:
    """The held-out tokens' identity (sha256 of input ids and loss masks, 16 hex digits): reports of different runs
    are paired sequence by sequence only when it is the same."""
    import hashlib

    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "loss_mask"):
            digest.update(batch[key].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def position_report(ctx: RunContext, students: dict[str, Path], out: Path) -> dict[str, dict[str, list[float]]]:
    """KL to the teacher and perplexity by position on long held-out documents, every student in one table and one
    plot (``by_position.json``, ``.md``, ``.png``)."""
    cfg = ctx.recipe.evaluate
    documents = ctx.long_held_out_documents()
    if not documents:
        raise ValueError(f"No held-out document has {cfg.long_length} tokens: lower evaluate.long_length or give "
                         "longer documents.")
    window = ctx.student_config().window_size if ctx.student_config().uses_swa else None
    bucket = cfg.position_bucket or window or cfg.long_length // 16
    rows, gates = {}, {}
    for label, path in students.items():
        student = ctx.load_student(path).eval()
        with autocast(ctx.device, ctx.autocast):
            rows[label] = by_position(student, ctx.teacher, documents, bucket)
            if window is not None:
                gates[label] = output_gates(student, documents, student.config.window_reach)
    files = write_by_position(rows, out, len(documents), cfg.long_length, bucket, window)
    Console().print(files["markdown"].read_text())
    for line in write_output_gates(gates, out, window or 0):  # does the mix use the memory, how far back?
        Console().print(line)
    return rows


def stage_changes(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float] | None]]:
    """Each model against the one before it (converted -> Stage I -> Stage II -> merged): the held-out KL difference,
    all tokens and inside / beyond the window, paired over the same held-out sequences, with its standard error."""
    labels = list(rows)
    changes = {}
    for before, after in zip(labels, labels[1:]):
        a, b = rows[after]["per_sequence"], rows[before]["per_sequence"]
        changes[f"{after} - {before}"] = {key: paired_kl_difference(a[key], b[key]) for key in a}
    return changes


def _change_lines(changes: dict[str, dict[str, dict[str, float] | None]]) -> list[str]:
    lines = []
    for pair, parts in changes.items():
        text = ", ".join(f"{key} {d['difference']:+.4f} ± {2 * d['stderr']:.4f}" for key, d in parts.items() if d)
        if text:
            lines.append(f"{pair}: {text} (± 2 standard errors, paired over the held-out sequences)")
    return lines


def _table(name: str, teacher: str, rows: dict[str, dict[str, float]]) -> Table:
    first = next(iter(rows.values()))
    split = "kl_beyond_window" in first  # a windowed student: KL inside / beyond the window's reach
    table = Table(title=f"{name}: held-out next-token metrics ({int(first['tokens'])} tokens)")
    columns = ["model", "perplexity", "KL(teacher || model)"]
    columns += ["KL in window", f"KL beyond window ({int(first['tokens_beyond_window'])} tokens)"] if split else []
    for col in columns:
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row(f"teacher ({teacher})", f"{first['teacher_ppl']:.2f}", "0", *(["0", "0"] if split else []))
    for label, r in rows.items():
        parts = [f"{r['kl_in_window']:.4f}", f"{r['kl_beyond_window']:.4f}"] if split else []
        table.add_row(label, f"{r['student_ppl']:.2f}", f"{r['kl']:.4f}", *parts)
    return table


def plot(rows: dict[str, dict[str, float]], path: Path) -> None:
    """Held-out perplexity (teacher dashed) and KL to the teacher of each model, inside / beyond the window where
    the student has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(labels, [r["student_ppl"] for r in rows.values()], color="tab:blue")
    axes[0].axhline(next(iter(rows.values()))["teacher_ppl"], color="k", ls="--", label="teacher")
    axes[0].set_ylabel("held-out perplexity")
    axes[0].legend()
    axes[1].bar(labels, [r["kl"] for r in rows.values()], color="tab:orange")
    axes[1].set_ylabel("KL(teacher || student)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
