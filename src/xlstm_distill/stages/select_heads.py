"""Before Stage I: choose the KV heads that keep the teacher's full attention (recipe section ``select_heads``).

Every KV head of the converted student is scored by the KL to the teacher it removes when restored alone
(:mod:`xlstm_distill.evaluation.heads`); the best ``budget`` of them (``method: single``), or heads added one at a
time, each the best given those before (``method: greedy``), are written into ``student-init``'s config, so that
every later stage trains and evaluates that student. ``out_dir/select_heads/heads.json`` and ``heads.png`` keep the
scores (made once; a later run with another budget or method reuses them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from xlstm_distill.data.documents import long_documents
from xlstm_distill.evaluation.heads import (Calibration, HeadScores, choose_heads, choose_heads_greedy, head_scores,
                                            needle_probes, retrieval_probes, text_calibration, write_head_scores)
from xlstm_distill.stages.common import autocast
from xlstm_distill.stages.context import RunContext, console


def run(ctx: RunContext, converted: Path) -> list[list[int]] | None:
    """Scores the heads (once) and records the chosen ones in ``converted``'s config. Main process only."""
    cfg = ctx.recipe.select_heads
    if cfg is None:
        return None
    out = ctx.out / "select_heads"
    scores_file = out / "heads.json"
    length = cfg.length or ctx.recipe.data.seq_len
    meta = {"probe": cfg.probe, "samples": cfg.samples, "length": length, "budget": cfg.budget, "method": cfg.method,
            "pool": cfg.pool, "measure": "scores: KL(teacher || student) at the scored positions, lowered by "
                                         "restoring one head alone"}
    saved = json.loads(scores_file.read_text()) if scores_file.exists() else None
    measured = saved is not None and all(saved.get(k) == meta[k] for k in ("probe", "samples", "length"))
    if not (measured and all(saved.get(k) == meta[k] for k in ("method", "pool", "budget"))):
        student = probes = None
        if not measured or cfg.method == "greedy":  # scoring and greedy choice run the student
            student = ctx.load_student(converted).eval()
            probes = calibration(ctx, cfg.probe, cfg.samples, length, student.config.window_reach or 0)
        if measured:  # the same measurement, another budget or method: choose again from the saved scores
            result = HeadScores(torch.tensor(saved["scores"]), saved["baseline_kl"], saved["scored_tokens"])
        else:
            with autocast(ctx.device, ctx.autocast):
                result = head_scores(student, ctx.teacher, probes, cfg.batch_size)
        if cfg.method == "greedy":
            with autocast(ctx.device, ctx.autocast):
                chosen, meta["kl_after_each_choice"] = choose_heads_greedy(student, ctx.teacher, probes, result,
                                                                           cfg.budget, cfg.pool, cfg.batch_size)
        else:
            chosen = choose_heads(result.scores, cfg.budget)
        write_head_scores(result, chosen, out, meta)
        console.print(f"[green]selected heads[/] {chosen} (KL {result.baseline:.4f} with none restored) -> "
                      f"{scores_file}")
    chosen = json.loads(scores_file.read_text())["chosen"]
    _record(converted / "config.json", chosen)
    return chosen


def calibration(ctx: RunContext, probe: str, samples: int, length: int, reach: int) -> list[Calibration]:
    """The calibration set of ``probe`` from the recipe's training data (the recipe's seed)."""
    if probe == "retrieval":
        return retrieval_probes(ctx.tokenizer, samples, length, seed=ctx.recipe.seed)
    documents = long_documents(ctx.sources("train"), ctx.tokenizer, length, samples)
    if not documents:
        raise ValueError(f"select_heads: no training document has {length} tokens; lower select_heads.length.")
    if probe == "needles":
        return needle_probes(documents, ctx.tokenizer, samples, length, reach, seed=ctx.recipe.seed)
    return text_calibration(documents, reach, seed=ctx.recipe.seed)


def _record(config_file: Path, chosen: list[list[int]]) -> None:
    """Write the chosen heads into a saved student's config (atomically; unchanged when already there)."""
    config = json.loads(config_file.read_text())
    if config.get("full_attention_heads") == chosen:
        return
    config["full_attention_heads"] = chosen
    tmp = config_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_file)
