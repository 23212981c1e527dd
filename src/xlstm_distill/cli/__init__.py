"""Command line: ``xlstm-distill COMMAND``. One module per command group:

    model.py      convert, generate
    recipe.py     run, align, targets, distill, experts, report, select-heads (a recipe's stages)
    data.py       data offline
    evaluate.py   evaluate, merge
    bench.py      bench
    bundle.py     bundle (an offline installation for a node without internet)
"""

from __future__ import annotations

import typer

from xlstm_distill.cli import bench, bundle, data, evaluate, model, recipe

app = typer.Typer(help="Distill Transformer LLMs into hybrid xLSTM (mLSTM + sliding-window attention) students.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
for group in (model, recipe, evaluate, bench, bundle):
    group.register(app)
app.add_typer(data.app, name="data", help="Training data: build the offline domain corpora.")

__all__ = ["app"]
