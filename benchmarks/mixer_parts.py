"""Where the hybrid mixer's time goes on a GPU, part by part, under the kernel options that change it.

* FlexAttention (SWA + sinks): the sinks in place or copied per query block (``copy_sinks``); outputs and gradients
  of the two compared; one document per row and packed documents (32 to 2,047 tokens), whose block mask is built
  per forward (timed too).
* TFLA (mlstm_kernels): the backward computing the chunk states again, or keeping the forward's
  (``keep_chunk_states``); and, for scale, mlstm_kernels' own backward (``exact_gradient=False``: the normalizer
  held constant, no extra value column).
* The mLSTM kernels alone (``--parts mlstm``): our Triton kernels (``kernels.mlstm='triton'``, exact gradient, chunks
  of 64) against TFLA with the exact gradient (extra value column) and with mlstm_kernels' own backward
  (normalizer held constant); outputs and gradients compared with TFLA's exact ones.
* The whole mixer (`HybridAttention.mix`, Llama-3.1-8B heads, window 512, 4 sinks) with those switches off, on, and
  with the memory branch compiled (``compile_memory``: the defaults), the defaults with the mLSTM on our Triton kernels
  (``kernels.mlstm='triton'``), and causal SDPA (flash) for scale.
* ``--parts fused``: the whole mixer's forward without gradients (prefill) on today's path (the defaults) against the
  fused Triton forward (``kernels.mixer: triton``), one document per row and packed documents, with the relative
  difference of their outputs.

    python benchmarks/mixer_parts.py --out DIR     # CUDA only; writes DIR/mixer_parts.json, .md and .png
    python benchmarks/mixer_parts.py --out DIR --replot    # the plot again from DIR/mixer_parts.json
    python benchmarks/mixer_parts.py --out DIR --parts flex --lengths 8192    # some parts, some lengths
    python benchmarks/mixer_parts.py --out DIR --parts mlstm,layer    # Triton mLSTM vs TFLA, kernel and whole mixer
    python benchmarks/mixer_parts.py --out DIR --parts fused    # the fused prefill forward against today's
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from xlstm_distill import kernels
from xlstm_distill.benchmarks.mixer import hybrid_layer, mix_once, mixer_inputs
from xlstm_distill.benchmarks.report import time_call, write_results
from xlstm_distill.kernels import KernelOptions
from xlstm_distill.kernels.swa_flex import swa_block_mask
from xlstm_distill.modeling import HybridConfig
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


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
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
    """SWA + sinks through FlexAttention with the sinks in place or copied per query block: one document per row
    (the mask cached per length), the same rows through the per-forward mask of packed rows, and packed documents
    (whose mask is built per forward: timed too). Outputs and gradients of the two placements compared."""
    inputs = flex_inputs(T)
    rows = []
    doc_start = packed_starts(T)
    layouts = {"one document": (torch.zeros_like(doc_start), True),
               "one document, per-forward mask": (torch.zeros_like(doc_start), False),
               "packed documents": (doc_start, False)}
    for layout, (starts, single) in layouts.items():
        outputs = {}
        for copy_sinks in ("none", "all"):
            options = KernelOptions(swa="flex", copy_sinks=copy_sinks)
            variant = "copied sinks" if copy_sinks == "all" else "sinks in place"
            if not single:
                build = functools.partial(swa_block_mask, starts, WINDOW, SINKS, copy_sinks == "all")
                build()
                rows.append({"seq_len": T, "part": "FlexAttention block mask",
                             "variant": f"{layout}, {variant} (once per forward)",
                             "fwd_ms": 1e3 * time_call(build, repeats=10, warmup=2)})
            memo: dict = {}  # the mask is built by the first call and reused: the attention alone is timed
            attend = functools.partial(kernels.swa, doc_start=starts, window=WINDOW, num_sinks=SINKS, scale=D**-0.5,
                                       single_document=single, memo=memo, options=options)
            rows.append({"seq_len": T, "part": "FlexAttention",
                         "variant": variant if layout == "one document" else f"{layout}, {variant}",
                         **timings(attend, inputs)})
            outputs[copy_sinks] = outputs_and_grads(attend, inputs)
        rows[-1]["rel_diff_out_dq_dk_dv"] = [round(rel_diff(a, b), 5) for a, b in zip(outputs["all"], outputs["none"])]
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
    """The mLSTM through TFLA: the backward from kept chunk states or computing them again, and (for scale)
    mlstm_kernels' own backward, which holds the normalizer constant (not the exact gradient)."""
    inputs = tfla_inputs(T)
    rows = []
    for keep, exact in ((False, True), (True, True), (True, False)):
        options = KernelOptions(mlstm="tfla", keep_chunk_states=keep, exact_gradient=exact)
        variant = "keep chunk states" if keep else "recompute chunk states"
        part = "TFLA (exact gradient)" if exact else "TFLA (normalizer held constant)"
        rows.append({"seq_len": T, "part": part, "variant": variant,
                     **timings(lambda *x: kernels.mlstm(*x, chunk_size=128, options=options)[0], inputs)})
    return rows


# the mLSTM kernels compared by ``--parts mlstm``: (options, chunk_size)
MLSTM_VARIANTS = {
    "Triton (exact gradient), chunk 64 (its largest)": (KernelOptions(mlstm="triton"), 64),
    "TFLA (exact gradient), chunk states kept": (KernelOptions(mlstm="tfla"), 128),
    "TFLA (normalizer held constant), chunk states kept": (KernelOptions(mlstm="tfla", exact_gradient=False), 128),
}


def mlstm_rows(T: int) -> list[dict]:
    """The mLSTM alone under each of ``MLSTM_VARIANTS``; each row's output and q, k, v, i, f gradients compared with
    TFLA's exact gradient (rel_diff_out_dq_dk_dv: out, dq, dk, dv, di, df)."""
    inputs = tfla_inputs(T)
    rows, results = [], {}
    for name, (options, chunk) in MLSTM_VARIANTS.items():
        fn = functools.partial(lambda options, chunk, *x: kernels.mlstm(*x, chunk_size=chunk, options=options)[0],
                               options, chunk)
        rows.append({"seq_len": T, "part": "mLSTM", "variant": name, **timings(fn, inputs)})
        results[name] = outputs_and_grads(fn, inputs)
    truth = results["TFLA (exact gradient), chunk states kept"]
    for row in rows:
        row["rel_diff_out_dq_dk_dv"] = [round(rel_diff(a, b), 5) for a, b in zip(results[row["variant"]], truth)]
    return rows


# the whole mixer under sets of kernel options: each switch's effect, from all off to the defaults, then the
# defaults with the mLSTM on our Triton kernels
LAYER_VARIANTS = {
    "sinks in place, chunk states recomputed, memory branch eager":
        KernelOptions(copy_sinks="none", keep_chunk_states=False, compile_memory=False),
    "copied sinks, chunk states kept, memory branch eager": KernelOptions(compile_memory=False),
    "defaults (+ memory branch compiled)": KernelOptions(),
    "defaults, mLSTM on the Triton kernels (kernels.mlstm='triton')": KernelOptions(mlstm="triton"),
}


def layer_rows(T: int) -> list[dict]:
    """The whole mixer (``HybridAttention.mix``, Llama-3.1-8B heads) under each of ``LAYER_VARIANTS``, and causal
    SDPA (flash) for scale."""
    student = HybridConfig(mixer="mlstm_swa", window_size=WINDOW, num_sink_tokens=SINKS)
    layer = hybrid_layer(NH, NKV, D, student, torch.device("cuda"), torch.bfloat16)
    inputs = mixer_inputs(layer, 1, T, torch.device("cuda"), torch.bfloat16)
    layout = full_layout(1, T, torch.device("cuda"))
    rows = []
    for name, options in LAYER_VARIANTS.items():
        layer.config.kernels = options
        rows.append({"seq_len": T, "part": "whole mixer", "variant": name,
                     **timings(lambda *x: mix_once(layer, layout, *x), inputs)})
    sdpa = functools.partial(F.scaled_dot_product_attention, is_causal=True, enable_gqa=True)
    rows.append({"seq_len": T, "part": "causal SDPA", "variant": "flash", **timings(sdpa, inputs[:3])})
    return rows


def fused_rows(T: int) -> list[dict]:
    """The whole mixer's forward without gradients (``HybridAttention.mix``, Llama-3.1-8B heads): today's path (the
    default kernel options) against the fused Triton forward (``kernels.mixer: triton``), on one document per row
    and on packed documents; the relative difference of the two outputs is on the fused row."""
    cuda = torch.device("cuda")
    student = HybridConfig(mixer="mlstm_swa", window_size=WINDOW, num_sink_tokens=SINKS)
    layer = hybrid_layer(NH, NKV, D, student, cuda, torch.bfloat16)
    inputs = mixer_inputs(layer, 1, T, cuda, torch.bfloat16)
    layouts = {"one document": full_layout(1, T, cuda),
               "packed documents": full_layout(1, T, cuda, document_ids=packed_starts(T))}
    variants = {"today's path (defaults)": KernelOptions(), "fused Triton forward": KernelOptions(mixer="triton")}
    rows = []
    for layout_name, layout in layouts.items():
        outputs = {}
        for variant, options in variants.items():
            layer.config.kernels = options

            def forward() -> torch.Tensor:
                with torch.no_grad():
                    return mix_once(layer, layout, *inputs)

            outputs[variant] = forward()
            rows.append({"seq_len": T, "part": "whole mixer, forward", "variant": f"{layout_name}, {variant}",
                         "fwd_ms": 1e3 * time_call(forward, repeats=10, warmup=2)})
        rows[-1]["rel_diff_out_dq_dk_dv"] = [round(rel_diff(*outputs.values()), 5)]
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
    parser.add_argument("--parts", default="flex,tfla,layer", help="which of flex, tfla, mlstm, layer, fused to time")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="sequence lengths, comma-separated")
    args = parser.parse_args()
    parts = {"flex": flex_rows, "tfla": tfla_rows, "mlstm": mlstm_rows, "layer": layer_rows, "fused": fused_rows}
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
