"""One sequence mixer alone, forward and forward+backward: the student's hybrid mixer (feature maps, gates, mLSTM,
SWA + sinks, output-gate mix; `HybridAttention.mix`) against full causal softmax attention (SDPA, flash kernel).

Inputs are the post-projection q, k, v (and the gate pre-activations), so the projections, identical in both
models, are left out. ``profile_mixer`` writes where the hybrid mixer's time goes (torch.profiler, CUDA kernels).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention

from xlstm_distill.benchmarks.report import first_line, time_call
from xlstm_distill.modeling import HybridConfig
from xlstm_distill.modeling.attention import HybridAttention
from xlstm_distill.modeling.cache import full_layout


def hybrid_layer(num_heads: int, num_kv_heads: int, head_dim: int, student: HybridConfig, device: torch.device,
                 dtype: torch.dtype) -> HybridAttention:
    """A single HybridAttention of the given head layout (random projections)."""
    teacher = LlamaConfig(hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                          num_key_value_heads=num_kv_heads, head_dim=head_dim, num_hidden_layers=1)
    fields = student.mixer_fields()
    config = HybridConfig(**fields, teacher_config=teacher.to_dict())
    return HybridAttention(LlamaAttention(teacher, 0), config, 0).to(device=device, dtype=dtype)


def mixer_inputs(layer: HybridAttention, batch: int, seq_len: int, device: torch.device,
                 dtype: torch.dtype) -> list[torch.Tensor]:
    """Random q (B, NH, S, DH), k, v (B, NKV, S, DH) and gate pre-activations (B, G*NH, S) for ``layer``."""
    H, KV, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = torch.randn(batch, H, seq_len, D, device=device, dtype=dtype)  # (B, NH, S, DH)
    k, v = (torch.randn(batch, KV, seq_len, D, device=device, dtype=dtype) for _ in range(2))  # (B, NKV, S, DH)
    gates = torch.randn(batch, layer.num_gates * H, seq_len, device=device, dtype=dtype)  # (B, G*NH, S)
    return [q, k, v, gates]


def mix_once(layer: HybridAttention, layout, *inputs: torch.Tensor) -> torch.Tensor:
    """One hybrid mixer call; the per-forward objects (block mask) are rebuilt, as in the model."""
    layout.memo.clear()
    return layer.mix(*inputs, layout)


def mixer_point(layer: HybridAttention, batch: int, seq_len: int, repeats: int = 5) -> dict:
    """Forward and forward+backward milliseconds of the hybrid mixer and of causal SDPA. Compiled kernels start
    afresh at each length, as in training at that length: a second length would get FlexAttention's symbolic-length
    kernels (docs/decisions.md)."""
    torch._dynamo.reset()
    param = next(layer.parameters())
    inputs = mixer_inputs(layer, batch, seq_len, param.device, param.dtype)
    layout = full_layout(batch, seq_len, param.device)

    def hybrid(q, k, v, gates):
        return mix_once(layer, layout, q, k, v, gates)

    def hybrid_native(q, k, v, gates):  # backend 'native' (pure PyTorch), next to the layer's own (auto: TFLA +
        # FlexAttention on CUDA) for the forward + backward of training
        options = layer.config.kernels
        layer.config.kernels = options.replace(mlstm="native", swa="native")
        try:
            return hybrid(q, k, v, gates)
        finally:
            layer.config.kernels = options

    def sdpa(q, k, v, gates):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    row = {"seq_len": seq_len, "batch": batch}
    variants = [("hybrid", hybrid, True), ("sdpa", sdpa, True)]  # (name, function, also time the forward alone)
    if layer.config.backend != "native" and param.is_cuda:
        variants.insert(1, ("hybrid_native", hybrid_native, False))
    for name, fn, time_forward in variants:
        leaves = [x.detach().requires_grad_() for x in inputs]

        def fwd():
            with torch.no_grad():
                fn(*leaves)

        def fwd_bwd():
            fn(*leaves).sum().backward()
            for x in leaves:
                x.grad = None

        timed = ((f"{name}_fwd_ms", fwd),) if time_forward else ()
        for key, call in (*timed, (f"{name}_fwd_bwd_ms", fwd_bwd)):
            try:  # a failing kernel is recorded, the other measurements still run
                row[key] = 1e3 * time_call(call, repeats=repeats, warmup=2)
            except (RuntimeError, torch.OutOfMemoryError) as err:
                errors = [row["error"]] if "error" in row else []
                row["error"] = "; ".join(errors + [f"{key}: {first_line(err)}"])
    for name in ("hybrid", "hybrid_native"):
        if f"{name}_fwd_bwd_ms" in row and "sdpa_fwd_bwd_ms" in row:
            row[f"{name.replace('hybrid', 'fwd_bwd')}_speedup"] = row["sdpa_fwd_bwd_ms"] / row[f"{name}_fwd_bwd_ms"]
    return row


def profile_mixer(layer: HybridAttention, batch: int, seq_len: int, path: Path, rows: int = 25) -> None:
    """Top kernels (self time) of one hybrid forward (prefill: no gradients) and of one forward+backward (training),
    written as two text tables (kernels compiled afresh for this length, as in ``mixer_point``)."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    param = next(layer.parameters())
    leaves = [x.requires_grad_() for x in mixer_inputs(layer, batch, seq_len, param.device, param.dtype)]
    layout = full_layout(batch, seq_len, param.device)

    def forward() -> None:
        with torch.no_grad():
            mix_once(layer, layout, *leaves)

    def forward_backward() -> None:
        mix_once(layer, layout, *leaves).sum().backward()

    tables = []
    for title, step in (("forward (no gradients)", forward), ("forward + backward", forward_backward)):
        try:
            for _ in range(2):  # compile and autotune outside the profile
                step()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if param.is_cuda else [])
            with profile(activities=activities) as prof:
                step()
                if param.is_cuda:
                    torch.cuda.synchronize()
        except (RuntimeError, torch.OutOfMemoryError) as err:
            tables.append(f"## {title}: profile failed: {err}\n")
            continue
        sort = "self_cuda_time_total" if param.is_cuda else "self_cpu_time_total"
        tables.append(f"## {title}, {seq_len} tokens\n{prof.key_averages().table(sort_by=sort, row_limit=rows)}")
    path.write_text("\n\n".join(tables))


def plot_mixer(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("hybrid_fwd_bwd_ms", "-o"), ("hybrid_native_fwd_bwd_ms", "-d"), ("sdpa_fwd_bwd_ms", "--s"),
                       ("hybrid_fwd_ms", "-^"), ("sdpa_fwd_ms", "--v")):
        pts = [(r["seq_len"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=key.replace("_ms", ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ms")
    ax.set_title("one mixer: hybrid (mLSTM + SWA) vs causal SDPA")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
