"""Helpers shared by the stages: teacher forward on packed batches, devices, held-out comparison."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from xlstm_distill.modeling.cache import full_layout


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed-precision context for ``device`` (a no-op when ``dtype`` is None)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def packed_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) positions restarting at every document of a packed batch."""
    if "position_ids" in batch:
        return batch["position_ids"]
    ids = batch["input_ids"]
    return full_layout(*ids.shape, ids.device, document_ids=batch.get("document_ids")).position


def teacher_forward(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher logits (B, T, V) with packed documents kept apart.

    transformers derives a block-diagonal causal mask from position ids that restart at 0 (when no attention mask
    and no cache are given), so passing per-document positions is enough.
    """
    return teacher(batch["input_ids"], position_ids=packed_positions(batch), use_cache=False).logits


def student_forward(student: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Student logits (B, T, V); documents kept apart through ``document_ids``."""
    return student(batch["input_ids"], document_ids=batch.get("document_ids")).logits


def next_token_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (B, T-1) and mask (B, T-1): position t predicts token t+1 where ``loss_mask[t]``."""
    mask = batch.get("loss_mask")
    mask = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
    return batch["input_ids"][:, 1:], mask[:, :-1]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def compare_to_teacher(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Held-out next-token CE / perplexity of student and teacher and the full-vocabulary KL(teacher || student).

    For a student with a sliding window W and S sink tokens the KL is also split by where the predicting token
    sits in its document: positions below W + S see their whole prefix through the window (``kl_in_window``),
    later ones depend on what the student keeps of the rest (``kl_beyond_window``, the long-range part).

    ``per_sequence`` keeps, for each of these KLs, every held-out sequence's KL summed over its tokens and its token
    count (``{"kl": {"sum": [...], "tokens": [...]}, ...}``): two models measured on the same batches are compared
    with :func:`xlstm_distill.metrics.paired_kl_difference`."""
    device = next(student.parameters()).device
    reach = getattr(getattr(student, "config", None), "window_reach", None)
    ce_s = ce_t = n = 0.0
    kl = {"all": 0.0, "in": 0.0, "beyond": 0.0}
    counts = {"in": 0.0, "beyond": 0.0}
    parts = {"kl": "all"} | ({"kl_in_window": "in", "kl_beyond_window": "beyond"} if reach is not None else {})
    per_sequence: dict[str, dict[str, list[float]]] = {key: {"sum": [], "tokens": []} for key in parts}
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        targets, mask = next_token_targets(batch)
        logp_t = F.log_softmax(teacher_forward(teacher, batch)[:, :-1].float(), -1)
        logp_s = F.log_softmax(student_forward(student, batch)[:, :-1].float(), -1)
        count = float(mask.sum())
        ce_t += float(masked_mean(-logp_t.gather(-1, targets[..., None]).squeeze(-1), mask)) * count
        ce_s += float(masked_mean(-logp_s.gather(-1, targets[..., None]).squeeze(-1), mask)) * count
        per_token = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # (B, T-1)
        where = {"all": mask}
        if reach is not None:
            inside = packed_positions(batch)[:, :-1] < reach
            where.update({"in": mask & inside, "beyond": mask & ~inside})
        for key, part in parts.items():
            sums, tokens = (per_token * where[part]).sum(-1), where[part].sum(-1)  # (B,), (B,)
            per_sequence[key]["sum"] += sums.tolist()
            per_sequence[key]["tokens"] += tokens.tolist()
            kl[part] += float(sums.sum())
            counts[part] = counts.get(part, 0.0) + float(tokens.sum())
        n += count
    out = {"teacher_ce": ce_t / n, "student_ce": ce_s / n, "teacher_ppl": math.exp(ce_t / n),
           "student_ppl": math.exp(ce_s / n), "kl": kl["all"] / n, "tokens": n}
    if reach is not None:
        out.update(kl_in_window=kl["in"] / max(counts["in"], 1.0),
                   kl_beyond_window=kl["beyond"] / max(counts["beyond"], 1.0), tokens_beyond_window=counts["beyond"])
    return out | {"per_sequence": per_sequence}


class PackedBatches:
    """Batches of a resumable packed dataset (``xlstm_distill.data.PackedDataset``) for the trainer."""

    def __init__(self, dataset, batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self):
        return self.dataset.iter_batches(self.batch_size)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
