"""The whole pipeline at a teacher's full size on one GPU: convert, Stage I, targets and Stage II (full fine-tuning
with the memory settings of docs/decisions.md) for a few steps each, at the sequence length given.

    python benchmarks/scale_8b.py --out benchmarks/results/scale-8b --shape llama3.1-8b --seq-len 4096

Random weights of a named model shape (``--shape``: the shapes of ``xlstm-distill bench``, with their own
vocabulary, or ``tiny`` for a CPU smoke test) and synthetic text through the SmolLM2 tokenizer (its ids are a subset
of every shape's vocabulary): speed and memory do not depend on the values. Each stage is the pipeline's own
function (``stages.convert.run``, ``align.run``, ``targets.run``, ``distill.run``), on one recipe written to
``--work``. Reported per stage: tokens/s, model FLOPs utilisation and peak GPU memory; then one Stage II step under
torch.profiler, its operators by device time ("where the time goes"). Written to ``--out``: ``scale_SHAPE.json``,
``.md`` and ``.png``, with the exact command, device and versions.

Model FLOPs per token (N: weights of the matrix products, every parameter of two or more dimensions except the input
embedding; the sequence mixing itself, attention scores and the mLSTM recurrence, is not counted, so the figures are
a lower bound; activation checkpointing's recomputation is not counted either, as MFU asks):
  targets    2 N_teacher                        (teacher forward)
  Stage I    2 N_teacher + 6 N_mixers           (teacher forward; every student mixer forward and backward)
  Stage II   6 N_student                        (full fine-tuning: forward and backward)
MFU = FLOPs per token x tokens/s / peak, peak = 989 TFLOP/s (H200 bf16 dense) on CUDA; none on a CPU.
Models are written as each stage makes them and deleted once the next stage has read them (``--keep`` keeps them):
at 8B a bf16 student is 16 GB, the GPU machine's disk 64 GB.
"""

from __future__ import annotations

import copy
import gc
import json
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import typer
import yaml

from xlstm_distill.benchmarks.inference import SHAPES as MODEL_SHAPES, shape_config

TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)
SHAPES = [*MODEL_SHAPES, "tiny"]
PEAK_FLOPS = {"cuda": 989e12}  # H200 SXM, bf16 dense (no sparsity)
PROFILE_STEPS = 2  # the profiled Stage II run: a warm-up step, then the recorded step
app = typer.Typer(add_completion=False)


# -- inputs ------------------------------------------------------------------------------------------------------------
def load_tokenizer(folder: Path | None):
    """The tokenizer of ``folder`` (save_pretrained), else the embedded SmolLM2 teacher's."""
    from transformers import AutoTokenizer

    if folder is not None:
        return AutoTokenizer.from_pretrained(folder)
    from xlstm_distill.teacher import resolve_teacher

    path, gguf = resolve_teacher("smollm2-135m")
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf)


def make_teacher(shape: str, tokenizer, device: torch.device) -> torch.nn.Module:
    """A frozen random-weight teacher of ``shape`` built on ``device`` (bf16 on CUDA, float32 on a CPU); ``tiny``
    takes the tokenizer's vocabulary, the named shapes keep their own (the tokenizer's ids are a subset)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**TINY, vocab_size=len(tokenizer)) if shape == "tiny" else shape_config(shape)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"shape {shape} has {config.vocab_size} tokens, fewer than the tokenizer's {len(tokenizer)}.")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def write_text(path: Path, tokenizer, documents: int = 300, words: int = 400) -> None:
    """``documents`` documents of random vocabulary words (JSONL ``text``), deterministic."""
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    with path.open("w") as f:
        for _ in range(documents):
            tokens = tokenizer.convert_ids_to_tokens(torch.randint(300, vocab, (words,), generator=g).tolist())
            f.write(json.dumps({"text": " ".join(t.strip("Ġ▁") for t in tokens)}) + "\n")


def write_recipe(work: Path, shape: str, seq_len: int, steps: int, batch: int, text: Path, optimizer: str,
                 param_dtype: str, loss_chunk_tokens: int | None, compile_forward: bool) -> Path:
    tiny = shape == "tiny"
    memory = dict(optimizer=optimizer, param_dtype=param_dtype, checkpoint_every=0)  # no checkpoints: disk
    spec = dict(
        name=f"scale-{shape}", out_dir=str(work / shape), teacher=f"random weights, shape {shape}", seed=0,
        student=dict(mixer="mlstm_swa", window_size=8 if tiny else 512, num_sink_tokens=2 if tiny else 4,
                     **(dict(chunk_size=16) if tiny else {})),
        data=dict(sources=[{"path": str(text), "name": "text"}], seq_len=seq_len),
        align=dict(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=1, **memory),
        targets=dict(k=8 if tiny else 256, num_sequences=4 * batch, batch_size=batch),
        distill=dict(steps=steps, batch_size=batch, lr=1e-5, warmup_steps=1, train="full",
                     activation_checkpointing=True, loss_chunk_tokens=loss_chunk_tokens, compile=compile_forward,
                     **memory),
        evaluate=dict(held_out_sequences=1, batch_size=1))
    path = work / f"scale-{shape}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# -- measurements ------------------------------------------------------------------------------------------------------
def matmul_params(model: torch.nn.Module, prefix: str = "") -> int:
    """Weights of the matrix products: parameters of two or more dimensions, the input embedding excepted."""
    return sum(p.numel() for name, p in model.named_parameters(prefix=prefix)
               if p.dim() >= 2 and "embed_tokens" not in name)


@contextmanager
def measured(device: torch.device, record: dict):
    """Wall time and (CUDA) peak allocated memory of the block into ``record``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        record["resident_before_gb"] = torch.cuda.memory_allocated() / 2**30
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        record["peak_mem_gb"] = None
    record["seconds"] = time.perf_counter() - start


def trainer_speed(metrics: Path) -> float:
    """Mean tokens/s of a stage's logged steps after the first (warm-up), or of its only step."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    later = rows[1:] or rows
    return sum(r["tokens_per_s"] for r in later) / len(later)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_stage2(ctx, stage1: Path, target_dir: Path, device: torch.device, top: int) -> dict:
    """One Stage II step (forward, chunked loss, backward, clipping, optimizer) under torch.profiler, from a fresh
    trainer of the same recipe (its own folder); the operators by self device time (CPU time on a CPU), and the
    memory the trained parameters, their gradients and the optimizer state take."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from xlstm_distill.stages import distill
    from xlstm_distill.stages.context import RunContext

    recipe = copy.deepcopy(ctx.recipe)
    recipe.out_dir = str(ctx.out.parent / f"{ctx.out.name}-profile")
    recipe.targets.dir = str(target_dir)
    recipe.distill.steps = PROFILE_STEPS
    pctx = RunContext(recipe, ctx.dist, teacher=ctx.teacher_and_tokenizer())
    trainer = distill.make_trainer(pctx, stage1, target_dir)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=1, repeat=1))
    step_fn = trainer.step_fn

    def stepped(batch, scale, step):  # one profiler step per optimizer step (grad_accum is 1 here)
        if step > 0:
            prof.step()
        return step_fn(batch, scale, step)

    trainer.step_fn = stepped
    with prof:
        trainer.fit()
        if cuda:
            torch.cuda.synchronize()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    state_bytes = sum(_nbytes(v) for state in trainer.optimizer.state.values() for v in state.values())
    memory = {"trained_params_gb": sum(p.numel() * p.element_size() for p in params) / 2**30,
              "grads_gb": sum(p.numel() * p.element_size() for p in params) / 2**30,
              "optimizer_state_gb": state_bytes / 2**30}
    shutil.rmtree(pctx.out, ignore_errors=True)
    del trainer, pctx
    free(device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    rows = [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3,
             "share": getattr(e, key) / total,
             "total_ms": (e.device_time_total if cuda else e.cpu_time_total) / 1e3} for e in ranked]
    return {"time": "device (CUDA) self time" if cuda else "CPU self time", "step_ms": total / 1e3, "ops": rows,
            "memory": memory}


def _nbytes(value) -> int:
    """Bytes of an optimizer state entry (torchao's 8-bit moments: their codes and scales)."""
    if not isinstance(value, torch.Tensor):
        return 0
    inner = [getattr(value, name) for name in getattr(value, "tensor_attrs", ())]
    if inner:
        return sum(t.numel() * t.element_size() for t in inner)
    return value.numel() * value.element_size()


def versions() -> dict:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "cuda": torch.version.cuda}
    for name in ("torchao", "triton", "mlstm_kernels"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # not installed (or fails to import): recorded as absent
            found[name] = None
    return found


# -- report ------------------------------------------------------------------------------------------------------------
def report(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"scale_{result['shape']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    lines = [f"# The pipeline at shape {result['shape']}, {result['seq_len']} tokens a sequence", "",
             f"Command: `{result['command']}`", "", f"Device: {result['device']}", "",
             f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}", "",
             f"Teacher {result['params']['teacher'] / 1e9:.2f}B parameters, student "
             f"{result['params']['student'] / 1e9:.2f}B; batch {result['batch']} sequence(s), {result['steps']} "
             f"steps a stage. Stage II: {json.dumps(result['stage2_settings'])}.", "",
             "| stage | tokens/s | model FLOPs / token | MFU | peak GPU memory GB | resident before GB | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, s in result["stages"].items():
        lines.append(f"| {name} | {fmt(s.get('tokens_per_s'), ',.0f')} | {fmt(s.get('flops_per_token'), '.3g')} | "
                     f"{fmt(s.get('mfu'), '.1%')} | {fmt(s.get('peak_mem_gb'), '.1f')} | "
                     f"{fmt(s.get('resident_before_gb'), '.1f')} | {s['seconds']:.1f} |")
    prof = result["profile"]
    mem = prof["memory"]
    lines += ["", f"FLOPs: {result['flops_formula']} Peak: {result['peak_flops'] or 'none (CPU)'}.", "",
              f"Stage II memory of the training state: parameters {mem['trained_params_gb']:.2f} GB, gradients "
              f"{mem['grads_gb']:.2f} GB, optimizer state {mem['optimizer_state_gb']:.2f} GB.", "",
              f"## Where the time goes: one Stage II step ({prof['time']}, {prof['step_ms']:.1f} ms in all)", "",
              "| operator | calls | self ms | share | total ms |", "|---|---|---|---|---|"]
    for r in prof["ops"]:
        lines.append(f"| `{r['op']}` | {r['calls']} | {r['self_ms']:.2f} | {r['share']:.1%} | {r['total_ms']:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(result["stages"])
    axes[0].bar(names, [result["stages"][n].get("tokens_per_s") or 0 for n in names])
    axes[0].set_ylabel("tokens/s")
    axes[0].set_title("speed per stage")
    axes[1].bar(names, [result["stages"][n].get("peak_mem_gb") or 0 for n in names])
    axes[1].set_ylabel("peak GPU memory (GB)")
    axes[1].set_title("memory per stage" + ("" if result["peak_flops"] else " (none on a CPU)"))
    ops = prof["ops"][:12][::-1]
    axes[2].barh([r["op"][:40] for r in ops], [r["share"] for r in ops])
    axes[2].set_xlabel(f"share of the step's {prof['time']}")
    axes[2].set_title("one Stage II step")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{result['shape']}, {result['seq_len']} tokens, {result['device']}")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------------------------------
@app.command()
def main(out: Path = typer.Option(..., help="results folder"),
         shape: str = typer.Option("llama3.1-8b", help=f"teacher shape: {', '.join(SHAPES)}"),
         seq_len: int = typer.Option(4096, help="tokens per training sequence"),
         steps: int = typer.Option(3, help="steps of Stage I and of Stage II"),
         batch: int = typer.Option(1, help="sequences per step (and per teacher forward of the targets)"),
         optimizer: str = typer.Option("adamw8bit", help="Stage I and II optimizer (recipe `optimizer`)"),
         param_dtype: str = typer.Option("bfloat16", help="Stage I and II parameter dtype (recipe `param_dtype`)"),
         loss_chunk_tokens: int = typer.Option(1024, help="Stage II loss piece (0: the whole sequence at once)"),
         compile_forward: bool = typer.Option(False, "--compile", help="Stage II forward through torch.compile"),
         tokenizer: Path | None = typer.Option(None, help="a tokenizer folder (default: the embedded SmolLM2's)"),
         work: Path = typer.Option(Path("runs/scale"), help="run folders"),
         top: int = typer.Option(20, help="operators in the profile table"),
         keep: bool = typer.Option(False, help="keep the models each stage writes")) -> None:
    if shape not in SHAPES:
        raise typer.BadParameter(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    from xlstm_distill.stages import align, convert, distill, targets
    from xlstm_distill.stages.context import RunContext
    from xlstm_distill.stages.recipe import Recipe

    command = " ".join(["python", *sys.argv])
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer)
    text = work / "text.jsonl"
    if not text.exists():
        write_text(text, tok)
    recipe = Recipe.load(write_recipe(work, shape, seq_len, steps, batch, text, optimizer, param_dtype,
                                      loss_chunk_tokens or None, compile_forward))
    shutil.rmtree(recipe.out, ignore_errors=True)  # every stage from scratch
    probe = RunContext(recipe, teacher=(None, tok))
    device = probe.device
    teacher = make_teacher(shape, tok, device)
    ctx = RunContext(recipe, probe.dist, teacher=(teacher, tok))
    stages: dict[str, dict] = {s: {} for s in ("convert", "Stage I", "targets", "Stage II")}
    n_teacher = matmul_params(teacher)

    # convert: the student is built where the teacher is and in its dtype (an 8B model's random initialization on
    # the host would take minutes), then takes the teacher's weights
    default = torch.get_default_dtype()
    torch.set_default_dtype(next(teacher.parameters()).dtype)
    try:
        with measured(device, stages["convert"]), torch.device(device):
            init = convert.run(ctx)
    finally:
        torch.set_default_dtype(default)
    free(device)
    with torch.device("meta"):  # the student's shape, for the FLOP counts (no memory, no copy)
        from xlstm_distill.modeling import HybridConfig, HybridForCausalLM

        shaped = HybridForCausalLM(HybridConfig.from_pretrained(init))
    n_student = matmul_params(shaped)
    n_mixers = sum(matmul_params(layer.self_attn) for layer in shaped.model.layers)
    total_student = sum(p.numel() for p in shaped.parameters())
    del shaped
    with measured(device, stages["Stage I"]):
        stage1 = align.run(ctx)
    free(device)
    if not keep:
        shutil.rmtree(init, ignore_errors=True)
    record = stages["targets"]
    with measured(device, record):
        target_dir = targets.run(ctx)
    record["tokens"] = recipe.targets.num_sequences * seq_len
    record["tokens_per_s"] = record["tokens"] / record["seconds"]
    free(device)
    with measured(device, stages["Stage II"]):
        final = distill.run(ctx, stage1)
    free(device)
    if not keep:
        shutil.rmtree(final, ignore_errors=True)
    profile = profile_stage2(ctx, stage1, target_dir, device, top)
    if not keep:
        shutil.rmtree(stage1, ignore_errors=True)

    stages["Stage I"]["tokens_per_s"] = trainer_speed(ctx.stage1_dir.parent / "metrics.jsonl")
    stages["Stage II"]["tokens_per_s"] = trainer_speed(ctx.stage2_dir.parent / "metrics.jsonl")
    flops = {"targets": 2 * n_teacher, "Stage I": 2 * n_teacher + 6 * n_mixers, "Stage II": 6 * n_student}
    peak = PEAK_FLOPS.get(device.type)
    for name, per_token in flops.items():
        stages[name]["flops_per_token"] = per_token
        stages[name]["mfu"] = per_token * stages[name]["tokens_per_s"] / peak if peak else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    result = dict(
        shape=shape, seq_len=seq_len, batch=batch, steps=steps, command=command, device=name, versions=versions(),
        params={"teacher": sum(p.numel() for p in teacher.parameters()), "student": total_student,
                "teacher_matmul": n_teacher, "student_matmul": n_student, "student_mixers_matmul": n_mixers},
        stage2_settings={k: getattr(recipe.distill, k) for k in ("train", "optimizer", "param_dtype",
                                                                   "activation_checkpointing", "loss_chunk_tokens",
                                                                   "compile", "batch_size")},
        flops_formula="targets 2 N_teacher, Stage I 2 N_teacher + 6 N_mixers, Stage II 6 N_student per token (N: "
                      "matmul weights, input embedding excluded; sequence mixing and recomputation not counted).",
        peak_flops=peak, stages=stages, profile=profile)
    report(out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1))


if __name__ == "__main__":
    app()
