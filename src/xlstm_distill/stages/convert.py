"""Stage 0: build the student from the teacher (teacher weights reused, new mixer parameters initialized) and, with a
``select_heads`` section, choose the heads that keep the teacher's full attention."""

from __future__ import annotations

from pathlib import Path

from xlstm_distill.modeling import convert
from xlstm_distill.stages import select_heads
from xlstm_distill.stages.context import RunContext, console
from xlstm_distill.stages.trainer import is_main_process


def run(ctx: RunContext) -> Path:
    """``out_dir/student-init``: the converted, untrained student (made once)."""
    path = ctx.converted_dir
    if not (path / "config.json").exists() and is_main_process():
        student = convert(ctx.teacher, ctx.student_config())
        student.save_pretrained(path)
        ctx.tokenizer.save_pretrained(path)
        console.print(f"[green]converted[/] {ctx.recipe.teacher} -> {path}")
    if is_main_process():
        select_heads.run(ctx, path)
    ctx.dist.barrier()
    return path
