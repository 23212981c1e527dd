"""Does recall practice teach the memory to retrieve beyond the window? One recipe's Stage I trained twice from the same
converted student, on its own data mixture and with the `recall` corpus mixed in (`data.weights`), then both Stage I
students (and the converted one) measured on what only a memory can answer:

* held-out needles (`evaluation.heads.needle_probes` on held-out documents: two facts hidden more than the window's
  reach before a question about one of them; teacher-forced, every digit of the answer must be the argmax), a template
  the recall corpus does not use, and how much of the fact reaches the answer (`needle_scores`, nats per answer
  token; 0 for a model that sees nothing beyond its window);
* RULER (`--ruler-file`, a set built by `xlstm-distill data ruler`): accuracy, and accuracy on the requests whose
  needle lies beyond the window (`RulerSet.beyond_window`);
* held-out KL to the teacher, all tokens and beyond the window, on the recipe's own held-out data (no recall text).

    python benchmarks/recall_practice.py --recipe recipes/demo-cpu.yaml --out runs/recall --recall 1.0 \\
        --set align.steps=150 --ruler-file runs/ruler-512.json

Writes ``recall_practice.json`` / ``.md`` / ``.png`` under ``--out`` (one row per student) and each run under
``--out/<variant>/``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from xlstm_distill.benchmarks.report import write_results
from xlstm_distill.data.documents import long_documents
from xlstm_distill.evaluation.heads import needle_probes, needle_scores
from xlstm_distill.evaluation.long_context import RulerSet
from xlstm_distill.stages import Recipe, RunContext
from xlstm_distill.stages import align, convert
from xlstm_distill.stages.common import autocast, compare_to_teacher

COLUMNS = ["student", "recall weight", "align steps", "kl", "kl_in_window", "kl_beyond_window", "needles",
           "teacher needles", "needle information", "teacher needle information", "ruler", "ruler beyond window",
           "ruler requests beyond", "teacher ruler"]


def run(recipe_path: Path, out: Path, recall: float, probes: int, overrides: list[str],
        ruler_file: Path | None) -> list[dict]:
    base = Recipe.load(recipe_path, overrides + [f"out_dir={out / 'plain'}"])
    ctx = RunContext(base)  # the measurements: the recipe's own held-out data
    weights = dict(base.data.weights or {src.name: src.weight for src in ctx.sources()})
    if "recall" in weights:
        raise SystemExit(f"{recipe_path} trains on the recall corpus already: compare against a recipe without it.")
    variants = {"plain": (base, 0.0),
                "recall": (Recipe.load(recipe_path, overrides + [f"out_dir={out / 'recall'}",
                                                                f"data.weights={dict(weights, recall=recall)}"]), recall)}
    teacher, tokenizer = ctx.teacher, ctx.tokenizer
    converted = convert.run(ctx)
    reach = ctx.load_student(converted).config.window_reach or 0
    length = base.data.seq_len
    tests = needle_probes(long_documents(ctx.sources("held_out"), tokenizer, length, probes), tokenizer, probes,
                          length, reach, seed=base.seed + 1000)
    ruler = RulerSet.load(ruler_file, tokenizer) if ruler_file else None
    distances = ruler.needle_distances(tokenizer) if ruler else None
    batches = ctx.held_out_batches()
    teacher_row = dict(zip(("teacher needles", "teacher needle information"), needle_scores(teacher, tests)))
    if ruler:
        teacher_row["teacher ruler"] = _mean(ruler.score_requests(teacher, tokenizer))
    students = {"converted": (converted, 0.0, 0)}
    for name, (recipe, weight) in variants.items():
        run_ctx = RunContext(recipe)
        if run_ctx.converted_dir != converted:  # both runs start from the one converted student
            shutil.copytree(converted, run_ctx.converted_dir, dirs_exist_ok=True)
        students[f"Stage I, {name}"] = (align.run(run_ctx), weight, recipe.align.steps)
    rows = []
    for name, (folder, weight, steps) in students.items():
        student = ctx.load_student(folder).eval()
        with autocast(ctx.device, ctx.autocast):
            held = compare_to_teacher(student, teacher, batches)
            row = {"student": name, "recall weight": weight, "align steps": steps, "kl": held["kl"],
                   "kl_in_window": held.get("kl_in_window"), "kl_beyond_window": held.get("kl_beyond_window"),
                   **dict(zip(("needles", "needle information"), needle_scores(student, tests))), **teacher_row}
            if ruler:
                scores = ruler.score_requests(student, tokenizer)
                beyond = [c for by_length in ruler.beyond_window(scores, student.config.window_size, distances).values()
                          for c in by_length.values()]
                requests = sum(c["requests"] for c in beyond)
                row |= {"ruler": _mean(scores), "ruler requests beyond": requests,
                        "ruler beyond window": sum(c["accuracy"] * c["requests"] for c in beyond) / requests
                        if requests else None}
        rows.append(row)
        print({k: v for k, v in row.items()}, flush=True)
        del student
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["student"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    bars = left.bar(names, [r["needles"] for r in rows], color="tab:blue", label="held-out needles")
    left.bar_label(bars, fmt="%.3f", fontsize=8)
    left.axhline(rows[0]["teacher needles"], color="k", ls="--", lw=0.8, label="teacher")
    left.set_ylabel("accuracy beyond the window")
    left.set_ylim(0, 1)
    left.legend(fontsize=8)
    right.bar_label(right.bar(names, [r["kl_beyond_window"] for r in rows], color="tab:orange"), fmt="%.4f", fontsize=8)
    right.set_ylabel("held-out KL beyond the window")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recall", type=float, default=1.0, help="Weight of the recall corpus in the second run.")
    parser.add_argument("--probes", type=int, default=48, help="Held-out needle probes.")
    parser.add_argument("--ruler-file", type=Path, help="A RULER set (xlstm-distill data ruler) to score as well.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    command = "python benchmarks/recall_practice.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows = run(args.recipe, args.out, args.recall, args.probes, args.overrides, args.ruler_file)
    write_results(args.out, "recall_practice", rows, command, COLUMNS, plot)
    print((args.out / "recall_practice.md").read_text())


if __name__ == "__main__":
    main()
