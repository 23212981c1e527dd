"""Put the final students of several recipe runs side by side: held-out KL, RULER accuracy by length and KL by position
in one table and one figure each, the held-out KL of every run paired with the first run's on the same sequences (its
difference and standard error), and, when the runs keep different numbers of full-attention heads, retrieval and KL
against the share of KV heads kept.

Each run is a recipe's ``out_dir`` after ``xlstm-distill run`` (its ``report/`` folder) and a RULER evaluation of its
Stage II student (``long_context.json`` in ``ruler/`` or ``report/``: ``xlstm-distill evaluate -s student=DIR/stage2/model
--ruler-file ... --output-dir DIR/ruler``). The teacher's RULER scores are taken from the first run.

    python benchmarks/compare_runs.py --out DIR --run "no kept heads=runs/none" --run "4 kept heads=runs/heads4"

DIR gets compare.json / .md, long_context.{json,md,png} (with the share of needles inside each student window: what a
student that retrieves nothing beyond its window scores) and by_position.{json,md,png} of every run's final student,
and budget.png (retrieval at each length and held-out KL beyond the window against the share of KV heads kept).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from xlstm_distill.evaluation.long_context import write_by_position, write_long_context
from xlstm_distill.metrics import paired_kl_difference
from xlstm_distill.modeling import HybridConfig

PAIRED = ("kl", "kl_beyond_window")  # held-out KL parts paired with the first run's


def load_run(folder: Path) -> dict[str, Any]:
    """A run's final student: its held-out row, by-position row, RULER scores (and the teacher's) and kept heads."""
    report = folder / "report"
    held_out = json.loads((report / "held_out.json").read_text())
    final = list(held_out["rows"])[-1]
    ruler_file = next((p for p in (folder / "ruler" / "long_context.json", report / "long_context.json") if p.exists()),
                      None)
    if ruler_file is None:
        raise SystemExit(f"{folder}: no long_context.json in ruler/ or report/; run xlstm-distill evaluate with "
                         f"--ruler-file and --output-dir {folder / 'ruler'} first.")
    ruler = json.loads(ruler_file.read_text())
    names = list(ruler["models"])  # xlstm-distill evaluate writes the teacher first, the student last
    teacher, student = (names[0], names[-1]) if len(names) > 1 else (None, names[0])
    config = json.loads((folder / "stage2" / "model" / "config.json").read_text())
    student_config = HybridConfig.from_dict(config)
    by_position = report / "by_position.json"
    return {
        "stage": final,
        "data": held_out.get("data"),  # the held-out tokens' fingerprint (reports that predate it: None)
        "held_out": held_out["rows"][final],
        "ruler": ruler["models"][student],
        "teacher_ruler": ruler["models"][teacher] if teacher else None,
        "settings": ruler["settings"],
        "within_window": ruler.get("within_window") or {},
        "beyond_window": {w: {"teacher": by_model.get(teacher), "student": by_model[student]}
                          for w, by_model in (ruler.get("beyond_window") or {}).items()},
        "by_position": json.loads(by_position.read_text()) if by_position.exists() else None,
        "mixer": config.get("mixer"),
        "window": student_config.window_size if student_config.uses_swa else None,
        "heads": config.get("full_attention_heads") or [],
        "kv_heads": config["num_hidden_layers"] * config["num_key_value_heads"],
    }


def compare(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    first_label = next(iter(runs))
    first = runs[first_label]["held_out"].get("per_sequence")
    first_data = runs[first_label]["data"]
    for label, run in runs.items():
        held = run["held_out"]
        row = {"run": label, "mixer": run["mixer"], "kept heads": len(run["heads"]),
               "kept share": len(run["heads"]) / run["kv_heads"], "perplexity": held["student_ppl"], "kl": held["kl"],
               "kl_in_window": held["kl_in_window"], "kl_beyond_window": held["kl_beyond_window"],
               "full_attention_heads": run["heads"]}
        own = held.get("per_sequence")
        same_data = first_data is None or run["data"] is None or run["data"] == first_data
        paired = own and first and label != first_label and same_data
        for part in PAIRED:  # this run minus the first on the same held-out sequences
            row[f"{part} - first run"] = paired_kl_difference(own[part], first[part]) if paired else None
        for task, by_length in run["ruler"].items():
            for length, accuracy in by_length.items():
                row[f"ruler {task} {length}"] = accuracy
        rows.append(row)
    return rows


def within_window(runs: dict[str, dict[str, Any]], ruler_file: Path | None, tokenizer: str) -> dict[str, Any]:
    """The share of needles inside each window of the runs' students: from their RULER results, or computed from
    the RULER set they were scored on (``--ruler-file``) for results written before it was recorded."""
    shares = {w: s for run in runs.values() for w, s in run["within_window"].items()}
    missing = {str(run["window"]) for run in runs.values() if run["window"] is not None} - set(shares)
    if missing and ruler_file is not None:
        from xlstm_distill.evaluation.long_context import RulerSet
        from xlstm_distill.teacher import load_tokenizer

        tok = load_tokenizer(tokenizer)
        ruler = RulerSet.load(ruler_file, tok)
        shares |= {w: ruler.within_window(tok, int(w)) for w in sorted(missing, key=int)}
    return shares


def write(runs: dict[str, dict[str, Any]], rows: list[dict[str, Any]], out: Path, command: str,
          windows: dict[str, Any] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(runs.values()))
    teacher = first["teacher_ruler"]
    models = ({"teacher": teacher} if teacher else {}) | {label: run["ruler"] for label, run in runs.items()}
    beyond: dict[str, dict[str, Any]] = {}  # per window: the teacher (first run's), then each run's student
    for label, run in runs.items():
        for window, by_model in run["beyond_window"].items():
            if by_model["teacher"] is not None:
                beyond.setdefault(window, {}).setdefault("teacher", by_model["teacher"])
            beyond.setdefault(window, {})[label] = by_model["student"]
    write_long_context({"settings": first["settings"], "models": models, "within_window": windows or {},
                        "beyond_window": beyond}, out)
    positions = {label: run["by_position"] for label, run in runs.items() if run["by_position"]}
    if positions:
        any_run = next(iter(positions.values()))
        rows_by_label = {label: p["rows"][list(p["rows"])[-1]] for label, p in positions.items()}
        write_by_position(rows_by_label, out, any_run["documents"], any_run["length"], any_run["bucket"],
                          any_run["window"])
    ruler_keys = [k for k in rows[0] if k.startswith("ruler ")]
    teacher_row = {f"ruler {task} {n}": acc for task, by_length in (teacher or {}).items() for n, acc in by_length.items()}
    (out / "compare.json").write_text(json.dumps({"command": command, "teacher": teacher_row, "rows": rows}, indent=2))
    paired = [f"{part} - first run" for part in PAIRED]
    columns = ["run", "mixer", "kept heads", "kept share", "perplexity", "kl", "kl_in_window", "kl_beyond_window",
               *paired, *ruler_keys]
    lines = [f"Command: `{command}`", "", f"Final student of each run ({first['stage']}); RULER: "
             f"{first['settings']['samples']} samples per task and length; `- first run`: the held-out KL minus the "
             f"first run's, paired over the same sequences (± 2 standard errors).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    if teacher_row:
        lines.append("| teacher | | | | | 0 | 0 | 0 | | | " + " | ".join(_cell(teacher_row.get(k)) for k in ruler_keys)
                     + " |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    if len({row["kept heads"] for row in rows}) > 1:
        plot_budget(rows, teacher_row, out / "budget.png")


def _cell(value: Any) -> str:
    if isinstance(value, dict):  # a paired difference
        return f"{value['difference']:+.4f} ± {2 * value['stderr']:.4f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def plot_budget(rows: list[dict[str, Any]], teacher: dict[str, float], path: Path) -> None:
    """RULER accuracy per length (left) and held-out KL beyond the window (right) against the share of KV heads kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["kept share"])
    share = [100 * r["kept share"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in (k for k in rows[0] if k.startswith("ruler ")):
        line, = left.plot(share, [r[key] for r in rows], "-o", label=key[len("ruler "):])
        if key in teacher:
            left.axhline(teacher[key], color=line.get_color(), lw=0.8, ls="--")
    left.set_ylim(-0.03, 1.03)
    left.set_ylabel("RULER accuracy (teacher dashed)")
    right.plot(share, [r["kl_beyond_window"] for r in rows], "-o", label="beyond the window")
    right.plot(share, [r["kl"] for r in rows], "-o", label="all tokens")
    right.set_ylabel("held-out KL(teacher || student)")
    for ax in (left, right):
        ax.set_xlabel("KV heads kept as full attention (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                        help="A recipe run's out_dir and its label (repeat; the first run's RULER teacher is shown).")
    parser.add_argument("--ruler-file", type=Path, help="The RULER set the runs were scored on: the share of needles "
                        "inside each student's window is computed from it where the runs' results do not hold it.")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="The tokenizer of --ruler-file (the teacher's).")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.run:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"--run {item!r}: give LABEL=DIR.")
        runs[label] = load_run(Path(folder))
    rows = compare(runs)
    command = "python benchmarks/compare_runs.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    write(runs, rows, args.out, command, within_window(runs, args.ruler_file, args.tokenizer))
    print((args.out / "compare.md").read_text())


if __name__ == "__main__":
    main()
