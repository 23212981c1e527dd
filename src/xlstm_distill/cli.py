"""Command line: ``xlstm-distill convert | generate | ...``."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.console import Console

from xlstm_distill.benchmarks.commands import bench
from xlstm_distill.modeling import HybridConfig, convert as convert_model
from xlstm_distill.modeling.configuration import BACKENDS, MIXERS
from xlstm_distill.data.commands import app as data_app
from xlstm_distill.evaluation.commands import evaluate, merge
from xlstm_distill.stages.recipe import Pipeline, Recipe
from xlstm_distill.teacher import DEFAULT_TEACHER, load_teacher

app = typer.Typer(help="Distill Transformer LLMs into hybrid xLSTM (mLSTM + sliding-window attention) students.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
app.add_typer(data_app, name="data", help="Training data: build the offline domain corpora.")
app.command(help="Teacher vs student(s) on benchmarks (lm-evaluation-harness): recovery, Win-and-Tie, alpha*.")(evaluate)
app.command(help="Stage III: linear weight merge of expert students (Eq. 14).")(merge)
app.command(help="Inference benchmark: teacher vs student prefill / TTFT, decode tokens/s, memory (JSON, md, PNG).")(bench)
console = Console(stderr=True)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(DTYPES)}")
    return DTYPES[name]


@app.command()
def convert(
    out: Path = typer.Option(..., help="Folder for the student (config, weights, tokenizer)."),
    teacher: str = typer.Option(DEFAULT_TEACHER, help="Embedded name, .gguf file, local folder or hub id."),
    mixer: str = typer.Option("mlstm_swa", help=f"One of: {', '.join(MIXERS)}."),
    window: int = typer.Option(512, help="Sliding-window size W."),
    sinks: int = typer.Option(4, help="Sink tokens S."),
    feature_dim: int | None = typer.Option(None, help="Feature-map size (default: head dim)."),
    chunk_size: int = typer.Option(64, help="Chunk size of the chunkwise mLSTM kernel."),
    backend: str = typer.Option("auto", help=f"One of: {', '.join(BACKENDS)}."),
    dtype: str = typer.Option("float32", help="Weights dtype: float32, bfloat16 or float16."),
) -> None:
    """Build an (untrained) hybrid student from a teacher and save it."""
    config = HybridConfig(mixer=mixer, window_size=window, num_sink_tokens=sinks, feature_dim=feature_dim,
                          chunk_size=chunk_size, backend=backend)
    with console.status(f"loading teacher {teacher}"):
        model, tokenizer = load_teacher(teacher, dtype=_dtype(dtype))
    student = convert_model(model, config)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    new = sum(student.get_parameter(n).numel() for n in student.new_parameter_names())
    total = sum(p.numel() for p in student.parameters())
    console.print(f"[green]saved[/] {mixer} student of {teacher} to {out}: {total / 1e6:.1f}M parameters, "
                  f"{new / 1e6:.2f}M new ({len(student.model.layers)} layers, window {window}, {sinks} sinks)")


@app.command()
def generate(
    model: str = typer.Option(..., help="Student folder (or any causal LM folder / teacher name)."),
    prompt: str = typer.Option(..., help="User prompt (wrapped in the chat template when the tokenizer has one)."),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    chat: bool = typer.Option(True, help="Apply the tokenizer's chat template if it has one."),
    seed: int = typer.Option(0),
) -> None:
    """Generate text from a prompt, streaming tokens to stdout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    if Path(model).is_dir():
        lm, tokenizer = AutoModelForCausalLM.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)
    else:
        lm, tokenizer = load_teacher(model)
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not (chat and tokenizer.chat_template))
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    lm.generate(**inputs, max_new_tokens=max_new_tokens, streamer=TextStreamer(tokenizer, skip_prompt=True),
                pad_token_id=tokenizer.pad_token_id, **sampling)


RECIPE = typer.Argument(..., exists=True, dir_okay=False, help="Experiment recipe (YAML), e.g. recipes/demo-cpu.yaml.")
OVERRIDES = typer.Option(None, "--set", help="Override a recipe value, e.g. --set distill.steps=200 (repeatable).")


@app.command()
def run(recipe: Path = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """All stages of a recipe: convert -> Stage I align -> teacher targets -> Stage II distill -> report."""
    Pipeline(Recipe.load(recipe, overrides)).run()


@app.command()
def align(recipe: Path = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """Stage I: layer-wise alignment of the student mixers to the teacher attention."""
    Pipeline(Recipe.load(recipe, overrides)).align()


@app.command()
def targets(recipe: Path = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """Precompute the teacher's top-k next-token targets for Stage II (sharded, checksummed)."""
    Pipeline(Recipe.load(recipe, overrides)).targets()


@app.command()
def distill(recipe: Path = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """Stage II: end-to-end sparse knowledge distillation (runs under torchrun with FSDP2)."""
    Pipeline(Recipe.load(recipe, overrides)).distill()


@app.command()
def experts(recipe: Path = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """Stage III: distill one expert per domain from the Stage I model, then merge them."""
    Pipeline(Recipe.load(recipe, overrides)).experts()


@app.command()
def report(recipe: Path = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """Held-out perplexity and KL to the teacher of every student the recipe produced."""
    Pipeline(Recipe.load(recipe, overrides)).report()


if __name__ == "__main__":  # python -m xlstm_distill.cli (torchrun -m needs a module)
    app()
