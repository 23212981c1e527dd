"""Stage II: end-to-end sparse knowledge distillation (PAPER.md Eq. 13).

    L = gamma * CE(next token) + beta * KL(p_T^(k) || p_S^(k))

over the teacher's top-k next-token distribution. ``topk_mode`` decides what happens to the probability mass
outside the top k (the paper does not say; see docs/decisions.md):

- ``renormalize``: both distributions are restricted to the teacher's top-k ids and renormalized there.
- ``residual``: the mass outside the top k is one extra bucket, (1 - sum p_T) log((1 - sum p_T) / (1 - sum p_S)).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from xlstm_distill.stages import align, targets
from xlstm_distill.stages.common import (PackedBatches, autocast, masked_mean, next_token_targets, student_forward,
                                         teacher_forward)
from xlstm_distill.stages.context import RunContext
from xlstm_distill.stages.recipe import TOPK_MODES, TRAIN_MODES
from xlstm_distill.stages.targets import TargetShards, topk_logprobs
from xlstm_distill.stages.trainer import Trainer


def run(ctx: RunContext, stage1: Path | None = None) -> Path:
    """``out_dir/stage2/model`` from ``stage1`` (default: this recipe's Stage I model, made first if missing; under
    torchrun it must exist). Training resumes from its checkpoints; under torchrun the student is sharded (FSDP2)."""
    cfg = ctx.recipe.distill
    if cfg is None:
        raise ValueError("The recipe has no `distill` section: add one (e.g. distill: {steps: 100}) to run Stage II.")
    if stage1 is None:
        stage1 = align.run(ctx) if ctx.dist.world_size == 1 else (
            ctx.stage1_dir if ctx.recipe.align is not None else ctx.converted_dir)
    target_dir = targets.run(ctx)
    path = ctx.stage2_dir
    if (path / "config.json").exists():
        return path
    if not (stage1 / "config.json").exists():
        raise FileNotFoundError(f"{stage1} does not exist: run `xlstm-distill align` first.")
    model = ctx.dist.shard(set_stage2_trainable(ctx.load_student(stage1), cfg.train, cfg.lora_rank))
    if target_dir is None:
        data = OnlineTargets(ctx.teacher, PackedBatches(ctx.packed(), cfg.batch_size), ctx.recipe.targets.k)
    else:
        meta = ctx.target_meta()
        data = TargetShards(target_dir, cfg.batch_size, seed=ctx.recipe.seed, rank=ctx.dist.rank,
                            world_size=ctx.dist.world_size, expect=meta)
    # compile: the student's forward as one graph (docs/decisions.md); one process: fullgraph, so that a graph
    # break is an error, not a silent slowdown
    forward = torch.compile(model, fullgraph=ctx.dist.world_size == 1) if cfg.compile else model
    step = make_distill_step(forward, cfg.gamma, cfg.beta, cfg.topk_mode, ctx.autocast)
    Trainer(model, step, data, cfg, path.parent, "stage2", seed=ctx.recipe.seed).fit()
    ctx.save_student(model, path)
    return path


def sparse_kl(
    student_logits: torch.Tensor,  # (B, T, V)
    topk_ids: torch.Tensor,  # (B, T, k)
    topk_logprobs: torch.Tensor,  # (B, T, k) teacher log-probabilities (full-vocabulary normalized)
    mode: str = "renormalize",
) -> torch.Tensor:
    """Per-position KL(teacher top-k || student) (B, T)."""
    logp_s = F.log_softmax(student_logits.float(), dim=-1).gather(-1, topk_ids.long())  # (B, T, k)
    logp_t = topk_logprobs.float()
    if mode == "renormalize":
        logp_t = logp_t - torch.logsumexp(logp_t, -1, keepdim=True)
        logp_s = logp_s - torch.logsumexp(logp_s, -1, keepdim=True)
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    if mode == "residual":
        head = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
        rest_t = (1 - logp_t.exp().sum(-1)).clamp(min=1e-6)
        rest_s = (1 - logp_s.exp().sum(-1)).clamp(min=1e-6)
        return head + rest_t * (rest_t.log() - rest_s.log())
    raise ValueError(f"topk_mode must be one of {TOPK_MODES}, got {mode!r}.")


def kd_loss(
    student_logits: torch.Tensor,  # (B, T, V)
    batch: dict[str, torch.Tensor],  # input_ids, loss_mask, topk_ids, topk_logprobs
    gamma: float = 0.9,
    beta: float = 0.1,
    topk_mode: str = "renormalize",
) -> tuple[torch.Tensor, dict[str, float]]:
    """gamma * CE + beta * sparse KL, averaged over the positions whose next token is trained."""
    targets, mask = next_token_targets(batch)
    logits = student_logits[:, :-1]
    ce = masked_mean(F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none"), mask)
    kl = masked_mean(sparse_kl(logits, batch["topk_ids"][:, :-1], batch["topk_logprobs"][:, :-1], topk_mode), mask)
    loss = gamma * ce + beta * kl
    return loss, {"loss": loss.item(), "ce": ce.item(), "kl": kl.item()}


def set_stage2_trainable(student: torch.nn.Module, mode: str = "full", lora_rank: int = 8) -> torch.nn.Module:
    """``full``: every parameter; ``mixer``: only the new mixer parameters; ``lora``: LoRA (peft) adapters on
    q/k/v/o plus the new mixer parameters. Returns the model to train (a peft wrapper for ``lora``)."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"train mode must be one of {TRAIN_MODES}, got {mode!r}.")
    new = set(student.new_parameter_names())
    for name, p in student.named_parameters():
        p.requires_grad_(mode == "full" or name in new)
    if mode != "lora":
        return student
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("train mode 'lora' needs peft: pip install 'xlstm-distill[lora]'") from err
    config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        modules_to_save=None)
    model = get_peft_model(student, config)
    for name, p in model.named_parameters():  # peft freezes everything else: the mixer stays trainable
        if any(name.endswith(n) for n in new):
            p.requires_grad_(True)
    return model


def make_distill_step(model: torch.nn.Module, gamma: float, beta: float, topk_mode: str,
                      autocast_dtype: torch.dtype | None = None):
    """``step_fn`` for the trainer: student forward, KD loss, backward."""
    device = next(model.parameters()).device

    def step(batch: dict[str, torch.Tensor], scale: float, step: int = 0) -> dict[str, float]:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, autocast_dtype):
            logits = student_forward(model, batch)
        loss, metrics = kd_loss(logits, batch, gamma, beta, topk_mode)
        (loss * scale).backward()
        return metrics

    return step


class OnlineTargets:
    """Top-k targets computed by a resident teacher on the fly (no disk), for packed batches of a resumable source."""

    def __init__(self, teacher: torch.nn.Module, batches: Any, k: int) -> None:
        self.teacher, self.batches, self.k = teacher, batches, k

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        device = next(self.teacher.parameters()).device
        for batch in self.batches:
            with torch.no_grad():
                ids, logprobs = topk_logprobs(teacher_forward(self.teacher, {k: v.to(device) for k, v in batch.items()}), self.k)
            yield {**batch, "topk_ids": ids, "topk_logprobs": logprobs}

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)

