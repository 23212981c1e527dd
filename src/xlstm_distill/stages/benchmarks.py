"""The recipe's benchmark step: teacher against the final student (and the merged experts) on real benchmarks
through lm-evaluation-harness, with identical settings, when the recipe's ``evaluate`` section lists ``tasks``; and
on RULER's long-context retrieval tasks when it lists ``ruler_tasks`` or names a ``ruler_file``
(``report/long_context/``)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from xlstm_distill.stages.context import RunContext
from xlstm_distill.stages.trainer import is_main_process


def run(ctx: RunContext) -> Path | None:
    """``report/benchmarks/`` (results.json, report.md, win_and_tie.png); None without tasks."""
    cfg = ctx.recipe.evaluate
    if not (cfg.tasks or cfg.ruler_tasks or cfg.ruler_file) or not is_main_process():
        return None
    from xlstm_distill.evaluation import evaluate_models, write_long_context, write_report
    from xlstm_distill.evaluation.long_context import ruler_scores

    final = next(p for p in (ctx.stage2_dir, ctx.stage1_dir, ctx.converted_dir) if (p / "config.json").exists())
    out = ctx.report_dir / "benchmarks"
    models = {"teacher": (ctx.teacher, ctx.tokenizer), "student": str(final)}
    if (ctx.merged_dir / "config.json").exists():  # Stage III: merged experts vs the generalist
        models["merged"] = str(ctx.merged_dir)
    if (ctx.uniform_merged_dir / "config.json").exists():
        models["merged uniform"] = str(ctx.uniform_merged_dir)
    if cfg.tasks:
        results = evaluate_models(models, tasks=cfg.tasks, num_fewshot=cfg.shots, limit=cfg.limit,
                                  batch_size=cfg.batch_size, output_dir=out)
        files = write_report(results, "teacher", out)
        Console().print(files["markdown"].read_text())
    if cfg.ruler_tasks or cfg.ruler_file:
        scores = ruler_scores(models, ctx.tokenizer, cfg.ruler_tasks, cfg.ruler_lengths, cfg.ruler_samples,
                              cfg.batch_size, device=str(ctx.device), ruler_file=cfg.ruler_file)
        files = write_long_context(scores, ctx.report_dir / "long_context")
        Console().print(files["markdown"].read_text())
    return out
