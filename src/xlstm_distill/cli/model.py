"""``xlstm-distill convert`` and ``xlstm-distill generate``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from xlstm_distill.cli.common import DTYPES, KERNEL_HELP, kernel_options, student_default, torch_dtype
from xlstm_distill.modeling import HybridConfig
from xlstm_distill.modeling.configuration import BACKENDS, MIXERS
from xlstm_distill.teacher import DEFAULT_TEACHER, load_teacher

console = Console(stderr=True)


def convert(
    out: Path = typer.Option(..., help="Folder for the student (config, weights, tokenizer)."),
    teacher: str = typer.Option(DEFAULT_TEACHER, help="Embedded name, .gguf file, local folder or hub id."),
    mixer: str = typer.Option(student_default("mixer"), help=f"One of: {', '.join(MIXERS)}."),
    window: int = typer.Option(student_default("window_size"), help="Sliding-window size W."),
    sinks: int = typer.Option(student_default("num_sink_tokens"), help="Sink tokens S."),
    feature_dim: int | None = typer.Option(student_default("feature_dim"), help="Feature-map size (default: head dim)."),
    chunk_size: int = typer.Option(student_default("chunk_size"), help="Chunk size of the chunkwise mLSTM kernel."),
    backend: str | None = typer.Option(None, help=f"Kernel shorthand, one of: {', '.join(BACKENDS)} (default auto)."),
    kernel: list[str] | None = typer.Option(None, "--kernel", help=KERNEL_HELP),
    dtype: str = typer.Option("float32", help=f"Weights dtype: {', '.join(DTYPES)}."),
) -> None:
    """Build an (untrained) hybrid student from a teacher and save it."""
    from xlstm_distill.modeling import convert as convert_model

    config = HybridConfig(mixer=mixer, window_size=window, num_sink_tokens=sinks, feature_dim=feature_dim,
                          chunk_size=chunk_size, kernels=kernel_options(kernel, backend))
    with console.status(f"loading teacher {teacher}"):
        model, tokenizer = load_teacher(teacher, dtype=torch_dtype(dtype))
    student = convert_model(model, config)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    new = sum(student.get_parameter(n).numel() for n in student.new_parameter_names())
    total = sum(p.numel() for p in student.parameters())
    console.print(f"[green]saved[/] {mixer} student of {teacher} to {out}: {total / 1e6:.1f}M parameters, "
                  f"{new / 1e6:.2f}M new ({len(student.model.layers)} layers, window {window}, {sinks} sinks)")


def generate(
    model: str = typer.Option(..., help="Student folder (or any causal LM folder / teacher name)."),
    prompt: str = typer.Option(..., help="User prompt (wrapped in the chat template when the tokenizer has one)."),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    chat: bool = typer.Option(True, help="Apply the tokenizer's chat template if it has one."),
    seed: int = typer.Option(0),
) -> None:
    """Generate text from a prompt, streaming tokens to stdout."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    if Path(model).is_dir():
        lm, tokenizer = AutoModelForCausalLM.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)
    else:
        lm, tokenizer = load_teacher(model)
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not (chat and tokenizer.chat_template))
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    lm.generate(**inputs, max_new_tokens=max_new_tokens, streamer=TextStreamer(tokenizer, skip_prompt=True),
                pad_token_id=tokenizer.pad_token_id, **sampling)


def register(app: typer.Typer) -> None:
    app.command()(convert)
    app.command()(generate)
