"""Training objectives side by side: one run per variant (recipe overrides) from one recipe's converted student and
teacher targets, then every model's held-out KL(teacher || student) and perplexity, all tokens and inside / beyond the
window, next to the converted student and the recipe's own Stage I model.

    python benchmarks/objectives.py --recipe recipes/demo-cpu.yaml --out DIR \\
        --variant "paper: distill.gamma=0.9 distill.beta=0.1" --variant "kl: distill.gamma=0 distill.beta=1" \\
        --variant "stage I weighted: align.beyond_window_weight=4 distill.gamma=0 distill.beta=1"

A variant that changes Stage I (``align.*`` keys) trains its own Stage I model (a row of its own) and runs Stage II
from it; the others start from the recipe's Stage I model. The recipe's Stage I model and targets are made first if
missing; each variant trains under DIR/runs/NAME (resumes), and DIR gets objectives.json, .md and .png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from xlstm_distill.benchmarks.report import write_results
from xlstm_distill.stages import Recipe, RunContext
from xlstm_distill.stages import align, distill, targets
from xlstm_distill.stages.common import autocast, compare_to_teacher

DEFAULT_VARIANTS = {
    "paper (CE 0.9, KL 0.1)": "distill.gamma=0.9 distill.beta=0.1 distill.topk_mode=renormalize",
    "KL only, renormalized": "distill.gamma=0 distill.beta=1 distill.topk_mode=renormalize",
    "KL only, residual": "distill.gamma=0 distill.beta=1 distill.topk_mode=residual",
    "CE 0.5, KL 0.5, residual": "distill.gamma=0.5 distill.beta=0.5 distill.topk_mode=residual",
    "KL only, residual, teacher's text": "distill.gamma=0 distill.beta=1 distill.topk_mode=residual targets.text=teacher",
}


def run(recipe_path: Path, out: Path, variants: dict[str, str], common: list[str]) -> list[dict]:
    base = RunContext(Recipe.load(recipe_path, common))
    stage1 = align.run(base)
    target_dir = targets.run(base)
    batches = base.held_out_batches()

    def measure(name: str, model_dir: Path) -> dict:
        with autocast(base.device, base.autocast):
            row = compare_to_teacher(base.load_student(model_dir).eval(), base.teacher, batches)
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
        return {"variant": name, **row}

    rows = [measure("converted", base.converted_dir), measure("Stage I", stage1)]
    for name, overrides in variants.items():
        folder = out / "runs" / "".join(c if c.isalnum() else "-" for c in name).strip("-")
        own_targets = "targets." in overrides  # a variant of the targets (e.g. the teacher's text) makes its own
        extra = [f"out_dir={folder}"] + ([f"targets.dir={target_dir}"] if target_dir and not own_targets else [])
        ctx = RunContext(Recipe.load(recipe_path, common + shlex.split(overrides) + extra),
                         teacher=base.teacher_and_tokenizer())  # one teacher in memory for every variant
        start = stage1
        if "align." in overrides:  # its own Stage I model
            start = align.run(ctx)
            rows.append({**measure(f"{name}: Stage I", start), "overrides": overrides})
        rows.append({**measure(name, distill.run(ctx, stage1=start)), "overrides": overrides})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    keys = [("kl", "all tokens"), ("kl_in_window", "inside the window"), ("kl_beyond_window", "beyond the window")]
    keys = [(k, label) for k, label in keys if k in rows[0]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rows), 3.6))
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        ax.bar([i + j * width for i in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(rows))], names, rotation=15, fontsize=8)
    ax.set_ylabel("held-out KL(teacher || student)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", default=[],
                        help='"NAME: key=value key=value" (repeatable; default: the paper\'s mix, KL only '
                             "renormalized and residual, CE 0.5 + KL 0.5)")
    parser.add_argument("--set", action="append", default=[], dest="common",
                        help="override for every run, the Stage I model and targets included (repeatable)")
    args = parser.parse_args()
    variants = dict(v.split(":", 1) for v in args.variant) if args.variant else DEFAULT_VARIANTS
    rows = run(args.recipe, args.out, {k.strip(): v.strip() for k, v in variants.items()}, args.common)
    command = "python benchmarks/objectives.py " + shlex.join(sys.argv[1:])
    columns = ["variant", "kl", "kl_in_window", "kl_beyond_window", "student_ppl", "teacher_ppl", "tokens",
               "tokens_beyond_window", "overrides"]
    write_results(args.out, "objectives", rows, command, [c for c in columns if c in rows[0] or c == "overrides"],
                  plot)
    print((args.out / "objectives.md").read_text())


if __name__ == "__main__":
    main()
