"""Full-attention heads: budget against fidelity. From one recipe's student (the converted one, or ``--student``),
every KV head is scored with each calibration probe (``xlstm_distill.evaluation.heads``: needles in training text,
a synthetic key-value list, training text); then, for every budget and every way of choosing (each probe, random
heads), those heads keep full attention and the student is measured: held-out KL(teacher || student) all / inside /
beyond the window, and retrieval on fresh probes of both retrieval kinds, the needles hidden in held-out documents
(every answer token the argmax, teacher-forced; the teacher alongside). With ``--ruler``, the heads chosen by
``--ruler-probe`` are also scored on RULER's needle-in-a-haystack tasks at every length (greedy generation as
lm-evaluation-harness does it; the teacher once, the same documents for every budget); ``--ruler-file`` scores a
RULER set built elsewhere (``xlstm-distill data ruler``) instead, on a machine without lm-eval.

    python benchmarks/full_heads.py --recipe recipes/demo-cpu.yaml --out DIR --budgets 0,0.02,0.05,0.1
    python benchmarks/full_heads.py --recipe recipes/smollm2-135m-gpu.yaml --student runs/smollm2-135m-gpu/stage2 \
        --out DIR --ruler niah_single_1,niah_multikey_2 --ruler-lengths 1024,2048,4096,8192 --ruler-samples 20
    python benchmarks/full_heads.py --recipe recipes/smollm2-135m-gpu.yaml --student runs/smollm2-135m-gpu/stage2 \
        --out DIR --ruler-file runs/ruler.json

DIR gets full_heads.json, .md and .png (rewritten after every row), and heads_<probe>.json / .png (the scores of
every head).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from xlstm_distill.benchmarks.report import write_results
from xlstm_distill.data.documents import long_documents
from xlstm_distill.evaluation.heads import (choose_heads, head_scores, needle_probes, probe_accuracy,
                                            retrieval_probes, text_calibration, write_head_scores)
from xlstm_distill.evaluation.long_context import RulerSet, RulerTasks
from xlstm_distill.stages import Recipe, RunContext
from xlstm_distill.stages import convert
from xlstm_distill.stages.common import autocast, compare_to_teacher


def run(recipe_path: Path, out: Path, budgets: list[float], student_dir: Path | None, samples: int,
        eval_probes: int, overrides: list[str], ruler_spec: tuple[list[str], list[int], int],
        write: Callable[[list[dict]], None], ruler_file: Path | None = None,
        ruler_probe: str = "needles") -> list[dict]:
    ctx = RunContext(Recipe.load(recipe_path, overrides))
    student = ctx.load_student(student_dir or convert.run(ctx)).eval()
    teacher, tokenizer = ctx.teacher, ctx.tokenizer
    if ruler_file is not None:  # the same documents for every model
        ruler = RulerSet.load(ruler_file, tokenizer)
    else:
        ruler = RulerTasks(tokenizer, *ruler_spec).ruler_set() if ruler_spec[0] else None
    length, seed, reach = ctx.recipe.data.seq_len, ctx.recipe.seed, student.config.window_reach or 0
    documents = long_documents(ctx.sources("train"), tokenizer, length, samples)
    calibration = {
        "needles": needle_probes(documents, tokenizer, samples, length, reach, seed=seed),
        "retrieval": retrieval_probes(tokenizer, samples, length, seed=seed),
        "text": text_calibration(documents, reach, seed=seed),
    }
    tests = {  # not the calibration ones
        "needles": needle_probes(long_documents(ctx.sources("held_out"), tokenizer, length, eval_probes), tokenizer,
                                 eval_probes, length, reach, seed=seed + 1000),
        "retrieval": retrieval_probes(tokenizer, eval_probes, length, seed=seed + 1000),
    }
    batches = ctx.held_out_batches()
    layers, kv = student.config.num_hidden_layers, student.config.num_key_value_heads
    choices: dict[str, torch.Tensor] = {}
    for probe, data in calibration.items():
        with autocast(ctx.device, ctx.autocast):
            result = head_scores(student, teacher, data)
        write_head_scores(result, choose_heads(result.scores, max(budgets)), out / f"heads_{probe}",
                          {"probe": probe, "samples": samples, "length": length})
        choices[probe] = result.scores
    choices["random"] = torch.rand(layers, kv, generator=torch.Generator().manual_seed(seed))
    teacher_accuracy = {f"teacher_{kind}": probe_accuracy(teacher, probes) for kind, probes in tests.items()}
    teacher_ruler = _ruler_columns(ruler.score(teacher, tokenizer), "teacher ") if ruler else {}
    rows = []
    for budget in budgets:
        for method, scores in choices.items():
            if budget == 0 and method != ruler_probe:
                continue  # no head kept: one row
            heads = choose_heads(scores, budget)
            student.set_full_attention(heads)
            with autocast(ctx.device, ctx.autocast):
                row = compare_to_teacher(student, teacher, batches)
                accuracy = {kind: probe_accuracy(student, probes) for kind, probes in tests.items()}
                ruled = _ruler_columns(ruler.score(student, tokenizer), "") if ruler and method == ruler_probe else {}
            rows.append({"chosen by": method if budget else "-", "budget": budget, "heads": len(heads),
                         "kv_cache_share": len(heads) / (layers * kv), **row, **accuracy,
                         **teacher_accuracy, **ruled, **(teacher_ruler if ruled else {}),
                         "full_attention_heads": heads})
            print({k: v for k, v in rows[-1].items() if k not in ("full_attention_heads", "per_sequence")}, flush=True)
            write(rows)
    student.set_full_attention([])
    return rows


def _ruler_columns(scores: dict[str, dict[int, float]], prefix: str) -> dict[str, float]:
    """{task: {length: accuracy}} -> {"<prefix>ruler <task> <length>": accuracy}."""
    return {f"{prefix}ruler {task} {length}": acc for task, by_length in scores.items() for length, acc in by_length.items()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ruler_keys = [k for k in rows[0] if k.startswith("ruler ")]
    fig, axes = plt.subplots(1, 3 if ruler_keys else 2, figsize=(15 if ruler_keys else 10, 3.8))
    none = [r for r in rows if r["budget"] == 0]
    for method in ("needles", "retrieval", "text", "random"):
        points = sorted(((r["budget"], r) for r in none + [r for r in rows if r["chosen by"] == method]),
                        key=lambda point: point[0])
        for ax, key in zip(axes, ("kl_beyond_window", "needles")):
            ax.plot([100 * b for b, _ in points], [r[key] for _, r in points], "-o", label=f"chosen by {method}")
    axes[1].axhline(rows[0]["teacher_needles"], color="k", linestyle="--", label="teacher")
    if ruler_keys:  # RULER accuracy (heads chosen by the retrieval probe) against the budget, one line per task/length
        ruled = sorted((r for r in rows if ruler_keys[0] in r), key=lambda r: r["budget"])
        for i, key in enumerate(ruler_keys):
            line, = axes[2].plot([100 * r["budget"] for r in ruled], [r[key] for r in ruled], "-o",
                                 label=key.removeprefix("ruler "), color=f"C{i}")
            axes[2].axhline(ruled[0]["teacher " + key], color=line.get_color(), linestyle=":", linewidth=1)
        axes[2].set_ylim(-0.03, 1.03)
    titles = ("held-out KL beyond the window", "needles in held-out text (answer exact)",
              "RULER accuracy (dotted: teacher)")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("full-attention KV heads (% of all = % of the teacher's KV cache)", fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budgets", default="0,0.02,0.05,0.1", help="Fractions of the KV heads kept.")
    parser.add_argument("--student", type=Path, default=None, help="A trained student (default: the converted one).")
    parser.add_argument("--samples", type=int, default=16, help="Calibration sequences per probe.")
    parser.add_argument("--eval-probes", type=int, default=64, help="Fresh probes of each retrieval kind for the "
                        "accuracy.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Recipe override (repeatable).")
    parser.add_argument("--ruler", default="", help="RULER tasks for the heads of --ruler-probe (comma-separated).")
    parser.add_argument("--ruler-probe", default="needles", help="The probe whose heads RULER scores.")
    parser.add_argument("--ruler-lengths", default="1024,2048,4096,8192", help="RULER context lengths.")
    parser.add_argument("--ruler-samples", type=int, default=20, help="RULER samples per task and length.")
    parser.add_argument("--ruler-file", type=Path, default=None, help="A RULER set built by `xlstm-distill data "
                        "ruler` (replaces --ruler, --ruler-lengths and --ruler-samples).")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    command = "python benchmarks/full_heads.py " + shlex.join(sys.argv[1:])
    columns = ["chosen by", "budget", "heads", "kv_cache_share", "kl", "kl_in_window", "kl_beyond_window",
               "student_ppl", "needles", "teacher_needles", "retrieval", "teacher_retrieval"]
    tasks, lengths = [t for t in args.ruler.split(",") if t], [int(n) for n in args.ruler_lengths.split(",")]

    def write(rows: list[dict]) -> None:  # RULER columns (task and length) as the rows carry them
        write_results(args.out, "full_heads", rows, command,
                      columns + [k for k in rows[0] if k.startswith("ruler ")], plot)

    run(args.recipe, args.out, budgets, args.student, args.samples, args.eval_probes, args.overrides,
        (tasks, lengths, args.ruler_samples), write, args.ruler_file, args.ruler_probe)


if __name__ == "__main__":

    main()
