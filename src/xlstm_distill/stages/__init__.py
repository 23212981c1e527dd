"""The distillation pipeline: a typed recipe (``recipe.py``), one module per stage (``convert``, ``align``,
``targets``, ``distill``, ``experts``, ``report``, ``benchmarks``, each with a ``run(ctx)`` entry), the context they
share (``context.py``), the training loop (``trainer.py``) and the pipeline that orders them (``pipeline.py``)."""

from xlstm_distill.stages.context import RunContext
from xlstm_distill.stages.pipeline import Pipeline
from xlstm_distill.stages.recipe import Recipe, recipe_reference
from xlstm_distill.stages.trainer import TrainConfig, Trainer

__all__ = ["Pipeline", "Recipe", "RunContext", "TrainConfig", "Trainer", "recipe_reference"]
