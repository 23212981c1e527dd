"""Stage III (PAPER.md Eq. 14): one Stage II expert per domain from the same Stage I model, then their linear merge
theta = sum_i lambda_i theta_i (uniform or ``experts.merge_weights``)."""

from __future__ import annotations

from pathlib import Path

from xlstm_distill.merging import merge
from xlstm_distill.stages import align, distill
from xlstm_distill.stages.context import RunContext
from xlstm_distill.stages.trainer import is_main_process


def run(ctx: RunContext) -> Path | None:
    """``out_dir/merged`` (each expert under ``out_dir/experts/NAME``); None without an ``experts`` section."""
    cfg = ctx.recipe.experts
    if cfg is None:
        return None
    stage1 = align.run(ctx)
    paths = [distill.run(ctx.for_expert(name, weights), stage1=stage1) for name, weights in cfg.domains.items()]
    weights = [cfg.merge_weights[name] for name in cfg.domains] if cfg.merge_weights else None
    out = ctx.merged_dir
    if not (out / "config.json").exists() and is_main_process():
        merge(paths, weights, out)
    ctx.dist.barrier()
    return out
