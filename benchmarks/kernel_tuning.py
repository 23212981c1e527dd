"""Launch settings of the mixer's two kernels on this GPU, as kernel options: the TFLA mLSTM (``tfla_min_chunk``,
``tfla_kernel_params``: mlstm_kernels' block sizes, warps, stages, chunk sizes) and FlexAttention
(``flex_kernel_params``: block sizes, warps and stages of its forward and backward). Llama-3.1-8B heads (32 query /
8 key-value heads of 128), window 512, 4 sinks, bf16, batch 1. Each setting is checked against the default one
(relative difference of the output and the gradients).

    python benchmarks/kernel_tuning.py --out DIR [--lengths 8192,32768] [--parts tfla,flex]   # CUDA
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

from mixer_parts import D, SINKS, WINDOW, flex_inputs, outputs_and_grads, plot, rel_diff, tfla_inputs, timings
from xlstm_distill import kernels
from xlstm_distill.benchmarks.report import write_results
from xlstm_distill.kernels import KernelOptions
from xlstm_distill.kernels.compiling import many_variants

TFLA_SETTINGS = {  # name: (tfla_min_chunk, tfla_kernel_params)
    "default (chunk 128)": (128, {}),
    "chunk 256": (256, {}),
    "chunk 256, inter 256": (256, dict(chunk_size_inter=256, chunk_size_intra=256, siz_b_L_parallel=64,
                                       siz_b_L_loop=64)),
    "chunk 128, L blocks 128/64": (128, dict(chunk_size_inter=128, chunk_size_intra=128, siz_b_L_parallel=128,
                                             siz_b_L_loop=64)),
    "chunk 128, L blocks 64/128": (128, dict(chunk_size_inter=128, chunk_size_intra=128, siz_b_L_parallel=64,
                                             siz_b_L_loop=128)),
    "DH parallel 64": (128, dict(siz_b_DH_parallel=64)),
    "DH parallel 256": (128, dict(siz_b_DH_parallel=256)),
    "DH loop 128": (128, dict(siz_b_DH_loop=128)),
    "DH loop 32": (128, dict(siz_b_DH_loop=32)),
    "intra warps 8": (128, dict(num_warps_intra=8)),
    "intra stages 2": (128, dict(num_stages_intra=2)),
    "intra stages 3": (128, dict(num_stages_intra=3)),
    "inter warps 8": (128, dict(num_warps_inter=8)),
    "inter stages 2": (128, dict(num_stages_inter=2)),
}

FLEX_SETTINGS = {  # name: kernel options (fwd_* / bwd_*: that pass only)
    "default": {},
    "fwd 128x64 w8 s3": dict(fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_warps=8, fwd_num_stages=3),
    "fwd 128x128 w8 s2": dict(fwd_BLOCK_M=128, fwd_BLOCK_N=128, fwd_num_warps=8, fwd_num_stages=2),
    "fwd 64x64 w4 s3": dict(fwd_BLOCK_M=64, fwd_BLOCK_N=64, fwd_num_warps=4, fwd_num_stages=3),
    "fwd 64x128 w4 s3": dict(fwd_BLOCK_M=64, fwd_BLOCK_N=128, fwd_num_warps=4, fwd_num_stages=3),
    "bwd 64/128/128/64 w8 s3": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64,
                                    bwd_num_warps=8, bwd_num_stages=3),
    "bwd 32/128/128/32 w4 s3": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=32,
                                    bwd_num_warps=4, bwd_num_stages=3),
    "bwd 64/64/64/64 w4 s3": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64,
                                  bwd_num_warps=4, bwd_num_stages=3),
    "bwd 64/128/128/64 w8 s2": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64,
                                    bwd_num_warps=8, bwd_num_stages=2),
}


def tfla_rows(T: int) -> list[dict]:
    inputs, rows, reference = tfla_inputs(T), [], None
    for name, (chunk, params) in TFLA_SETTINGS.items():
        options = KernelOptions(mlstm="tfla", tfla_min_chunk=chunk, tfla_kernel_params=params)
        rows.append({"seq_len": T, "part": "TFLA (exact gradient)", "variant": name})
        reference = measure(rows[-1], lambda *x, o=options: kernels.mlstm(*x, chunk_size=64, options=o)[0], inputs,
                            reference)
    return rows


def flex_rows(T: int) -> list[dict]:
    inputs, rows, reference = flex_inputs(T), [], None
    starts = torch.zeros(1, T, dtype=torch.long, device="cuda")
    for name, params in FLEX_SETTINGS.items():
        options = KernelOptions(swa="flex", flex_kernel_params=params)
        fn = functools.partial(kernels.swa, doc_start=starts, window=WINDOW, num_sinks=SINKS, scale=D**-0.5,
                               single_document=True, memo={}, options=options)
        rows.append({"seq_len": T, "part": "FlexAttention (copied sinks)", "variant": name})
        reference = measure(rows[-1], fn, inputs, reference)
    return rows


def measure(row: dict, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
            reference: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Times one setting into ``row`` and compares its output and gradients with ``reference`` (the first setting's,
    returned); a setting that fails (an invalid launch) is recorded in the row and the sweep goes on."""
    try:
        with many_variants():  # every setting is one more compiled variant
            row.update(timings(fn, inputs))
            outputs = outputs_and_grads(fn, inputs)
        reference = reference or outputs
        row["rel_diff_out_grads"] = [round(rel_diff(a, b), 5) for a, b in zip(outputs, reference)]
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        traceback.print_exc()
    print(row, flush=True)
    return reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--parts", default="tfla,flex")
    args = parser.parse_args()
    parts = {"tfla": tfla_rows, "flex": flex_rows}
    command = "python benchmarks/kernel_tuning.py " + shlex.join(sys.argv[1:])
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        for part in args.parts.split(","):
            torch._dynamo.reset()
            rows += parts[part](T)
            torch.cuda.empty_cache()
            write_results(args.out, "kernel_tuning", rows, command,  # after each part: a cut run keeps its rows
                          ["seq_len", "part", "variant", "fwd_ms", "fwd_bwd_ms", "rel_diff_out_grads", "error"],
                          lambda rows, path: plot([r for r in rows if "error" not in r], path))
    print((args.out / "kernel_tuning.md").read_text())


if __name__ == "__main__":
    main()
