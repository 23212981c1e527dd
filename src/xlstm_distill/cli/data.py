"""``xlstm-distill data offline``: the offline training corpora (mounted by the main CLI as ``data``)."""

from __future__ import annotations

from pathlib import Path

import typer

from xlstm_distill.cli.common import parse_sizes
from xlstm_distill.data.offline import DOMAINS, build_offline_corpora

app = typer.Typer(help="Training data: offline corpora.", no_args_is_help=True)


@app.callback()
def _data() -> None:
    """Training data utilities."""


@app.command()
def offline(
    out: Path = typer.Option(..., "--out", help="Folder for chat/code/prose/math .jsonl and manifest.json."),
    max_mb_per_domain: float = typer.Option(32.0, "--max-mb-per-domain", help="Size cap of each domain file (MB)."),
    seed: int = typer.Option(0, "--seed", help="Seed for file order and generated math problems."),
    domain: list[str] = typer.Option(list(DOMAINS), "--domain", help="Domains to build (repeatable)."),
    eval_set: list[str] = typer.Option(
        [],
        "--eval-set",
        help="Decontaminate only against eval sets whose name contains this (repeatable; default all).",
    ),
    decontaminate: bool = typer.Option(
        True, "--decontaminate/--no-decontaminate", help="Drop docs sharing a 13-gram with eval items."
    ),
    linux_doc: bool = typer.Option(
        True, "--linux-doc/--no-linux-doc", help="Add Linux kernel docs to prose if installed."
    ),
) -> None:
    """Build domain corpora from locally installed packages (no model hub needed)."""
    manifest = build_offline_corpora(
        out,
        max_bytes_per_domain=int(max_mb_per_domain * 1_000_000),
        seed=seed,
        domains=domain,
        decontaminate_against=eval_set or None,
        decontaminate_docs=decontaminate,
        linux_doc=linux_doc,
    )
    for name, info in manifest["domains"].items():
        typer.echo(
            f"{name:6s} {info['docs']:7d} docs {info['bytes'] / 1e6:8.2f} MB  "
            f"dropped {info['dropped_contaminated']:5d} contaminated  -> {out / info['file']}"
        )
    typer.echo(f"manifest: {out / 'manifest.json'}")


@app.command()
def ruler(
    out: Path = typer.Option(..., "--out", help="The RULER set's JSON file."),
    tokenizer: str = typer.Option("smollm2-135m", help="Whose tokens size the haystacks: a teacher name, .gguf, "
                                  "folder or hub id (the models scored with the set must share it)."),
    task: list[str] = typer.Option(["niah_single_1"], "--task", help="RULER tasks (repeatable): niah_single_1, "
                                   "niah_multikey_2, niah_multikey_3."),
    lengths: str = typer.Option("1k,2k,4k,8k", help="Context lengths, comma-separated."),
    samples: int = typer.Option(50, help="Samples per task and length."),
) -> None:
    """Build RULER's needle-in-a-haystack prompts with lm-evaluation-harness (offline) into one file that
    `xlstm-distill evaluate --ruler-file` and the recipes' `evaluate.ruler_file` score anywhere, lm-eval or not."""
    from xlstm_distill.evaluation.long_context import RulerTasks
    from xlstm_distill.teacher import load_tokenizer

    try:
        built = RulerTasks(load_tokenizer(tokenizer), task, parse_sizes(lengths), samples).ruler_set()
    except (ValueError, ImportError) as err:
        raise typer.BadParameter(str(err)) from None
    built.save(out)
    typer.echo(f"{len(built.requests)} prompts ({', '.join(built.names)} at {', '.join(map(str, built.lengths))} "
               f"tokens) -> {out}")
