"""Key-value facts hidden in text: how often teacher and students retrieve them, and how far each student is from the
teacher on the facts that choose the full-attention heads. For a recipe and a few student folders (converted ones
with different kept heads, trained ones), on needle probes (``xlstm_distill.evaluation.heads.needle_probes``: two
facts ``The <key> code is <6 digits>.`` hidden in a document more than the window's reach before the question):

* ``needles``: the share of fresh probes in held-out documents whose every answer digit is the model's argmax
  (teacher-forced: greedy decoding's answer), teacher included;
* ``needle_information``: on the same probes, how much of the hidden fact reaches the answer (nats per answer token:
  log p(answer) minus log p(answer) with the fact's value swapped; 0 for a model that sees nothing beyond its window);
* ``calibration_kl``: KL(teacher || student) on the answers of the calibration probes that ``select_heads`` scores
  with (training documents, the recipe's seed and lengths), per answer token.

    python benchmarks/needle_retrieval.py --recipe recipes/demo-cpu.yaml --out DIR \\
        --model single=runs/a/student-init --model greedy=runs/b/student-init --model trained=runs/b/stage2/model

DIR gets needle_retrieval.json, .md and .png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from xlstm_distill.benchmarks.report import student_folders, write_results
from xlstm_distill.data.documents import long_documents
from xlstm_distill.evaluation.heads import head_scores, needle_probes, needle_scores
from xlstm_distill.stages import Recipe, RunContext, select_heads
from xlstm_distill.stages.common import autocast


def run(recipe_path: Path, models: dict[str, Path], probes: int, overrides: list[str]) -> list[dict]:
    ctx = RunContext(Recipe.load(recipe_path, overrides))
    select = ctx.recipe.select_heads
    length = (select.length if select else None) or ctx.recipe.data.seq_len
    samples = select.samples if select else 16
    students = {name: ctx.load_student(path).eval() for name, path in models.items()}
    reach = max(s.config.window_reach or 0 for s in students.values())
    tokenizer, seed = ctx.tokenizer, ctx.recipe.seed
    calibration = select_heads.calibration(ctx, "needles", samples, length, reach)  # the ones select_heads scores
    held_out = needle_probes(long_documents(ctx.sources("held_out"), tokenizer, length, probes), tokenizer, probes,
                             length, reach, seed=seed + 1000)
    rows = [{"model": "teacher", **_needles(ctx.teacher, held_out)}]
    for name, student in students.items():
        with autocast(ctx.device, ctx.autocast):
            kl = head_scores(student, ctx.teacher, calibration, candidates=[]).baseline
            rows.append({"model": name, "path": str(models[name]), **_needles(student, held_out),
                         "calibration_kl": kl, "full_attention_heads": student.config.full_attention_heads})
        print(rows[-1], flush=True)
    return rows


def _needles(model, probes) -> dict[str, float]:
    accuracy, information = needle_scores(model, probes)
    return {"needles": accuracy, "needle_information": information}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    names = [r["model"] for r in rows]
    colors = ["k"] + ["C0"] * (len(rows) - 1)
    axes[0].bar(names, [r["needles"] for r in rows], color=colors)
    axes[0].set_title("needles in held-out text (answer exact)")
    axes[0].set_ylim(0, 1)
    axes[1].bar(names, [r["needle_information"] for r in rows], color=colors)
    axes[1].set_title("fact reaching the answer (nats / answer token)")
    axes[2].bar(names[1:], [r["calibration_kl"] for r in rows[1:]])
    axes[2].set_title("KL(teacher || student) on the calibration answers")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH of a student folder (repeatable).")
    parser.add_argument("--probes", type=int, default=48, help="Held-out needle probes.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Recipe override (repeatable).")
    args = parser.parse_args()
    models = student_folders(parser, args.model)
    rows = run(args.recipe, models, args.probes, args.overrides)
    command = "python benchmarks/needle_retrieval.py " + shlex.join(sys.argv[1:])
    write_results(args.out, "needle_retrieval", rows, command,
                  ["model", "needles", "needle_information", "calibration_kl", "full_attention_heads"], plot)


if __name__ == "__main__":
    main()
