"""Compiled FlexAttention (SWA + sinks) over many sequence lengths: one compilation per length, or one for all?

Evaluation (lm-eval pads each batch to its longest request) and generation with varied prompts call the SWA branch
at many lengths. With ``torch.compile(flex_attention, dynamic=False)`` every new length compiles again, and after
dynamo's recompile limit the call runs eagerly, which materializes the T x T scores. Each length is two compiled
variants here (forward + backward with gradients, then the forward without), so a limit of 8 lasts four lengths.

For each mode the script times, at each length of a sweep, the first call (forward + backward, compilation included)
and the steady-state forward, and checks the output against the native reference. Modes: the three
``torch.compile`` settings of ``flex_attention`` itself, and ``package``: ``swa_sinks_flex`` as shipped.

    python benchmarks/flex_lengths.py --out DIR     # CUDA only; writes DIR/flex_lengths.json, .md and .png
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

from xlstm_distill.benchmarks.report import time_call, write_results
from xlstm_distill.kernels.swa_flex import causal_swa_block_mask, swa_sinks_flex
from xlstm_distill.kernels.swa_native import swa_sinks_attention

NH, NKV, D, WINDOW, SINKS = 32, 8, 128, 512, 4  # Llama-3.1-8B heads, the default window and sinks
LENGTHS = [173, 301, 455, 512, 618, 777, 901, 1024, 1250, 1501, 1733, 2048, 8192, 32768]
MODES = {"static (dynamic=False)": False, "automatic (dynamic=None)": None, "dynamic (dynamic=True)": True,
         "package (swa_sinks_flex)": "package"}


def point(attend, mode: str, T: int) -> dict:
    """First call (forward + backward) and steady-state forward of ``attend`` at length T."""
    q = torch.randn(1, NH, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, NKV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    mask = causal_swa_block_mask(T, WINDOW, SINKS, q.device)

    def forward() -> torch.Tensor:
        return attend(q, k, v, mask, scale=D**-0.5)

    row: dict = {"mode": mode, "seq_len": T}
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward().float().sum().backward()
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - start, 3)
        with torch.no_grad():
            row["fwd_ms"] = round(1e3 * time_call(forward, repeats=5), 3)
            if T <= 2048:
                ref = swa_sinks_attention(q, k, v, torch.zeros(1, T, dtype=torch.long, device="cuda"), WINDOW, SINKS,
                                          D**-0.5)
                row["max_abs_err"] = float((forward().float() - ref.float()).abs().max())
        row["status"] = "ok"
    except torch.OutOfMemoryError:
        row["status"] = "oom"
    return row


def sweep(mode: str, dynamic: bool | str | None) -> list[dict]:
    torch._dynamo.reset()
    if dynamic == "package":
        attend = swa_sinks_flex
    else:  # the sinks in place: one FlexAttention call
        compiled = torch.compile(flex_attention, dynamic=dynamic)

        def attend(q, k, v, mask, scale):
            return compiled(q, k, v, block_mask=mask.block_mask, scale=scale, enable_gqa=True)
    rows = []
    for T in LENGTHS:
        rows.append(point(attend, mode, T))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for ax, key in zip(axes, ("first_call_s", "fwd_ms")):
            pts = [(r["seq_len"], r[key]) for r in rows if r["mode"] == mode and key in r]
            ax.plot(*zip(*pts), "-o", label=mode, markersize=4)
    for ax, label in zip(axes, ("first call at a new length, s (compilation included)", "steady-state forward, ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("compiled FlexAttention (SWA + sinks) over many lengths in one process; missing points: out of memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    rows = [row for mode, dynamic in MODES.items() for row in sweep(mode, dynamic)]
    command = "python benchmarks/flex_lengths.py " + shlex.join(sys.argv[1:])
    write_results(out, "flex_lengths", rows, command,
                  ["mode", "seq_len", "status", "first_call_s", "fwd_ms", "max_abs_err"], plot)
    print((out / "flex_lengths.md").read_text())


if __name__ == "__main__":
    main()
