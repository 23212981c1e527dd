"""The pipeline of one recipe: the stages in order, each skipped when its output is complete, so that running a
recipe again after an interruption continues where it stopped (training stages resume from their checkpoints).

    convert -> align (Stage I) -> targets -> distill (Stage II) -> experts (Stage III) -> report -> benchmarks
"""

from __future__ import annotations

from pathlib import Path

from xlstm_distill.stages import align, benchmarks, convert, distill, experts, report, targets
from xlstm_distill.stages.context import RunContext
from xlstm_distill.stages.recipe import Recipe


class Pipeline:
    """Runs the stages of ``recipe``; the stages share one :class:`RunContext` (the teacher is loaded once)."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.ctx = RunContext(recipe)

    def convert(self) -> Path:
        return convert.run(self.ctx)

    def align(self) -> Path:
        return align.run(self.ctx)

    def targets(self) -> Path | None:
        return targets.run(self.ctx)

    def distill(self) -> Path:
        return distill.run(self.ctx)

    def experts(self) -> Path | None:
        return experts.run(self.ctx)

    def report(self) -> dict[str, dict[str, float]]:
        return report.run(self.ctx)

    def benchmarks(self) -> Path | None:
        return benchmarks.run(self.ctx)

    def run(self) -> None:
        """Every stage the recipe has a section for, then the report and the benchmarks."""
        if self.ctx.dist.world_size > 1:
            raise ValueError("`run` chains all stages on one device; under torchrun launch `distill` alone.")
        self.align()
        if self.recipe.distill is not None:
            self.distill()
        self.experts()
        self.report()
        self.benchmarks()
