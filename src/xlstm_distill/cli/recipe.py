"""The stages of a recipe: ``xlstm-distill run | align | targets | distill | experts | report RECIPE.yaml``."""

from __future__ import annotations

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
