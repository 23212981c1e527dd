"""Stage III's per-domain report: on each expert domain's held-out documents (the report's held-out split of that
domain's data weights), KL(teacher || model) and perplexity of every expert, the merged model, the generalist (the
recipe's Stage II student, trained on the mixture) and the teacher; each merged model - generalist per domain, paired
over the same held-out sequences, with its standard error. Files: ``report/domains.json``, ``.md``, ``.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from xlstm_distill.merging.merge import MERGE_INFO
from xlstm_distill.metrics import paired_kl_difference
from xlstm_distill.stages.common import autocast, compare_to_teacher
from xlstm_distill.stages.context import RunContext

GENERALIST = "generalist (after Stage II)"


def models(ctx: RunContext) -> dict[str, Path]:
    """The Stage III models that exist, by label: each expert, the merged one (labelled by how its weights were
    chosen), the uniform merge written beside chosen weights, the generalist."""
    cfg = ctx.recipe.experts
    found = {f"expert {name}": ctx.for_expert(name, weights).stage2_dir for name, weights in cfg.domains.items()}
    found[f"merged ({merge_kind(ctx.merged_dir)})"] = ctx.merged_dir
    found.setdefault("merged (uniform)", ctx.uniform_merged_dir)
    found[GENERALIST] = ctx.stage2_dir
    return {label: path for label, path in found.items() if (path / "config.json").exists()}


def merge_kind(folder: Path) -> str:
    """``swept``, ``uniform`` or ``given weights``, from the merged folder's ``merge_info.json``."""
    path = folder / MERGE_INFO
    if not path.exists():
        return "experts"
    info = json.loads(path.read_text())
    if "sweep" in info:
        return "swept"
    weights = info.get("normalized_weights") or []
    return "uniform" if len(set(round(w, 9) for w in weights)) <= 1 else "given weights"


def run(ctx: RunContext) -> dict[str, Any] | None:
    """Measures every model on every domain, prints the table, writes ``report/domains.*``; None without experts or
    without any expert / merged model yet."""
    cfg = ctx.recipe.experts
    if cfg is None:
        return None
    found = models(ctx)
    if not any(label != GENERALIST for label in found):
        Console().print("No Stage III expert or merged model yet: the per-domain report needs `xlstm-distill run` "
                        "(or `experts`) first.")
        return None
    batches = {name: ctx.for_expert(name, weights).held_out_batches() for name, weights in cfg.domains.items()}
    rows: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in cfg.domains}  # domain -> model -> metrics
    for label, path in found.items():
        student = ctx.load_student(path).eval()
        for domain, domain_batches in batches.items():
            with autocast(ctx.device, ctx.autocast):
                rows[domain][label] = compare_to_teacher(student, ctx.teacher, domain_batches)
        del student
    result = {"teacher": ctx.recipe.teacher, "models": {label: str(path) for label, path in found.items()},
              "domains": {domain: {"data_weights": cfg.domains[domain], "rows": by_model,
                                   "merged - generalist": merged_vs_generalist(by_model)}
                          for domain, by_model in rows.items()}}
    out = ctx.report_dir
    out.mkdir(exist_ok=True)
    (out / "domains.json").write_text(json.dumps(result, indent=2))
    markdown = table(ctx.recipe.name, result)
    (out / "domains.md").write_text(markdown)
    plot(result, out / "domains.png")
    Console().print(markdown, markup=False, highlight=False)
    return result


def merged_vs_generalist(by_model: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Merged model label -> its KL minus the generalist's on one domain, paired over the held-out sequences."""
    if GENERALIST not in by_model:
        return {}
    generalist = by_model[GENERALIST]["per_sequence"]["kl"]
    return {label: paired_kl_difference(rows["per_sequence"]["kl"], generalist)
            for label, rows in by_model.items() if label.startswith("merged")}


def table(name: str, result: dict[str, Any]) -> str:
    """Markdown: one row per model, per domain its held-out KL(teacher || model) and perplexity; then each merged
    model - generalist per domain (± 2 standard errors)."""
    domains = result["domains"]
    labels = list(result["models"])
    first = {domain: next(iter(d["rows"].values())) for domain, d in domains.items()}
    lines = [f"# {name}: Stage III per domain (held-out documents of each domain)", "",
             "KL(teacher || model) in nats per token / perplexity; tokens per domain: "
             + ", ".join(f"{domain} {int(r['tokens'])}" for domain, r in first.items()) + ".", "",
             "| model | " + " | ".join(f"{domain} KL | {domain} ppl" for domain in domains) + " |",
             "|---|" + "---:|---:|" * len(domains),
             f"| teacher ({result['teacher']}) | "
             + " | ".join(f"0 | {r['teacher_ppl']:.2f}" for r in first.values()) + " |"]
    for label in labels:
        cells = [f"{d['rows'][label]['kl']:.4f} | {d['rows'][label]['student_ppl']:.2f}" for d in domains.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for domain, d in domains.items():
        for label, diff in d["merged - generalist"].items():
            lines.append(f"- {domain}: {label} - generalist KL {diff['difference']:+.4f} ± {2 * diff['stderr']:.4f} "
                         f"(± 2 standard errors, paired over {diff['sequences']} held-out sequences)")
    return "\n".join(lines).rstrip() + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """One panel per domain: bars of KL(teacher || model) for every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = result["domains"]
    labels = list(result["models"])
    colors = ["tab:orange" if label == "merged (uniform)" and len(labels) > 1 and any(
                  other.startswith("merged") and other != label for other in labels)
              else "tab:red" if label.startswith("merged") else "tab:gray" if label == GENERALIST else "tab:blue"
              for label in labels]
    fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains), 3.4), squeeze=False, sharey=True)
    for ax, (domain, d) in zip(axes[0], domains.items()):
        ax.bar(range(len(labels)), [d["rows"][label]["kl"] for label in labels], color=colors)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{domain} held-out")
    axes[0][0].set_ylabel("KL(teacher || model)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
