"""The stages of a recipe: ``xlstm-distill run | align | targets | distill | experts | report | select-heads
RECIPE.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from xlstm_distill.cli.common import fail

RECIPE = typer.Argument(..., exists=True, dir_okay=False, help="Experiment recipe (YAML), e.g. recipes/demo-cpu.yaml.")
OVERRIDES = typer.Option(None, "--set", help="Override a recipe value, e.g. --set distill.steps=200 or "
                         "--set student.kernels.copy_sinks=none (repeatable; docs/recipes.md lists every key).")

# command -> (Pipeline method, help)
STAGES = {
    "run": ("run", "All stages of a recipe: convert -> Stage I -> teacher targets -> Stage II -> Stage III -> report."),
    "align": ("align", "Stage I: layer-wise alignment of the student mixers to the teacher attention."),
    "targets": ("targets", "Precompute the teacher's top-k next-token targets for Stage II (sharded, checksummed)."),
    "distill": ("distill", "Stage II: end-to-end sparse knowledge distillation (runs under torchrun with FSDP2)."),
    "experts": ("experts", "Stage III: distill one expert per domain from the Stage I model, then merge them."),
    "report": ("report", "Held-out perplexity and KL to the teacher of every student the recipe produced."),
}


def _stage_command(method: str, help: str):
    def command(recipe: Path = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
        from xlstm_distill.stages import Pipeline, Recipe

        try:
            loaded = Recipe.load(recipe, overrides)
        except ValueError as err:
            raise fail(str(err)) from None
        getattr(Pipeline(loaded), method)()

    command.__doc__ = help
    return command


def register(app: typer.Typer) -> None:
    for name, (method, help) in STAGES.items():
        app.command(name=name, help=help)(_stage_command(method, help))
    app.command(name="select-heads")(select_heads)


def select_heads(
    recipe: Path = RECIPE,
    budget: float | None = typer.Option(None, help="Fraction of all KV heads that keep full attention (default: the "
                                        "recipe's select_heads.budget, else 0.05)."),
    probe: str | None = typer.Option(None, help="`needles` (facts hidden in training text), `retrieval` (a synthetic "
                                     "key-value list) or `text` (training text past the window); default: the "
                                     "recipe's, else select_heads.probe's default."),
    method: str | None = typer.Option(None, help="`single` (each head scored alone) or `greedy` (one head at a time, "
                                      "given those chosen before)."),
    samples: int | None = typer.Option(None, help="Calibration sequences."),
    length: int | None = typer.Option(None, help="Tokens per calibration sequence (default: the recipe's seq_len)."),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Choose the KV heads that keep the teacher's full attention: score every head of the converted student on a
    calibration set, keep the best BUDGET of them (written into out_dir/student-init; scores and heat map in
    out_dir/select_heads/). Options left out take the recipe's select_heads section, then its defaults
    (docs/recipes.md)."""
    from xlstm_distill.stages import Pipeline, Recipe

    given = {"budget": budget, "probe": probe, "method": method, "samples": samples, "length": length}
    settings = [f"select_heads.{key}={value}" for key, value in given.items() if value is not None]
    try:
        loaded = Recipe.load(recipe, [*(overrides or []), *settings])
        if loaded.select_heads is None:  # a recipe without the section and no option given: its defaults
            loaded = Recipe.load(recipe, [*(overrides or []), "select_heads={}"])
    except ValueError as err:
        raise fail(str(err)) from None
    path = Pipeline(loaded).convert()
    chosen = json.loads((path / "config.json").read_text())["full_attention_heads"]
    typer.echo(f"{len(chosen)} KV heads keep full attention in {path}: {chosen}\n"
               f"In a recipe: student: {{full_attention_heads: {chosen}}} (or keep the select_heads section).")
