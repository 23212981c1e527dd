"""Compile the Triton mLSTM's kernels for a GPU architecture without a GPU, as ``kernels/mlstm_triton.py``
launches them (chunk, blocks, warps), and print what ptxas reports: registers, spills, shared memory (flagged above
the 227 KB an H100 / H200 block can have). A check that the kernels compile, and a first guide for launch settings.

    python benchmarks/mlstm_triton_compile.py                          # bf16 and float32, heads of 64 and 128
    python benchmarks/mlstm_triton_compile.py --configs bf16,64,128,128 --arch 90
    (each config: dtype, chunk_size, DHQK, DHV)
    python benchmarks/mlstm_triton_compile.py --ones    # NH, S, NC = 1: Triton makes integer arguments of 1 constants
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from xlstm_distill.kernels import mlstm_triton as mt
from xlstm_distill.kernels import mlstm_triton_bw as bw
from xlstm_distill.kernels import mlstm_triton_fw as fw

MAX_SHARED = 232_448  # bytes per block on sm_90
CONFIGS = ("bf16,64,128,128", "fp32,64,128,128", "bf16,64,64,64", "fp32,64,64,64")


ONES = False  # --ones: the integer arguments as Triton compiles them when they are 1 (constants)


def build(fn, pointers: dict[str, str], constants: dict, warps: int, arch: int) -> str:
    """One kernel compiled to PTX, then ptxas -v: a line of its resource use."""
    if ONES:
        constants = {**constants, **{name: 1 for name in fn.arg_names if name in ("NH", "S", "NC", "BH", "T")}}
    signature = {name: "constexpr" if name in constants else pointers.get(name, "*fp32" if name.endswith("_ptr")
                                                                             else "i32") for name in fn.arg_names}
    kernel = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as file:
            file.write(kernel.asm["ptx"])
        report = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", ptx, "-o", os.path.join(folder, "kernel.cubin")],
                                capture_output=True, text=True).stderr
    usage = " ".join(line.split(":", 1)[-1].strip() for line in report.splitlines()
                     if "Used" in line or "spill stores" in line)
    shared = kernel.metadata.shared
    flag = "" if shared <= MAX_SHARED else "  TOO MUCH SHARED MEMORY"
    return f"  {fn.__name__:26s} warps={warps} shared={shared}{flag} | {usage}"


def check(dtype: str, chunk_size: int, DK: int, DV: int, arch: int) -> None:
    pointer, dot = {"bf16": ("*bf16", tl.bfloat16), "fp32": ("*fp32", tl.float32)}[dtype]
    L = mt.chunk_length(chunk_size)
    BDK, BDV = mt._pow2(DK), mt._pow2(DV)
    BK, BV = min(mt.BLOCK, BDK), min(mt.BLOCK, BDV)
    BV_chunk = min(mt.BLOCK if dtype == "bf16" else mt.BLOCK // 2, BDV)  # as mlstm_triton's backward
    common = dict(DK=DK, DV=DV, L=L, ACC=tl.float32, DOT=dot)
    print(f"{dtype}, chunk {L}, DHQK {DK}, DHV {DV}, sm_{arch}", flush=True)
    lines = [
        build(fw.chunk_states_kernel, dict(k_ptr=pointer, v_ptr=pointer, seg_ptr="*i32", src_states_ptr="*i32"),
              dict(common, BK=BK, BV=BV), mt._warps(BK, BV), arch),
        build(fw.chunk_output_kernel, dict(q_ptr=pointer, k_ptr=pointer, v_ptr=pointer, h_ptr=pointer, seg_ptr="*i32",
                                           src_states_ptr="*i32", src_ptr="*i32"),
              dict(common, BDK=BDK, BV=BV, EPS=1e-6, MAX_NEG_M=80.0), mt._warps(L, max(BDK, BV)), arch),
        build(bw.chunk_state_grads_kernel, dict(q_ptr=pointer, dh_ptr=pointer, seg_ptr="*i32"),
              dict(common, BK=BK, BV=BV), mt._warps(BK, BV), arch),
        build(bw.token_grads_kernel, dict(dh_ptr=pointer, h_ptr=pointer),
              dict(DV=DV, BT=max(16, 4096 // BDV), BDV=BDV, ACC=tl.float32, EPS=1e-6, MAX_NEG_M=80.0), 4, arch),
        build(bw.chunk_grads_kernel, dict(q_ptr=pointer, k_ptr=pointer, v_ptr=pointer, dh_ptr=pointer, seg_ptr="*i32"),
              dict(common, BDK=BDK, BV=BV_chunk), mt._warps(L, BDK), arch),
    ]
    print(*lines, sep="\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=" ".join(CONFIGS), help="space-separated dtype,chunk_size,DHQK,DHV")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100 / H200)")
    parser.add_argument("--ones", action="store_true", help="NH, S and the number of chunks 1 (compiled as constants)")
    args = parser.parse_args()
    global ONES
    ONES = args.ones
    for config in args.configs.split():
        dtype, chunk_size, DK, DV = config.split(",")
        check(dtype, int(chunk_size), int(DK), int(DV), args.arch)


if __name__ == "__main__":
    main()
