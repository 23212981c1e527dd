"""``xlstm-distill bench``: inference benchmark (teacher vs student) and the single-mixer benchmark."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch
import typer
from rich.console import Console

from xlstm_distill.benchmarks import inference, mixer
from xlstm_distill.benchmarks.report import write_results
from xlstm_distill.cli.common import KERNEL_HELP, kernel_options, student_default
from xlstm_distill.modeling import HybridConfig

console = Console(stderr=True)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _sizes(text: str) -> list[int]:
    """'1k,4k,32768' -> [1024, 4096, 32768]."""
    try:
        return [int(float(s[:-1]) * 1024) if s.lower().endswith("k") else int(s) for s in text.split(",") if s]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated sizes such as 1k,4k,32k, got {text!r}") from None


def bench(
    out: Path = typer.Option(Path("benchmarks/results/inference"), help="Folder for JSON, markdown and PNG results."),
    shape: str = typer.Option("llama3.1-8b", help=f"Model shape with random weights: {', '.join(inference.SHAPES)}."),
    model: str | None = typer.Option(None, help="Benchmark a real teacher instead (embedded name, .gguf, folder, hub id)."),
    contexts: str = typer.Option("1k,2k,4k,8k,16k,32k,64k,128k", help="Prefill prompt lengths ('' with no decode "
                                 "contexts and no --flat-steps: mixer benchmark only)."),
    batches: str = typer.Option("1,4,8", help="Prefill batch sizes."),
    decode_contexts: str = typer.Option("1k,4k,16k,32k", help="Cache lengths of the decode points."),
    decode_batches: str = typer.Option("1,8", help="Decode batch sizes."),
    decode_steps: int = typer.Option(32, help="Timed decode steps per point."),
    flat_steps: int = typer.Option(0, help="Student tokens to decode while recording memory (0 = skip), at the "
                                   "largest decode batch size."),
    student_prefill: int = typer.Option(inference.STUDENT_PREFILL, help="Prompt tokens the student really prefills before a decode point "
                                        "(its state is full-size once the window is full); 0 = the whole context."),
    compile_decode: bool = typer.Option(False, help="Both models' decode steps through torch.compile (then the CUDA "
                                                    "graph): fewer kernel launches per step (the teacher compiled per "
                                                    "point, the student once per batch size)."),
    repeats: int = typer.Option(2, help="Timed prefill repeats (after one warm-up)."),
    max_prefill_tokens: int = typer.Option(1 << 18, help="Leave out prefill points with batch x context above this."),
    mixer_contexts: str = typer.Option("", help="Also time one mixer alone (fwd, fwd+bwd) at these lengths, e.g. 8k,32k."),
    models: str = typer.Option("teacher,student", help="Which models to time, in this order (e.g. 'student')."),
    reuse: Path | None = typer.Option(None, help="inference.json of an earlier run on the same kind of device: its "
                                      "rows of the points not timed now are kept (marked 'reused')."),
    full_heads: str = typer.Option("", help="KV heads of the student that keep full attention: a fraction of all of "
                                   "them spread evenly over the layers (e.g. 0.05) or layer:head pairs (e.g. 0:1,5:0)."),
    window: int = typer.Option(student_default("window_size"), help="The student's window."),
    sinks: int = typer.Option(student_default("num_sink_tokens"), help="The student's sink tokens."),
    backend: str | None = typer.Option(None, help="Student kernel shorthand: auto (default), native, tfla or triton."),
    kernel: list[str] | None = typer.Option(None, "--kernel", help=KERNEL_HELP),
    bandwidth: float | None = typer.Option(None, help="Memory bandwidth in GB/s of the decode points' floor (bytes a "
                                           "step reads / bandwidth); default: the GPU's specification, else what "
                                           "it reports."),
    dtype: str = typer.Option("bfloat16"),
    device: str | None = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if available)."),
) -> None:
    """Teacher vs student: prefill tokens/s and time to first token, decode tokens/s and latency next to the step's
    memory-bandwidth floor, peak memory. The student's kernels: --kernel (e.g. --kernel mixer_step=triton: the fused
    decode step)."""
    if dtype not in DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(DTYPES)}")
    if flat_steps and not _sizes(decode_batches):
        raise typer.BadParameter("--flat-steps decodes at the largest of --decode-batches: give at least one batch size")
    if student_prefill < 0:
        raise typer.BadParameter(f"--student-prefill takes a token count >= 0 (0 = the whole context), got {student_prefill}")
    torch_dtype = DTYPES[dtype]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    student = HybridConfig(window_size=window, num_sink_tokens=sinks, kernels=kernel_options(kernel, backend))
    if full_heads:
        config = inference.shape_config(shape) if model is None else _teacher(model, torch_dtype).config
        student.set_full_attention(_full_heads(full_heads, config))
    command = "xlstm-distill bench " + shlex.join(sys.argv[2:])
    torch._dynamo.config.cache_size_limit = 64  # --compile-decode: one compiled decode step per point (static shapes)
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names or set(names) - {"teacher", "student"}:
        raise typer.BadParameter(f"--models takes a comma-separated subset of teacher, student; got {models!r}")
    if mixer_contexts:
        config = inference.shape_config(shape) if model is None else _teacher(model, torch_dtype).config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layer = mixer.hybrid_layer(config.num_attention_heads, config.num_key_value_heads, head_dim, student, dev,
                                   torch_dtype)
        rows = [mixer.mixer_point(layer, 1, n) for n in _sizes(mixer_contexts)]
        columns = ["seq_len", "batch", "hybrid_fwd_ms", "hybrid_fwd_bwd_ms", "hybrid_native_fwd_bwd_ms", "sdpa_fwd_ms",
                   "sdpa_fwd_bwd_ms", "fwd_bwd_speedup", "fwd_bwd_native_speedup", "error"]
        write_results(out, "mixer", rows, command, columns, mixer.plot_mixer)
        mixer.profile_mixer(layer, 1, _sizes(mixer_contexts)[0], out / "mixer_profile.txt")
        console.print(f"[green]mixer results[/] in {out}/mixer.md")
    settings = inference.BenchSettings(
        contexts=_sizes(contexts), batches=_sizes(batches), decode_contexts=_sizes(decode_contexts),
        decode_batches=_sizes(decode_batches), decode_steps=decode_steps, flat_steps=flat_steps,
        student_prefill=student_prefill, repeats=repeats,
        max_prefill_tokens=max_prefill_tokens, student=student, compile_decode=compile_decode, bandwidth_gbs=bandwidth)
    if not settings.contexts and not settings.decode_contexts and not settings.flat_steps:
        return
    if model is None:
        factories = inference.random_models(inference.shape_config(shape), student, dev, torch_dtype)
    else:
        factories = _checkpoint_models(model, student, dev, torch_dtype)
    columns = ["model", "measure", "batch", "context", "status", "ttft_ms", "prefill_tok_s", "ms_per_token",
               "decode_tok_s", "peak_gb", "cache_gb", "read_gb", "floor_ms", "of_floor", "bandwidth_gbs",
               "bandwidth_source", "cuda_graph", "compiled", "graph_error", "prefilled", "generated",
               "allocated_gb", "reused"]

    earlier = [] if reuse is None else [{**row, "reused": True} for row in json.loads(reuse.read_text())["rows"]]

    def point(row: dict) -> tuple:  # what a row measured; the memory rows of a model are one point
        return (row["model"], "memory") if row["measure"] == "memory" else \
            (row["model"], row["measure"], row.get("batch"), row.get("context"))

    def save(rows: list[dict]) -> None:  # after every point: an interrupted run keeps what it measured
        measured = {point(r) for r in rows}  # earlier rows stay until this run has measured their point
        rows = [r for r in earlier if point(r) not in measured] + rows
        write_results(out, "inference", rows, command, columns, inference.plot_inference)
        ratios = inference.speedups(rows)
        if ratios:
            write_results(out, "speedup", ratios, command, list(ratios[0]))

    save(inference.run_bench({name: factories[name] for name in names}, settings, on_row=save))
    console.print(f"[green]results[/] in {out}/inference.md and {out}/speedup.md")


def _full_heads(text: str, config) -> list[list[int]]:
    """``--full-heads``: a fraction (spread over the layers) or ``layer:head`` pairs."""
    layers, heads = config.num_hidden_layers, config.num_key_value_heads or config.num_attention_heads
    try:
        if ":" not in text:
            return inference.spread_full_heads(layers, heads, float(text))
        return [[int(x) for x in pair.split(":")] for pair in text.split(",") if pair.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"--full-heads takes a fraction in [0, 1] or layer:head pairs; got {text!r} ({err})")


def _teacher(name: str, dtype: torch.dtype) -> torch.nn.Module:
    from xlstm_distill.teacher import load_teacher

    return load_teacher(name, dtype=dtype)[0].eval()


def _checkpoint_models(name: str, student: HybridConfig, device: torch.device, dtype: torch.dtype):
    from xlstm_distill.modeling import convert

    def teacher():
        return _teacher(name, dtype).to(device)

    return {"teacher": teacher, "student": lambda: convert(teacher(), student).eval()}


def register(app: typer.Typer) -> None:
    app.command(help="Inference benchmark: teacher vs student prefill / TTFT, decode tokens/s, memory (JSON, md, PNG).")(bench)
