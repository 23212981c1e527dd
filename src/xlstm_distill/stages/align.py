"""Stage I: layer-wise alignment (PAPER.md Eq. 12).

For every layer l, the student mixer gets the teacher's own attention input (teacher forcing) and is trained to
reproduce the teacher's attention output: L = sum_l MSE(h^(l), h_hat^(l)). Layers are independent, so every layer
trains in the same pass over one teacher forward, and each layer back-propagates on its own (memory of one layer).
By default only the new parameters (feature maps, gates) train; ``train_projections`` adds q/k/v/o.

``attention_transfer`` adds, per layer, the cross-entropy from the teacher's attention weights on the keys beyond the
window to the memory's weights on them (``modeling.attention_weights.attention_transfer_loss``), at a few sampled
query positions per sequence: the output MSE rewards a memory that reads back a rare, sharply attended token (a fact
asked about much later) only as much as that token moves the average output; the weights name it directly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from xlstm_distill.modeling import HybridForCausalLM
from xlstm_distill.modeling.attention_weights import attention_transfer_loss, head_inputs
from xlstm_distill.modeling.cache import TokenLayout, full_layout
from xlstm_distill.stages import convert
from xlstm_distill.stages.common import PackedBatches, autocast, teacher_forward
from xlstm_distill.stages.context import RunContext, console
from xlstm_distill.stages.trainer import Trainer, param_dtype, prepare_model


def run(ctx: RunContext) -> Path:
    """``out_dir/stage1/model`` (made once; training resumes from its checkpoints). Without an ``align`` section the
    converted student is passed on."""
    init = convert.run(ctx)
    cfg = ctx.recipe.align
    path = ctx.stage1_dir
    if cfg is None:
        return init
    if (path / "config.json").exists():
        return path
    if ctx.dist.world_size > 1:
        raise ValueError("Stage I runs on one device (it is cheap); launch `align` without torchrun.")
    student = prepare_model(ctx.load_student(init, param_dtype(cfg)), cfg)
    set_stage1_trainable(student, cfg.train_projections)
    if any(p.requires_grad for p in student.parameters()):
        step = make_align_step(student, ctx.teacher, ctx.autocast, cfg.beyond_window_weight, cfg.compile,
                               WindowDropout(cfg.window_dropout, cfg.dropout_window, cfg.steps, ctx.recipe.seed),
                               AttentionTransfer(cfg.attention_transfer, cfg.transfer_queries, ctx.recipe.seed))
        data = PackedBatches(ctx.packed(), cfg.batch_size)
        Trainer(student, step, data, cfg, path.parent, "stage1", seed=ctx.recipe.seed).fit()
    else:  # e.g. mixer=swa: no new parameters, the converted student is the Stage I model
        console.print(f"[yellow]Stage I skipped[/]: the {student.config.mixer} student has no new parameters to align")
    ctx.save_student(student, path)
    mse = layer_mse(student, ctx.teacher, ctx.held_out_batches()[:1])
    (path.parent / "held_out_layer_mse.json").write_text(json.dumps(mse))
    return path


@contextmanager
def capture_attention(teacher: torch.nn.Module) -> Iterator[list[dict]]:
    """Record every teacher attention layer's input hidden states, RoPE (cos, sin) and output during a forward."""
    records: list[dict] = [{} for _ in teacher.model.layers]

    def hook(idx: int):
        def fn(module, args, kwargs, output):
            records[idx]["input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            records[idx]["rope"] = kwargs["position_embeddings"]
            records[idx]["output"] = output[0]
        return fn

    handles = [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(teacher.model.layers)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def set_stage1_trainable(student: HybridForCausalLM, train_projections: bool = False) -> list[str]:
    """Freeze everything except the new mixer parameters (and q/k/v/o if asked). Returns the trainable names."""
    trainable = set(student.new_parameter_names())
    for name, p in student.named_parameters():
        proj = train_projections and ".self_attn." in name and any(f".{x}_proj." in name for x in "qkvo")
        p.requires_grad_(name in trainable or proj)
    return [n for n, p in student.named_parameters() if p.requires_grad]


class LayerLoss(NamedTuple):
    """One layer's Stage I losses."""

    mse: torch.Tensor  # the (weighted) MSE of the mixer's output
    transfer: torch.Tensor | None  # the attention-transfer cross-entropy (None: not asked for, or no memory)


@dataclass
class AttentionTransfer:
    """Stage I's attention transfer: ``weight`` times the cross-entropy of the memory's weights beyond the window
    against the teacher's, at ``queries`` positions per sequence drawn among those whose document prefix reaches past
    the window and sinks (deterministic in seed, step and call)."""

    weight: float = 0.0
    queries: int = 64
    seed: int = 0

    def sample(self, layout: TokenLayout, reach: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P) query indices and (B, P) weights (0 in a row with no such position)."""
        eligible = (layout.position >= reach).float()  # (B, T)
        rows = eligible.sum(-1, keepdim=True) > 0
        generator = torch.Generator(device="cpu").manual_seed(random.Random(f"{self.seed}/{key}").getrandbits(63))
        probs = torch.where(rows, eligible, torch.ones_like(eligible)).cpu()
        queries = torch.multinomial(probs, self.queries, replacement=True, generator=generator)
        return queries.to(layout.position.device), rows.expand(-1, self.queries).float()


def layer_losses(
    student: HybridForCausalLM, teacher: torch.nn.Module, batch: dict[str, torch.Tensor],
    autocast_dtype: torch.dtype | None = None, beyond_window_weight: float = 1.0, compiled: bool = False,
    transfer: AttentionTransfer | None = None, key: str = "0/0",
) -> Iterator[LayerLoss]:
    """One teacher forward, then for every layer in turn the MSE of the student mixer on the teacher's input (and,
    with ``transfer``, the attention-transfer cross-entropy on the same input; ``key`` names the batch for its query
    sample).

    ``beyond_window_weight``: weight of the positions past the window's reach (window + sinks, counted from the
    document start) against 1 for those inside it, where the window alone reproduces the teacher; 1 = plain MSE."""
    device = next(student.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad(), capture_attention(teacher) as records, autocast(device, autocast_dtype):
        teacher_forward(teacher, batch)
    B, T = batch["input_ids"].shape
    layout = full_layout(B, T, device, document_ids=batch.get("document_ids"))
    weights = torch.ones(B, T, device=device)  # (B, T)
    if student.config.window_reach is not None and beyond_window_weight != 1.0:
        weights = torch.where(layout.position < student.config.window_reach, 1.0, beyond_window_weight)
    mse = _compiled_mixer_mse() if compiled else mixer_mse
    dtype = next(student.parameters()).dtype  # a bfloat16 student (param_dtype) takes the teacher's inputs in bf16
    for layer, rec in zip(student.model.layers, records):
        hidden, rope = rec["input"], rec["rope"]
        if dtype != torch.float32:
            hidden, rope = hidden.to(dtype), tuple(r.to(dtype) for r in rope)
        with autocast(device, autocast_dtype):
            loss = mse(layer.self_attn, hidden, rope, layout, rec["output"], weights)
            extra = transfer_loss(layer.self_attn, hidden, rope, layout, transfer, key) if transfer else None
        yield LayerLoss(loss, extra)  # outside autocast: the caller runs the backward


def transfer_loss(mixer: torch.nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  layout: TokenLayout, transfer: AttentionTransfer, key: str) -> torch.Tensor | None:
    """The attention-transfer cross-entropy of one mixer (None for a layer without a memory or whose heads all keep
    full attention)."""
    if not mixer.uses_memory or mixer.all_heads_full:
        return None
    reach = mixer.window + mixer.num_sinks
    memo = ("transfer_queries", reach)  # one sample per batch, shared by the layers (one host round trip)
    if memo not in layout.memo:
        layout.memo[memo] = transfer.sample(layout, reach, key)
    queries, query_weight = layout.memo[memo]
    kept = torch.tensor([float(not k) for a, b, k in mixer.q_runs for _ in range(a, b)], device=hidden.device)
    return attention_transfer_loss(mixer, head_inputs(mixer, hidden, rope), layout.doc_start, queries, query_weight,
                                   kept)


def mixer_mse(
    mixer: torch.nn.Module,
    hidden: torch.Tensor,  # (B, T, HIDDEN) the teacher's attention input
    rope: tuple[torch.Tensor, torch.Tensor],
    layout: TokenLayout,
    target: torch.Tensor,  # (B, T, HIDDEN) the teacher's attention output
    weights: torch.Tensor,  # (B, T)
) -> torch.Tensor:
    """The weighted MSE of one student mixer on the teacher's input against the teacher's output (float32)."""
    out, _ = mixer(hidden_states=hidden, position_embeddings=rope, layout=layout)
    per_position = (out.float() - target.float()).pow(2).mean(-1)  # (B, T)
    return (per_position * weights).sum() / weights.sum()


@functools.cache
def _compiled_mixer_mse():
    """``mixer_mse`` through torch.compile. The layers' parameters are inputs of its graph, so one graph serves every
    layer (and one more once the batch's block mask is built, which the first layer does)."""
    return torch.compile(mixer_mse)


@dataclass
class WindowDropout:
    """Scheduled window dropout: at optimizer step s, a batch is aligned with the student's window shortened to
    ``window`` tokens with probability ``rate * (1 - s / steps)`` (deterministic in seed and step), so that the memory
    must carry what the shortened window no longer sees, while the last steps tune the mix for the full window."""

    rate: float = 0.0
    window: int | None = None  # None: a quarter of the student's window
    steps: int = 1
    seed: int = 0

    def window_at(self, step: int, call: int, full: int) -> int:
        """The window for the ``call``-th batch of optimizer step ``step``."""
        p = self.rate * max(0.0, 1.0 - step / self.steps)
        if p <= 0 or random.Random(f"{self.seed}/{step}/{call}").random() >= p:
            return full
        return self.window or max(1, full // 4)


@contextmanager
def window_of(student: HybridForCausalLM, window: int) -> Iterator[None]:
    """Every mixer with the student's own window (not a teacher's sliding-window layer, nor a larger teacher window that
    ``convert_layers: all`` keeps) with sliding-window size ``window`` for the duration (the config keeps its own)."""
    mixers = [layer.self_attn for layer in student.model.layers
              if not layer.self_attn.keeps_teacher_window and layer.self_attn.window == student.config.window_size]
    saved = [m.window for m in mixers]
    for m in mixers:
        m.window = window
    try:
        yield
    finally:
        for m, w in zip(mixers, saved):
            m.window = w


def make_align_step(student: HybridForCausalLM, teacher: torch.nn.Module, autocast_dtype: torch.dtype | None = None,
                    beyond_window_weight: float = 1.0, compiled: bool = False,
                    dropout: WindowDropout | None = None, transfer: AttentionTransfer | None = None):
    """``step_fn`` for the trainer: per layer, the loss then backward right away (the memory of one layer).
    ``compiled``: each layer's mixer and MSE through torch.compile (one graph for all layers). ``dropout``: scheduled
    window dropout (:class:`WindowDropout`). ``transfer``: the attention transfer (:class:`AttentionTransfer`; its
    weight 0: none)."""
    dropout = dropout or WindowDropout()
    transfer = transfer if transfer is not None and transfer.weight > 0 else None
    calls = {"step": -1, "n": 0}  # batches seen in the current optimizer step (gradient accumulation)

    def step(batch: dict[str, torch.Tensor], scale: float, step: int = 0) -> dict[str, float]:
        calls["n"] = calls["n"] + 1 if calls["step"] == step else 0
        calls["step"] = step
        full = student.config.window_size
        window = dropout.window_at(step, calls["n"], full) if student.config.uses_swa else full
        metrics, total = {}, 0.0
        with window_of(student, window) if window != full else contextlib.nullcontext():
            for idx, (mse, ce) in enumerate(layer_losses(student, teacher, batch, autocast_dtype,
                                                         beyond_window_weight, compiled, transfer,
                                                         f"{step}/{calls['n']}")):
                loss = mse if ce is None else mse + transfer.weight * ce
                if loss.requires_grad:  # (a layer whose heads all keep full attention has nothing to train)
                    (loss * scale).backward()
                metrics[f"layer_{idx:02d}_mse"] = mse.item()
                if ce is not None:
                    metrics[f"layer_{idx:02d}_transfer"] = ce.item()
                total += loss.item()
        metrics["loss"] = total
        if dropout.rate:
            metrics["window"] = float(window)
        return metrics

    return step


@torch.no_grad()
def layer_mse(student: HybridForCausalLM, teacher: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Held-out per-layer MSE between the student mixers and the teacher attention (teacher-forced)."""
    totals = [0.0] * len(student.model.layers)
    for batch in batches:
        for idx, loss in enumerate(layer_losses(student, teacher, batch)):
            totals[idx] += loss.mse.item() / len(batches)
    return totals

