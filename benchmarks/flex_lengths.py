"""Compiled FlexAttention (SWA + sinks) over many sequence lengths: one compilation per length, or one for all?

Evaluation (lm-eval pads each batch to its longest request) and generation with varied prompts call the SWA branch
at many lengths. With ``torch.compile(flex_attention, dynamic=False)`` every new length compiles again, and after
dynamo's recompile limit (8) the call runs eagerly, which materializes the T x T scores. This script times, for
each compile mode, the first call (forward + backward, compilation included) at each length of a sweep, then the
steady-state forward at every length, and checks the output against the native reference.

    python benchmarks/flex_lengths.py --out DIR     # CUDA only; writes DIR/flex_lengths.json and .md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

from xlstm_distill.kernels.flex import causal_swa_block_mask
from xlstm_distill.kernels.swa import swa_sinks_attention

NH, NKV, D, WINDOW, SINKS = 32, 8, 128, 512, 4  # Llama-3.1-8B heads, the default window and sinks
LENGTHS = [173, 301, 455, 512, 618, 777, 901, 1024, 1250, 1501, 1733, 2048, 8192, 32768]
MODES = {"static (dynamic=False)": False, "automatic (dynamic=None)": None, "dynamic (dynamic=True)": True}


def _ms(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / repeats


def point(attend, mode: str, T: int) -> dict:
    """First call (forward + backward) and steady-state forward of ``attend`` at length T."""
    q = torch.randn(1, NH, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, NKV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    mask = causal_swa_block_mask(T, WINDOW, SINKS, q.device)

    def forward() -> torch.Tensor:
        return attend(q, k, v, block_mask=mask, scale=D**-0.5, enable_gqa=True)

    row: dict = {"mode": mode, "seq_len": T}
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward().float().sum().backward()
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - start, 3)
        with torch.no_grad():
            row["fwd_ms"] = round(_ms(forward), 3)
            if T <= 2048:
                ref = swa_sinks_attention(q, k, v, torch.zeros(1, T, dtype=torch.long, device="cuda"), WINDOW, SINKS,
                                          D**-0.5)
                row["max_abs_err"] = float((forward().float() - ref.float()).abs().max())
        row["status"] = "ok"
    except torch.OutOfMemoryError:
        row["status"] = "oom"
    return row


def sweep(mode: str, dynamic: bool | None) -> list[dict]:
    torch._dynamo.reset()
    attend = torch.compile(flex_attention, dynamic=dynamic)
    rows = []
    for T in LENGTHS:
        rows.append(point(attend, mode, T))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for mode, dynamic in MODES.items() for row in sweep(mode, dynamic)]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "recompile_limit": torch._dynamo.config.recompile_limit, "command": "python benchmarks/flex_lengths.py"}
    (out / "flex_lengths.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [(f"{meta['command']} on {meta['device']}, torch {meta['torch']}; first call = forward + backward "
              "(compilation included); fwd = steady-state forward"), "",
             "| mode | seq_len | status | first call s | fwd ms | max abs err vs native |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['seq_len']} | {r['status']} | {r.get('first_call_s', '')} | {r.get('fwd_ms', '')} "
              f"| {r.get('max_abs_err', '')} |" for r in rows]
    (out / "flex_lengths.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
