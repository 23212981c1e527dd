"""Stage III (PAPER.md Eq. 14): one Stage II expert per domain from the same Stage I model, then their linear merge
theta = sum_i lambda_i theta_i: uniform, ``experts.merge_weights``, or chosen by ``experts.sweep`` on each expert's
domain (its data weights' sweep split, documents no stage trains on and the report never measures)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from xlstm_distill.stages import align, distill
from xlstm_distill.stages.context import RunContext
from xlstm_distill.stages.trainer import is_main_process


def run(ctx: RunContext) -> Path | None:
    """``out_dir/merged`` (each expert under ``out_dir/experts/NAME``; with chosen weights also the uniform merge
    in ``out_dir/merged-uniform``); None without an ``experts`` section."""
    from xlstm_distill.merging import merge, merge_with_sweep, sweep_batches  # here: merging uses the stages' helpers

    cfg = ctx.recipe.experts
    if cfg is None:
        return None
    stage1 = align.run(ctx)
    paths = [distill.run(ctx.for_expert(name, weights), stage1=stage1) for name, weights in cfg.domains.items()]
    out = ctx.merged_dir
    if not (out / "config.json").exists() and is_main_process():
        if cfg.sweep is None:
            merge(paths, [cfg.merge_weights[name] for name in cfg.domains] if cfg.merge_weights else None, out)
        else:
            domains = {name: sweep_batches(ctx.for_expert(name, weights).packed("sweep", rank=0, world_size=1),
                                           cfg.sweep, name) for name, weights in cfg.domains.items()}
            data = {"teacher": ctx.recipe.teacher, "domains": {
                name: {"data_weights": weights, "seq_len": ctx.recipe.data.seq_len} for name, weights in cfg.domains.items()}}
            merge_with_sweep(paths, out, ctx.teacher, domains, cfg.sweep, data=data, device=ctx.device,
                             dtype=ctx.autocast,
                             log=lambda line: Console().print(line, markup=False, highlight=False, soft_wrap=True))
    uniform = ctx.uniform_merged_dir
    if (cfg.sweep is not None or cfg.merge_weights is not None) and cfg.uniform_reference and not (uniform / "config.json").exists() \
            and is_main_process():
        merge(paths, None, uniform)  # the reference the chosen weights are measured against
    ctx.dist.barrier()
    return out
