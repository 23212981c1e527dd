"""CPU benchmark of the native kernels and of the student vs the teacher.

    python benchmarks/cpu_native.py [--out benchmarks/results/cpu-native] [--max-len 8192]

1. One mixer layer with SmolLM2 shapes (9 heads x 64): tokens/s of the chunkwise mLSTM vs the parallel
   (quadratic) form at S = 512..8192; chunkwise must scale linearly.
2. Full forward of the SmolLM2-135M teacher vs its mlstm_swa student at S = 512..4096 (batch 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import xlstm_distill as xd
from xlstm_distill.benchmarks.report import time_call, write_results
from xlstm_distill.kernels import mlstm_chunkwise, mlstm_parallel

PARALLEL_MAX_BYTES = 6e9  # the quadratic form is skipped where its (S, S) matrices would not fit


def kernel_rows(max_len: int) -> list[dict]:
    rows = []
    B, NH, D = 1, 9, 64
    S = 512
    while S <= max_len:
        q, k, v = (torch.randn(B, NH, S, D) for _ in range(3))
        q, k = q.softmax(-1), k.softmax(-1)
        i, lf = torch.randn(B, NH, S), torch.nn.functional.logsigmoid(torch.randn(B, NH, S) + 4)
        with torch.no_grad():
            t_chunk = time_call(lambda: mlstm_chunkwise(q, k, v, i, lf, chunk_size=64))
            fits = 4 * B * NH * S * S * 4 < PARALLEL_MAX_BYTES
            t_par = time_call(lambda: mlstm_parallel(q, k, v, i, lf)) if fits else None
        rows.append({"S": S, "chunkwise_tok_s": S / t_chunk, "parallel_tok_s": S / t_par if t_par else None,
                     "chunkwise_ms": 1e3 * t_chunk, "parallel_ms": 1e3 * t_par if t_par else None})
        print(rows[-1], file=sys.stderr)
        S *= 2
    return rows


def model_rows(max_len: int) -> list[dict]:
    teacher, tokenizer = xd.load_teacher("smollm2-135m")
    student = xd.convert(teacher, xd.HybridConfig())
    rows = []
    S = 512
    while S <= max_len:
        ids = torch.randint(0, tokenizer.vocab_size, (1, S))
        with torch.no_grad():
            t_teacher = time_call(lambda: teacher(ids, logits_to_keep=1), repeats=2)
            t_student = time_call(lambda: student(ids, logits_to_keep=1), repeats=2)
        rows.append({"S": S, "teacher_tok_s": S / t_teacher, "student_tok_s": S / t_student,
                     "teacher_s": t_teacher, "student_s": t_student})
        print(rows[-1], file=sys.stderr)
        S *= 2
    return rows


def plot_pairs(keys: tuple[str, str], ylabel: str):
    def plot(rows: list[dict], path: Path) -> None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key in keys:
            pts = [(r["S"], r[key]) for r in rows if r.get(key)]
            ax.plot(*zip(*pts), marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return plot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-native"))
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    write_results(args.out, "mlstm_kernels", kernel_rows(args.max_len), command,
                  ["S", "chunkwise_tok_s", "parallel_tok_s", "chunkwise_ms", "parallel_ms"],
                  plot_pairs(("chunkwise_tok_s", "parallel_tok_s"), "tokens/s (one layer, 9 heads x 64)"))
    write_results(args.out, "smollm2_forward", model_rows(args.max_model_len), command,
                  ["S", "teacher_tok_s", "student_tok_s", "teacher_s", "student_s"],
                  plot_pairs(("teacher_tok_s", "student_tok_s"), "tokens/s (SmolLM2-135M forward, batch 1)"))


if __name__ == "__main__":
    main()
