"""The hybrid mixer's two kernels with and without session 9's change, and the whole mixer as of sessions 8-10 (issue 5).

* FlexAttention (SWA + sinks): the sinks in place or copied per query block (kernels/flex.py); outputs and gradients
  of the two compared; one document per row and packed documents (32 to 2,047 tokens), whose block mask is built
  per forward (timed too).
* TFLA (mlstm_kernels): the backward computing the chunk states again, or keeping the forward's; and, for scale,
  mlstm_kernels' own backward (normalizer held constant: not the exact gradient, no extra value column).
* The whole mixer (`HybridAttention.mix`, Llama-3.1-8B heads, window 512, 4 sinks, backend auto) as of session 8
  (both old settings), session 9 (both changes, the memory branch eager) and as shipped (session 10: the memory
  branch and the mix through torch.compile around the TFLA kernel), and causal SDPA (flash) for scale.

    python benchmarks/mixer_parts.py --out DIR     # CUDA only; writes DIR/mixer_parts.json, .md and .png
    python benchmarks/mixer_parts.py --out DIR --replot    # the plot again from DIR/mixer_parts.json
    python benchmarks/mixer_parts.py --out DIR --parts flex --lengths 8192    # some parts, some lengths
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from xlstm_distill.benchmarks.mixer import _inputs, _mix, hybrid_layer
from xlstm_distill.benchmarks.report import time_call, write_results
from xlstm_distill.kernels import flex, tfla
from xlstm_distill.modeling import HybridConfig, attention
from xlstm_distill.modeling.cache import full_layout

NH, NKV, D, WINDOW, SINKS = 32, 8, 128, 512, 4
LENGTHS = (8192, 32768)


def timings(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> dict:
    """Forward (no gradients) and forward + backward milliseconds of fn(*inputs); floating inputs get gradients."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]

    def fwd() -> None:
        with torch.no_grad():
            fn(*leaves)

    def fwd_bwd() -> None:
        fn(*leaves).float().sum().backward()
        for x in leaves:
            x.grad = None

    return {"fwd_ms": 1e3 * time_call(fwd, repeats=10, warmup=2),
            "fwd_bwd_ms": 1e3 * time_call(fwd_bwd, repeats=10, warmup=2)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def outputs_and_grads(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """fn's output and the gradients of its floating inputs under the loss sum(out^2), for comparing settings."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    out.float().pow(2).sum().backward()
    return [out.detach(), *(x.grad for x in leaves if x.grad is not None)]


def flex_inputs(T: int) -> list[torch.Tensor]:
    """q (B, NH, T, D) and k, v (B, NKV, T, D), bf16."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, NH, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, NKV, T, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in "kv")
    return [q, k, v]


def packed_starts(T: int) -> torch.Tensor:
    """(1, T) document starts of packed documents of 32 to 2,047 tokens (uniform, about 1K on average)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 2048, (T // 32,), generator=g)
    starts = torch.cumsum(lengths, 0) - lengths
    starts = starts[starts < T]
    doc = torch.zeros(T, dtype=torch.long)
    doc[starts] = 1
    return starts[doc.cumsum(0) - 1].unsqueeze(0).cuda()


def flex_rows(T: int) -> list[dict]:
    """One document per row (the cached mask, then the same through the per-forward mask of packed rows), then packed
    documents (their mask's build timed too)."""
    inputs = flex_inputs(T)
    rows = []
    doc_start = packed_starts(T)
    layouts = {"one document": None, "one document, per-forward mask": torch.zeros_like(doc_start),
               "packed documents": doc_start}
    for layout, starts in layouts.items():
        outputs = {}
        for copies in (False, True):
            variant = "copied sinks" if copies else "sinks in place"
            if starts is None:
                mask = flex.causal_swa_block_mask(T, WINDOW, SINKS, inputs[0].device, copy_sinks=copies)
            else:
                build = functools.partial(flex.swa_block_mask, starts, WINDOW, SINKS, copies)
                mask = build()
                rows.append({"seq_len": T, "part": "FlexAttention block mask",
                             "variant": f"{layout}, {variant} (once per forward)",
                             "fwd_ms": 1e3 * time_call(build, repeats=10, warmup=2)})
            attend = functools.partial(flex.swa_sinks_flex, mask=mask, scale=D**-0.5)
            rows.append({"seq_len": T, "part": "FlexAttention",
                         "variant": variant if layout == "one document" else f"{layout}, {variant}",
                         **timings(attend, inputs)})
            outputs[copies] = outputs_and_grads(attend, inputs)
        rows[-1]["rel_diff_out_dq_dk_dv"] = [round(_rel(a, b), 5) for a, b in zip(outputs[True], outputs[False])]
    return rows


def tfla_inputs(T: int) -> list[torch.Tensor]:
    """Feature-mapped q, k (B, NH, T, D), v (bf16) and the input and forget gate pre-activations (B, NH, T)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    fq, fk = (torch.softmax(torch.randn(1, NH, T, D, device="cuda", generator=g), -1).bfloat16() for _ in "qk")
    v = torch.randn(1, NH, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    i = torch.randn(1, NH, T, device="cuda", generator=g)
    f = torch.randn(1, NH, T, device="cuda", generator=g) + 3.0
    return [fq, fk, v, i, f]


def tfla_rows(T: int) -> list[dict]:
    inputs = tfla_inputs(T)
    rows, shipped = [], tfla.KEEP_CHUNK_STATES
    for keep, exact in ((False, True), (True, True), (True, False)):
        tfla.KEEP_CHUNK_STATES = keep
        variant = "keep chunk states" if keep else "recompute chunk states"
        part = "TFLA (exact gradient)" if exact else "TFLA (normalizer held constant)"  # mlstm_kernels' own backward
        rows.append({"seq_len": T, "part": part, "variant": variant,
                     **timings(lambda *x: tfla.mlstm_tfla(*x, chunk_size=128, exact_backward=exact)[0], inputs)})
    tfla.KEEP_CHUNK_STATES = shipped
    return rows


@contextlib.contextmanager
def package_as_of(session: int):
    """The package's settings before a change: session 8 (sinks in place, TFLA recomputing its chunk states, the
    memory branch eager), session 9 (memory branch eager), 10 (as shipped: the memory branch compiled)."""
    package_mask = flex.causal_swa_block_mask

    def in_place(seq_len: int, window: int, num_sinks: int, device: torch.device, copy_sinks: bool = False):
        return package_mask(seq_len, window, num_sinks, device, False)

    if session < 9:
        flex.causal_swa_block_mask, tfla.KEEP_CHUNK_STATES = in_place, False
    attention.COMPILE_MEMORY = session >= 10
    try:
        yield
    finally:
        flex.causal_swa_block_mask, tfla.KEEP_CHUNK_STATES, attention.COMPILE_MEMORY = package_mask, True, True


def layer_rows(T: int) -> list[dict]:
    student = HybridConfig(mixer="mlstm_swa", window_size=WINDOW, num_sink_tokens=SINKS, backend="auto")
    layer = hybrid_layer(NH, NKV, D, student, torch.device("cuda"), torch.bfloat16)
    inputs = _inputs(layer, 1, T, torch.device("cuda"), torch.bfloat16)
    layout = full_layout(1, T, torch.device("cuda"))
    rows = []
    for name, session in (("session 8: sinks in place, recompute, eager", 8), ("session 9: copied sinks, keep states", 9),
                          ("session 10: + compiled memory branch", 10)):
        with package_as_of(session):
            rows.append({"seq_len": T, "part": "whole mixer", "variant": name,
                         **timings(lambda *x: _mix(layer, layout, *x), inputs)})
    sdpa = functools.partial(F.scaled_dot_product_attention, is_causal=True, enable_gqa=True)
    rows.append({"seq_len": T, "part": "causal SDPA", "variant": "flash", **timings(sdpa, inputs[:3])})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Forward + backward milliseconds of each part, before (first variant) and after, one panel per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["seq_len"] for r in rows})
    bars = max(sum(r["seq_len"] == T for r in rows) for T in lengths)
    fig, axes = plt.subplots(1, len(lengths), figsize=(9 * len(lengths), max(4, 0.45 * bars)), squeeze=False)
    axes = axes[0]
    for ax, T in zip(axes, lengths):
        here = [r for r in rows if r["seq_len"] == T]
        labels = [f"{r['part']}\n{r['variant']}" for r in here]
        ax.barh(labels, [r.get("fwd_bwd_ms", 0) for r in here], color="tab:blue", label="forward + backward")
        ax.barh(labels, [r["fwd_ms"] for r in here], color="tab:orange", label="forward")
        ax.invert_yaxis()
        ax.set_xlabel("ms (one layer, 32 heads x 128, bf16, batch 1)")
        ax.set_title(f"{T:,} tokens")
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--replot", action="store_true", help="only draw DIR/mixer_parts.png from its JSON")
    parser.add_argument("--parts", default="flex,tfla,layer", help="which of flex, tfla, layer to time")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="sequence lengths, comma-separated")
    args = parser.parse_args()
    parts = {"flex": flex_rows, "tfla": tfla_rows, "layer": layer_rows}
    chosen = [parts[name] for name in args.parts.split(",")]
    out = args.out
    if args.replot:
        plot(json.loads((out / "mixer_parts.json").read_text())["rows"], out / "mixer_parts.png")
        return
    rows = []
    for T in map(int, args.lengths.split(",")):
        torch._dynamo.reset()  # static kernels at each length, as the mixer benchmark
        for part in chosen:
            new = part(T)
            rows += new
            print(*new, sep="\n", flush=True)
        torch.cuda.empty_cache()
    command = "python benchmarks/mixer_parts.py " + shlex.join(sys.argv[1:])
    write_results(out, "mixer_parts", rows, command,
                  ["seq_len", "part", "variant", "fwd_ms", "fwd_bwd_ms", "rel_diff_out_dq_dk_dv"])
    print((out / "mixer_parts.md").read_text())


if __name__ == "__main__":
    main()
