"""Interleaved sliding-window layers: ``convert_layers: global`` against ``all``. From one recipe (its teacher, held-out
data and student settings), the converted student under each policy is measured: held-out KL(teacher || student) all /
inside / beyond the window's reach, and its new parameters.

    python benchmarks/convert_layers.py --recipe recipes/demo-gemma3-cpu.yaml --out DIR [--set KEY=VALUE ...]

DIR gets convert_layers.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import xlstm_distill as xd
from xlstm_distill.modeling.configuration import CONVERT_LAYERS
from xlstm_distill.stages import Recipe, RunContext
from xlstm_distill.stages.common import autocast, compare_to_teacher


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], help="recipe override, as `xlstm-distill run --set`")
    args = parser.parse_args()
    ctx = RunContext(Recipe.load(args.recipe, args.set))
    batches = ctx.held_out_batches()
    rows = {}
    for policy in CONVERT_LAYERS:
        student = xd.convert(ctx.teacher, xd.HybridConfig(**{**ctx.recipe.student, "convert_layers": policy}))
        params = dict(student.named_parameters())
        with autocast(ctx.device, ctx.autocast):
            rows[policy] = compare_to_teacher(student.to(ctx.device).eval(), ctx.teacher, batches)
        rows[policy]["new_parameters"] = sum(params[name].numel() for name in student.new_parameter_names())
        print(policy, json.dumps(rows[policy]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    (args.out / "convert_layers.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
