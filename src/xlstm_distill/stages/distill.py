"""Stage II: end-to-end sparse knowledge distillation (PAPER.md Eq. 13).

    L = gamma * CE(next token) + beta * KL(p_T^(k) || p_S^(k))

over the teacher's top-k next-token distribution. ``topk_mode`` decides what happens to the probability mass
outside the top k (the paper does not say; see docs/decisions.md):

- ``renormalize``: both distributions are restricted to the teacher's top-k ids and renormalized there.
- ``residual``: the mass outside the top k is one extra bucket, (1 - sum p_T) log((1 - sum p_T) / (1 - sum p_S)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch.nn import functional as F

from xlstm_distill.stages import align, targets
from xlstm_distill.stages.common import (PackedBatches, autocast, masked_mean, next_token_targets, student_forward,
                                         teacher_forward)
from xlstm_distill.stages.context import RunContext
from xlstm_distill.stages.recipe import TOPK_MODES, TRAIN_MODES
from xlstm_distill.stages.targets import TargetShards, topk_logprobs
from xlstm_distill.stages.trainer import Prefetched, Trainer, checkpoint_layers, param_dtype, prepare_model


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
    trainer = make_trainer(ctx, stage1, target_dir)
    trainer.fit()
    ctx.save_student(trainer.model, path)
    return path


def make_trainer(ctx: RunContext, stage1: Path, target_dir: Path | None) -> Trainer:
    """Stage II's trainer (writing into ``out_dir/stage2``): the student of ``stage1`` with the recipe's trainable
    parameters, dtype, activation checkpointing and sharding, its data (the targets in ``target_dir``, or a
    resident teacher when None) and the KD step."""
    cfg = ctx.recipe.distill
    if not (stage1 / "config.json").exists():
        raise FileNotFoundError(f"{stage1} does not exist: run `xlstm-distill align` first.")
    student = prepare_model(set_stage2_trainable(ctx.load_student(stage1, param_dtype(cfg)), cfg.train,
                                                 cfg.lora_rank), cfg)
    if cfg.activation_checkpointing:
        checkpoint_layers(student)
    model = ctx.dist.shard(student)
    if target_dir is None:
        data = OnlineTargets(ctx.teacher, PackedBatches(ctx.packed(), cfg.batch_size), ctx.recipe.targets.k)
    else:
        meta = ctx.target_meta()
        data = Prefetched(TargetShards(target_dir, cfg.batch_size, seed=ctx.recipe.seed, rank=ctx.dist.rank,
                                       world_size=ctx.dist.world_size, expect=meta))  # decoded while the step runs
    # compile: the student's forward as one graph (docs/decisions.md); one process: fullgraph, so that a graph
    # break is an error, not a silent slowdown
    forward = torch.compile(model, fullgraph=ctx.dist.world_size == 1) if cfg.compile else model
    step = make_distill_step(forward, cfg.gamma, cfg.beta, cfg.topk_mode, ctx.autocast, cfg.loss_chunk_tokens,
                             head=model)
    return Trainer(model, step, data, cfg, ctx.stage2_dir.parent, "stage2", seed=ctx.recipe.seed)


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


def kd_loss_chunked(
    hidden: torch.Tensor,  # (B, T, HIDDEN) the student's final (normed) hidden states
    logits_of: Callable[[torch.Tensor], torch.Tensor],  # (N, HIDDEN) -> (N, V): the student's LM head
    batch: dict[str, torch.Tensor],  # input_ids, loss_mask, topk_ids, topk_logprobs
    gamma: float = 0.9,
    beta: float = 0.1,
    topk_mode: str = "renormalize",
    chunk_tokens: int = 1024,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`kd_loss` of ``logits_of(hidden)``, computed over pieces of ``chunk_tokens`` positions: each piece's
    logits and losses are made, summed and dropped, and made again in the backward pass (non-reentrant activation
    checkpointing), so that the memory of the logits is that of one piece, not of (B, T, V). Same value and
    gradients as the whole at once, up to float summation order."""
    targets, mask = next_token_targets(batch)
    B, T, H = hidden.shape
    flat_hidden = hidden[:, :-1].reshape(B * (T - 1), H)  # (N, HIDDEN), N = B * (T - 1)
    flat = {"targets": targets.reshape(-1), "mask": mask.reshape(-1).to(torch.float32),
            "topk_ids": batch["topk_ids"][:, :-1].reshape(B * (T - 1), -1),
            "topk_logprobs": batch["topk_logprobs"][:, :-1].reshape(B * (T - 1), -1)}
    device = hidden.device

    def piece_sums(h: torch.Tensor, tgt: torch.Tensor, m: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor):
        with autocast(device, autocast_dtype):
            logits = logits_of(h)  # (n, V)
        ce = F.cross_entropy(logits.float(), tgt, reduction="none")  # (n,)
        kl = sparse_kl(logits, ids, lp, topk_mode)  # (n,)
        return (ce * m).sum(), (kl * m).sum()

    ce_sum = kl_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        ce_part, kl_part = torch.utils.checkpoint.checkpoint(
            piece_sums, flat_hidden[part], flat["targets"][part], flat["mask"][part], flat["topk_ids"][part],
            flat["topk_logprobs"][part], use_reentrant=False)
        ce_sum, kl_sum = ce_sum + ce_part, kl_sum + kl_part
    count = mask.sum().clamp(min=1)
    ce, kl = ce_sum / count, kl_sum / count
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
                      autocast_dtype: torch.dtype | None = None, loss_chunk_tokens: int | None = None,
                      head: torch.nn.Module | None = None):
    """``step_fn`` for the trainer: student forward, KD loss, backward. ``loss_chunk_tokens``: the loss over pieces
    of that many positions (:func:`kd_loss_chunked`), the logits made by ``head.logits`` (default ``model``; pass
    the uncompiled student when ``model`` is its compiled forward)."""
    device = next(model.parameters()).device
    head = model if head is None else head

    def step(batch: dict[str, torch.Tensor], scale: float, step: int = 0) -> dict[str, float]:
        batch = {k: v.to(device) for k, v in batch.items()}
        if loss_chunk_tokens is None:
            with autocast(device, autocast_dtype):
                logits = student_forward(model, batch)
            loss, metrics = kd_loss(logits, batch, gamma, beta, topk_mode)
        else:
            with autocast(device, autocast_dtype):
                hidden = model(batch["input_ids"], document_ids=batch.get("document_ids"),
                               skip_logits=True).hidden_states[-1]
            loss, metrics = kd_loss_chunked(hidden, head.logits, batch, gamma, beta, topk_mode, loss_chunk_tokens,
                                            autocast_dtype)
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

