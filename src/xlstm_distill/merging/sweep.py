"""Choosing Stage III's merge weights on held-out data (``xlstm-distill merge --sweep``, a recipe's ``experts.sweep``).

Objective: KL(teacher || merged) per domain on the domain's *sweep split* (documents no stage trains on and the
report never measures: ``xlstm_distill.data.split``), the mean over the scored tokens of the domain, then combined
over domains: ``mean`` (every domain counts the same, whatever its token count) or ``worst`` (the largest).

Search, deterministic: the uniform merge, each expert alone, every point of a coarse simplex grid (weights that are
multiples of ``1/grid``), then a local refinement from the best point: move ``step`` of weight from one expert to
another (every ordered pair), keep the best neighbour while it improves the objective, then halve the step
(``refine`` halvings, starting at ``1/(2 grid)``). Ties go to the candidate tried first.

Memory: one model is held (expert 1's architecture, float32, on the device). A candidate's weights are written into it
tensor by tensor from the experts' safetensors files (the tensors ``merge`` would write, rounded to the
stored dtype, so the chosen candidate's KL is that of the merged folder), so no expert is held in memory. The
teacher's next-token distributions on the sweep data are computed once, as float16 probabilities at the scored
positions (2 bytes x vocabulary per token; the KL is that of these rounded probabilities, exactly 0 for a model equal
to the teacher), and reused by every candidate.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from xlstm_distill.data import SPLIT_RULE, PackedDataset
from xlstm_distill.merging.config import OBJECTIVES, SweepConfig
from xlstm_distill.merging.merge import (MergeError, check_compatible, check_output_folder, merge,
                                         merged_tensors, open_experts)
from xlstm_distill.stages.common import autocast, next_token_targets, student_forward, teacher_forward

Batch = dict[str, torch.Tensor]

__all__ = ["OBJECTIVES", "SweepConfig", "grid_points", "merge_with_sweep", "sweep_batches", "sweep_weights"]


# ---------------------------------------------------------------------------------------------- data


def sweep_batches(dataset: PackedDataset, config: SweepConfig, domain: str) -> list[Batch]:
    """The first ``config.sequences`` packed sequences (rounded down to whole batches, at least one) of a domain's
    sweep-split dataset (``ctx.packed("sweep")`` or a ``PackedDataset`` of ``data_split(source, "sweep")``)."""
    batches = dataset.iter_batches(config.batch_size)
    try:
        return [next(batches) for _ in range(max(1, config.sequences // config.batch_size))]
    except ValueError as err:
        if "yielded no documents" not in str(err):
            raise
        raise MergeError(f"Domain '{domain}' has no document in the sweep split (one document in 50, chosen by a "
                         f"hash of its content, {SPLIT_RULE}): give the domain more documents.") from None


@dataclass
class _DomainTargets:
    """One domain's sweep batches and the teacher's next-token distributions at their scored positions."""

    batches: list[Batch]  # (B, T) tensors, on the CPU
    probs: list[torch.Tensor]  # per batch (N, V) float16: teacher probabilities at the N scored positions
    negentropy: float  # sum over the scored tokens of sum_v p log p (teacher; p as stored), in float64
    tokens: int  # scored tokens


@torch.no_grad()
def _teacher_targets(teacher: torch.nn.Module, batches: list[Batch], device: torch.device,
                     dtype: torch.dtype | None) -> _DomainTargets:
    probs, negentropy, tokens = [], 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        _, mask = next_token_targets(batch)
        with autocast(device, dtype):
            logits = teacher_forward(teacher, batch)[:, :-1]
        logp = F.log_softmax(logits.float(), -1)[mask]  # (N, V)
        p = logp.exp().half()
        # with the stored (rounded) p in both terms, a model equal to the teacher scores exactly 0
        negentropy += float((p.float() * logp).sum(dtype=torch.float64))
        probs.append(p)
        tokens += int(mask.sum())
    return _DomainTargets(batches, probs, negentropy, tokens)


@torch.no_grad()
def _domain_kl(model: torch.nn.Module, forward: Callable, targets: _DomainTargets, device: torch.device,
               dtype: torch.dtype | None) -> float:
    """Mean KL(teacher || model) over the domain's scored tokens."""
    cross = 0.0  # sum over tokens of sum_v p_teacher log p_model
    for batch, probs in zip(targets.batches, targets.probs):
        batch = {k: v.to(device) for k, v in batch.items()}
        _, mask = next_token_targets(batch)
        with autocast(device, dtype):
            logits = forward(model, batch)[:, :-1]
        if logits.shape[-1] != probs.shape[-1]:
            raise MergeError(f"The experts predict {logits.shape[-1]} tokens, the teacher {probs.shape[-1]}: pass "
                             "the teacher the experts were distilled from.")
        logp = F.log_softmax(logits.float(), -1)[mask]  # (N, V)
        cross += float((probs.float() * logp).sum(dtype=torch.float64))
    return (targets.negentropy - cross) / max(targets.tokens, 1)


# ---------------------------------------------------------------------------------------------- search


def grid_points(n: int, steps: int) -> list[tuple[float, ...]]:
    """Every weight vector of ``n`` entries on the simplex whose entries are multiples of ``1/steps``
    (``C(steps + n - 1, n - 1)`` points), in a fixed order."""
    points = []
    for bars in itertools.combinations(range(steps + n - 1), n - 1):  # stars and bars
        edges = (-1, *bars, steps + n - 1)
        points.append(tuple((b - a - 1) / steps for a, b in zip(edges, edges[1:])))
    return points


def _key(weights: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(w, 9) + 0.0 for w in weights)


def _moved(weights: tuple[float, ...], to: int, source: int, step: float) -> tuple[float, ...]:
    out = list(weights)
    out[to], out[source] = out[to] + step, max(out[source] - step, 0.0)
    return _key(out)


def sweep_weights(
    experts: Sequence[str | os.PathLike],
    teacher: torch.nn.Module,
    domains: dict[str, list[Batch]],
    config: SweepConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Search the merge weights minimizing the held-out KL objective (module docstring); returns the record that
    ``merge_info.json`` keeps under ``sweep``: the objective, the search settings, every candidate (its stage,
    weights, KL per domain and objective, in the order tried), the chosen weights and the time taken.

    Args:
        experts: expert folders (as for ``merge``).
        teacher: the teacher the experts were distilled from, on ``device``.
        domains: domain name -> its sweep batches ((B, T) ``input_ids``, ``document_ids``, ``position_ids``,
            ``loss_mask``; :func:`sweep_batches`).
        dtype: autocast dtype of the forwards (None: float32).
    """
    from transformers import AutoModelForCausalLM

    from xlstm_distill.modeling import HybridForCausalLM

    config = config or SweepConfig()
    if not domains:
        raise MergeError("The sweep needs at least one domain of held-out text.")
    device = torch.device(device)
    folders = [Path(e).expanduser().resolve() for e in experts]
    names = list(check_compatible(folders)[0])
    n = len(folders)
    start = time.perf_counter()
    targets = {name: _teacher_targets(teacher, batches, device, dtype) for name, batches in domains.items()}
    log("teacher distributions on the sweep split: " + ", ".join(
        f"{name} {t.tokens} tokens" for name, t in targets.items()) + f" ({time.perf_counter() - start:.1f} s)")
    model = AutoModelForCausalLM.from_pretrained(folders[0], dtype=torch.float32).to(device).eval()
    forward = student_forward if isinstance(model, HybridForCausalLM) else teacher_forward
    state = model.state_dict()
    missing = [name for name in names if name not in state]
    if missing:
        raise MergeError(f"{folders[0]} stores tensors its model does not have ({', '.join(missing[:4])}): re-save "
                         "the experts with save_pretrained.")
    combine = (lambda kl: sum(kl.values()) / len(kl)) if config.objective == "mean" else (lambda kl: max(kl.values()))
    tried: dict[tuple[float, ...], dict[str, Any]] = {}

    with ExitStack() as stack:
        experts_open = open_experts(stack, folders)

        def evaluate(weights: tuple[float, ...], stage: str) -> float:
            if weights in tried:
                return tried[weights]["objective"]
            t0 = time.perf_counter()
            for name, tensor in merged_tensors(names, experts_open, weights):
                state[name].copy_(tensor)
            kl = {name: _domain_kl(model, forward, t, device, dtype) for name, t in targets.items()}
            tried[weights] = {"stage": stage, "weights": list(weights), "kl": kl, "objective": combine(kl)}
            best = min(c["objective"] for c in tried.values())
            log(f"[{len(tried):3d}] {stage:7s} weights {' '.join(f'{w:.4f}' for w in weights)}  KL "
                + " ".join(f"{d} {v:.4f}" for d, v in kl.items())
                + f"  {config.objective} {combine(kl):.4f} (best {best:.4f}, {time.perf_counter() - t0:.1f} s)")
            return tried[weights]["objective"]

        evaluate(_key([1.0 / n] * n), "uniform")
        for i in range(n):
            evaluate(_key([float(i == j) for j in range(n)]), "expert")
        for point in grid_points(n, config.grid):
            evaluate(_key(point), "grid")
        best = min(tried, key=lambda w: tried[w]["objective"])  # first minimum in the order tried
        step = 1.0 / config.grid
        for _ in range(config.refine):
            step /= 2
            while True:
                moves = [_moved(best, i, j, step) for i in range(n) for j in range(n)
                         if i != j and best[j] >= step - 1e-9]
                if not moves:
                    break
                scores = [evaluate(w, "refine") for w in moves]
                top = min(range(len(moves)), key=scores.__getitem__)
                if scores[top] >= tried[best]["objective"]:
                    break
                best = moves[top]
    chosen = tried[best]
    log(f"chosen weights {' '.join(f'{w:.4f}' for w in best)}: {config.objective} KL {chosen['objective']:.4f} "
        f"(uniform {tried[_key([1.0 / n] * n)]['objective']:.4f}); {len(tried)} candidates in "
        f"{time.perf_counter() - start:.1f} s")
    return {
        "objective": config.objective,
        "search": {"grid": config.grid, "refine": config.refine},
        "split": SPLIT_RULE,
        "tokens": {name: t.tokens for name, t in targets.items()},
        "chosen": list(best),
        "chosen_kl": chosen["kl"],
        "candidates": list(tried.values()),
        "seconds": time.perf_counter() - start,
    }


def merge_with_sweep(
    experts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    teacher: torch.nn.Module,
    domains: dict[str, list[Batch]],
    config: SweepConfig | None = None,
    *,
    data: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    log: Callable[[str], None] = print,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """:func:`sweep_weights`, then ``merge`` with the chosen weights into ``out``; ``merge_info.json`` records the
    sweep (with ``data``: what each domain's text is) and ``sweep.png`` plots each domain's KL for every expert
    alone, the uniform merge and the chosen one."""
    folders = [Path(e).expanduser().resolve() for e in experts]
    check_output_folder(Path(out).expanduser().resolve(), folders, overwrite)  # before the search's compute
    record = sweep_weights(folders, teacher, domains, config, device=device, dtype=dtype, log=log)
    record = {"data": data or {}, **record}
    folder = merge(folders, record["chosen"], out, max_shard_size=max_shard_size, overwrite=overwrite,
                   info={"sweep": record})
    plot_sweep(record, folder / "sweep.png")
    return folder


def plot_sweep(record: dict[str, Any], path: Path) -> None:
    """Left: KL per domain of each expert alone, the uniform merge and the chosen merge. Right: the objective of
    every candidate in the order tried."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = record["candidates"]
    rows = {f"expert {c['weights'].index(1.0) + 1}": c for c in candidates if c["stage"] == "expert"}
    rows["uniform"] = next(c for c in candidates if c["stage"] == "uniform")
    rows["chosen"] = next(c for c in candidates if c["weights"] == record["chosen"])
    domains = list(rows["chosen"]["kl"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(rows)
    for r, (label, c) in enumerate(rows.items()):
        xs = [d + (r - (len(rows) - 1) / 2) * width for d in range(len(domains))]
        axes[0].bar(xs, [c["kl"][d] for d in domains], width, label=label)
    axes[0].set_xticks(range(len(domains)), domains)
    axes[0].set_ylabel("held-out KL(teacher || model)")
    axes[0].set_title("sweep split, per domain")
    axes[0].legend(fontsize=7)
    stages = sorted({c["stage"] for c in candidates})
    for stage in stages:
        idx = [i for i, c in enumerate(candidates) if c["stage"] == stage]
        axes[1].scatter(idx, [candidates[i]["objective"] for i in idx], s=12, label=stage)
    axes[1].axhline(rows["chosen"]["objective"], color="k", ls="--", lw=0.8, label="chosen")
    axes[1].set_xlabel("candidate (order tried)")
    axes[1].set_ylabel(f"{record['objective']} KL over domains")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
