"""Teacher-recovery report: results JSON, markdown tables and a C_alpha plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xlstm_distill.evaluation.harness import _json_safe
from xlstm_distill.metrics import mean_paired_difference, paired_difference, summarize, win_and_tie_curve

REPORT_JSON = "results.json"
REPORT_MD = "report.md"
REPORT_PNG = "win_and_tie.png"

__all__ = ["REPORT_JSON", "REPORT_MD", "REPORT_PNG", "combine_results", "compare", "write_report"]


def _add_baselines(results: Mapping[str, Any], baselines) -> tuple[dict[str, Any], list[str]]:
    models = dict(results["models"])
    if baselines is None:
        return models, []
    if isinstance(baselines, Mapping):  # external scores {name: {task: score}}
        for name, scores in baselines.items():
            if name in models:
                raise ValueError(f"Baseline '{name}' is also an evaluated model; give it another name.")
            models[name] = {
                "source": "given scores",
                "scores": {k: float(v) for k, v in scores.items()},
                "stderr": {k: None for k in scores},
            }
        return models, list(baselines)
    names = [baselines] if isinstance(baselines, str) else list(baselines)
    missing = [n for n in names if n not in models]
    if missing:
        raise ValueError(f"Baselines {missing} are not among the evaluated models {list(models)}.")
    return models, names


def compare(
    results: Mapping[str, Any],
    teacher_name: str,
    baselines: Sequence[str] | Mapping[str, Mapping[str, float]] | None = None,
    alphas: Sequence[float] = (0.0, 0.01, 0.05),
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Recovery rates, C_alpha and alpha* of every model against the teacher.

    Benchmarks where either score is missing, or where the teacher scores 0 (recovery undefined), are left out
    of that model's metrics and listed under ``excluded``. Where both models have per-document scores
    (``evaluate_models(log_samples=True)``), ``paired`` holds the per-document difference to the teacher.
    """
    models, baseline_names = _add_baselines(results, baselines)
    if teacher_name not in models:
        raise ValueError(f"Teacher '{teacher_name}' is not among the evaluated models {list(models)}.")
    tasks = list(results.get("settings", {}).get("tasks") or models[teacher_name]["scores"])
    teacher_scores = models[teacher_name]["scores"]
    out = {"teacher": teacher_name, "tasks": tasks, "alphas": list(alphas), "threshold": threshold, "models": {}}
    for name, entry in models.items():
        if name == teacher_name:
            continue
        excluded: dict[str, str] = {}
        s, t = {}, {}
        for task in tasks:
            a_s, a_t = entry["scores"].get(task), teacher_scores.get(task)
            if a_s is None or a_t is None:
                excluded[task] = "no score"
            elif a_t == 0:
                excluded[task] = "teacher scores 0 (recovery undefined)"
            else:
                s[task], t[task] = float(a_s), float(a_t)
        row: dict[str, Any] = {"role": "baseline" if name in baseline_names else "student", "excluded": excluded}
        if t:
            row.update(summarize(s, t, tuple(alphas), threshold))
            row["curve"] = dict(zip(("alphas", "values"), win_and_tie_curve(s, t)))
        else:
            row.update({"benchmarks": [], "recovery": {}, "mean_recovery": None, "critical_tolerance": None,
                        "win_and_tie": {f"{a:g}": None for a in alphas}, "threshold": threshold})
        row["paired"] = _paired(entry, models[teacher_name], tasks)
        if row["role"] == "student":
            row["paired_vs_baselines"] = {b: p for b in baseline_names if (p := _paired(entry, models[b], tasks))}
        out["models"][name] = row
    return out


def _paired(entry: Mapping[str, Any], reference: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Per task, the paired per-document difference entry - reference (where both have per-document scores)."""
    docs, ref_docs = entry.get("per_document", {}), reference.get("per_document", {})
    paired = {task: paired_difference(docs[task], ref_docs[task]) for task in tasks if task in docs and task in ref_docs}
    return {task: value for task, value in paired.items() if value is not None}


def combine_results(parts: Sequence[Mapping[str, Any] | str | os.PathLike]) -> dict[str, Any]:
    """One result from several :func:`evaluate_models` runs (other processes or machines) of different models.

    The runs must have identical settings (tasks, shots, limits, metrics, seeds): otherwise their scores are not
    comparable and a ``ValueError`` names the first differing setting.
    """
    loaded = [dict(json.loads(Path(p).read_text())) if not isinstance(p, Mapping) else dict(p) for p in parts]
    if not loaded:
        raise ValueError("No results to combine.")
    first = loaded[0]
    models: dict[str, Any] = {}
    for part in loaded:
        for key in set(first["settings"]) | set(part["settings"]):
            if first["settings"].get(key) != part["settings"].get(key):
                raise ValueError(f"Results differ in setting '{key}': {first['settings'].get(key)!r} vs "
                                 f"{part['settings'].get(key)!r}; evaluate them with the same settings.")
        clash = set(models) & set(part["models"])
        if clash:
            raise ValueError(f"Model names evaluated twice: {sorted(clash)}.")
        models.update(part["models"])
    return {"settings": first["settings"], "models": models, "versions": first.get("versions", {})}


def write_report(
    results: Mapping[str, Any] | str | os.PathLike,
    teacher_name: str,
    output_dir: str | os.PathLike,
    baselines: Sequence[str] | Mapping[str, Mapping[str, float]] | None = None,
    alphas: Sequence[float] = (0.0, 0.01, 0.05),
    threshold: float = 0.5,
) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and ``win_and_tie.png`` into ``output_dir``.

    Args:
        results: the dict returned by :func:`evaluate_models` (or the path of a ``results.json`` written here).
        teacher_name: which evaluated model is the teacher; every other model is compared against it.
        baselines: names of evaluated models that are baselines (other curves/columns, dashed), or
            ``{name: {task: score}}`` of published baseline scores to compare without running them.
        alphas: tolerances reported as ``C_alpha`` columns.
        threshold: C_alpha level that defines the critical tolerance alpha* (0.5 in the paper).

    Returns ``{"json": path, "markdown": path, "plot": path}``.
    """
    if not isinstance(results, Mapping):
        results = json.loads(Path(results).read_text())
    results = {k: v for k, v in results.items() if k != "comparison"}
    comparison = compare(results, teacher_name, baselines, alphas, threshold)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    models, _ = _add_baselines(results, baselines)
    data = {**results, "models": models, "comparison": comparison}
    paths = {"json": out / REPORT_JSON, "markdown": out / REPORT_MD, "plot": out / REPORT_PNG}
    paths["json"].write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(_markdown(data, comparison))
    _plot(comparison, paths["plot"])
    return paths


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if not isinstance(x, (int, float)):  # e.g. lm-eval's "N/A" stderr of a group with one document per subtask
        return str(x)
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def _markdown(data: Mapping[str, Any], comparison: Mapping[str, Any]) -> str:
    settings = data.get("settings", {})
    teacher = comparison["teacher"]
    tasks = comparison["tasks"]
    models = data["models"]
    others = list(comparison["models"])
    lines = [f"# Teacher recovery against {teacher}", ""]
    if settings.get("limit") is not None:
        lines += [
            f"> **limit = {settings['limit']}**: every task was scored on a subset of its documents. These numbers "
            "are for smoke tests only and are not comparable with published scores.",
            "",
        ]
    lines += ["Models:", ""]
    lines.append(f"- **{teacher}** (teacher): `{models[teacher].get('source', '')}`")
    for name in others:
        lines.append(f"- **{name}** ({comparison['models'][name]['role']}): `{models[name].get('source', '')}`")
    lines.append("")

    # scores table
    metrics = settings.get("metrics", {})
    shots = settings.get("num_fewshot", {})
    header = ["task", "shots", "metric", f"{teacher} (teacher)"] + [f"{n} (recovery)" for n in others]
    lines += ["## Scores", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        t_entry = models[teacher]
        row = [task, _shots_text(shots.get(task)), metrics.get(task, "").split(",")[0] or "score",
               _score(t_entry, task)]
        for name in others:
            rec = comparison["models"][name]["recovery"].get(task)
            row.append(f"{_score(models[name], task)} ({_fmt(rec, 3)})")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Scores are lm-eval's (± standard error); recovery = student score / teacher score.")
    lines.append("")

    # metrics table
    alphas = comparison["alphas"]
    header = ["model", "role", "benchmarks"] + [f"C_{a:g}" for a in alphas] + ["alpha*", "mean recovery"]
    lines += ["## Win-and-Tie rates and critical tolerance", "", "| " + " | ".join(header) + " |",
              "|" + "---|" * len(header)]
    for name in others:
        row = comparison["models"][name]
        cells = [name, row["role"], str(len(row["benchmarks"]))]
        cells += [_fmt(row["win_and_tie"].get(f"{a:g}"), 3) for a in alphas]
        cells += [_fmt(row["critical_tolerance"], 3), _fmt(row["mean_recovery"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "C_alpha = fraction of benchmarks with student >= (1 - alpha) * teacher; alpha* = smallest alpha with "
        f"C_alpha >= {comparison['threshold']:g} (lower is better; 0 = lossless)."
    )
    lines += _paired_table(comparison, others)
    notes = [
        f"- {name}: {task} left out ({why})"
        for name, row in comparison["models"].items()
        for task, why in row["excluded"].items()
    ]
    if notes:
        lines += ["", "Left out of the metrics:", "", *notes]
    lines += ["", "![C_alpha against alpha](win_and_tie.png)", "", "## Settings", ""]
    for key in ("limit", "batch_size", "max_length", "apply_chat_template", "max_gen_toks", "fewshot_seed",
                "offline_tasks"):
        if key in settings:
            lines.append(f"- {key}: {settings[key]}")
    versions = data.get("versions", {})
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines) + "\n"


def _paired_table(comparison: Mapping[str, Any], others: list[str]) -> list[str]:
    """Paired differences of every model to the teacher, and of every student to every baseline (no lines where no
    model has per-document scores)."""
    columns = [(f"{n} - {comparison['teacher']}", comparison["models"][n]["paired"]) for n in others]
    columns += [(f"{n} - {b}", paired) for n in others
                for b, paired in comparison["models"][n].get("paired_vs_baselines", {}).items()]
    columns = [(title, paired) for title, paired in columns if paired]  # e.g. baselines given as scores: none
    if not columns:
        return []
    header = ["task"] + [title for title, _ in columns]
    lines = ["", "## Paired differences", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in comparison["tasks"]:
        cells = [task]
        for _, paired in columns:
            p = paired.get(task)
            cells.append("" if p is None else f"{p['difference']:+.4f} ± {p['stderr']:.4f} ({p['documents']})")
        lines.append("| " + " | ".join(cells) + " |")
    means = [mean_paired_difference(paired) for _, paired in columns]
    lines.append("| **mean over tasks** | " + " | ".join(
        f"**{m['difference']:+.4f}** ± {m['stderr']:.4f} ({m['tasks']} task{'s' * (m['tasks'] != 1)})" for m in means) + " |")
    return lines + ["", "Mean per-document score difference over the documents both scored (± its standard error, "
                        "paired; number of documents). The last row weighs the tasks equally, as mean recovery "
                        "does; its standard error combines the tasks' (independent documents)."]


def _shots_text(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, Mapping):
        return "/".join(str(v) for v in sorted(set(value.values())))
    return str(value)


def _score(entry: Mapping[str, Any], task: str) -> str:
    score = entry.get("scores", {}).get(task)
    err = entry.get("stderr", {}).get(task)
    if score is None:
        return "n/a"
    return _fmt(score) + (f" ± {_fmt(err)}" if err is not None else "")


def _plot(comparison: Mapping[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend change (renders with Agg)

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for name, row in comparison["models"].items():
        curve = row.get("curve")
        if not curve:
            continue
        a_star = row["critical_tolerance"]
        style = "--" if row["role"] == "baseline" else "-"
        line = ax.step(curve["alphas"], curve["values"], where="post", linestyle=style, linewidth=1.8,
                       label=f"{name} ($\\alpha^*$ = {a_star:.3g})")[0]
        ax.plot([a_star], [_value_at(curve, a_star)], "o", color=line.get_color())
    ax.axhline(comparison["threshold"], color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("symlog", linthresh=0.01, linscale=1.0)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ticks = [0, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel(r"relative tolerance $\alpha$")
    ax.set_ylabel(r"Win-and-Tie rate $C_\alpha$")
    ax.set_title(f"Win-and-Tie rate against {comparison['teacher']}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _value_at(curve: Mapping[str, Sequence[float]], alpha: float) -> float:
    value = curve["values"][0]
    for a, v in zip(curve["alphas"], curve["values"]):
        if a <= alpha + 1e-12:
            value = v
    return value
