"""Stage II under torchrun + FSDP2 on N GPUs against 1 GPU, for the same global batch.

One recipe (a random-weight Llama teacher of a given shape, the SmolLM2 tokenizer, the offline corpora) is distilled
four times from the same Stage I model and the same targets:
  single       1 process, batch B
  sharded      N processes (torchrun), batch B / N each
  n-to-one     sharded's checkpoint at half the steps, continued by 1 process
  one-to-n     single's checkpoint at half the steps, continued by N processes
and the losses, tokens/s and peak memory are compared (JSON, markdown table, loss plot).

    python benchmarks/multi_gpu.py --out benchmarks/results/multi-gpu --shape llama3.2-1b --tokenizer T --corpora runs/corpora

``--shape`` takes the model shapes of ``xlstm-distill bench`` (with the tokenizer's vocabulary) or ``tiny``, which runs
the same schedule on CPU processes (gloo) in a minute (the smoke test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import typer
import yaml

from xlstm_distill.benchmarks.inference import SHAPES as MODEL_SHAPES, shape_config

# random weights (speed and sharding do not depend on the values): the benchmark's model shapes, and a tiny Llama
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
SHAPES = [*MODEL_SHAPES, "tiny"]
# NVLink multicast stays off on shared hosts (the device notes): set for every process started here
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
app = typer.Typer(add_completion=False)


def make_teacher(folder: Path, shape: str, tokenizer_dir: Path) -> None:
    """A random-weight model of ``shape`` with the tokenizer of ``tokenizer_dir`` (and its vocabulary), saved as a
    teacher folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").exists():
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = shape_config(shape) if shape != "tiny" else AutoConfig.for_model(**TINY)
    config.vocab_size, config.bos_token_id, config.eos_token_id = len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"teacher {shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)


def write_recipe(root: Path, name: str, teacher: Path, corpora: Path, shape: str, steps: int, batch: int) -> Path:
    """The recipe of one run: ``batch`` sequences per process and optimizer step."""
    seq_len = 1024 if shape != "tiny" else 64
    spec = dict(name=name, out_dir=str(root / name), teacher=str(teacher), seed=0,
                student=dict(mixer="mlstm_swa", window_size=512 if shape != "tiny" else 8, num_sink_tokens=4),
                data=dict(offline_corpora=str(corpora), seq_len=seq_len, **(  # tiny: 1 MB of short math documents
                    dict(max_mb_per_domain=1, weights={"math": 1.0}) if shape == "tiny" else dict(max_mb_per_domain=8))),
                align=dict(steps=2, batch_size=2, lr=1e-2, warmup_steps=1),
                targets=dict(k=256 if shape != "tiny" else 8, num_sequences=steps * 16, batch_size=16),
                # CE + KL: a loss well above float rounding even where the random student matches its teacher, so
                # that one and two processes compare in relative terms
                distill=dict(steps=steps, batch_size=batch, grad_accum=1, lr=1e-4, warmup_steps=2, gamma=0.9,
                             beta=0.1, checkpoint_every=steps // 2),
                evaluate=dict(held_out_sequences=2, batch_size=2))
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def distill(recipe: Path, nproc: int) -> None:
    """``xlstm-distill distill`` in 1 process or under torchrun (it continues from the run's latest checkpoint)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    subprocess.run([*launcher, "-m", "xlstm_distill.cli", "distill", str(recipe)], check=True, env={**os.environ, **SAFE_ENV})


def prune(run: Path, keep_step: int | None) -> None:
    """Free a finished run's disk: its final model and every checkpoint but ``keep_step``'s (a 1.17B student's
    checkpoint with AdamW states is about 14 GB, its model 4.7 GB; only the losses are compared)."""
    shutil.rmtree(run / "stage2" / "model", ignore_errors=True)
    ckpts = run / "stage2" / "checkpoints"
    for old in ckpts.glob("step_*"):
        if keep_step is None or int(old.name.split("_")[1]) != keep_step:
            shutil.rmtree(old)
    if keep_step is not None:
        (ckpts / "latest").write_text(f"step_{keep_step:08d}")


def finished(run: Path, steps: int) -> bool:
    path = run / "stage2" / "metrics.jsonl"
    return path.exists() and any(r["step"] == steps for r in rows(run))


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stage2" / "metrics.jsonl").read_text().splitlines()]


def link_tree(src: Path, dst: Path, ignore=None) -> None:
    """Copy a folder as hard links (targets and checkpoints are GBs; runs only ever replace files, never edit them)."""
    shutil.copytree(src, dst, ignore=ignore, copy_function=os.link, dirs_exist_ok=True)


def roll_back(src: Path, dst: Path, step: int) -> None:
    """``dst``: run ``src`` as it was at its step-``step`` checkpoint (later checkpoints and the final model left out)."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        if Path(folder) == src / "stage2":
            return [n for n in names if n == "model"]
        return [n for n in names if n.startswith("step_") and int(n.split("_")[1]) > step]

    link_tree(src, dst, ignore)
    for path, text in ((dst / "stage2" / "checkpoints" / "latest", f"step_{step:08d}"),
                       (dst / "stage2" / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows(src) if r["step"] <= step))):
        path.unlink()  # a new file, not the hard link shared with ``src``
        path.write_text(text)


def summarize(root: Path, nproc: int, shape: str, batch: int) -> dict:
    runs = {name: rows(root / name) for name in ("single", "sharded", f"{nproc}-to-one", f"one-to-{nproc}")}
    base = [r["loss"] for r in runs["single"]]

    def rel(name: str) -> float:
        return max(abs(r["loss"] - b) / abs(b) for r, b in zip(runs[name], base))

    def speed(name: str) -> float:  # tokens/s of the logged steps after the first (compilation, warm-up)
        later = [r["tokens_per_s"] for r in runs[name][1:]]
        return sum(later) / len(later)

    summary = dict(shape=shape, processes=nproc, global_batch=batch, steps=len(base),
                   max_rel_loss_diff={name: rel(name) for name in runs if name != "single"},
                   tokens_per_s={name: speed(name) for name in ("single", "sharded")},
                   peak_mem_gb={name: max((r["peak_mem_gb"] for r in runs[name] if "peak_mem_gb" in r), default=None)
                                for name in ("single", "sharded")},  # CUDA only
                   losses={name: [r["loss"] for r in rs] for name, rs in runs.items()})
    summary["speedup"] = summary["tokens_per_s"]["sharded"] / summary["tokens_per_s"]["single"]
    return summary


def report(out: Path, summary: dict, command: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / f"multi_gpu_{summary['shape']}.json").write_text(json.dumps({**summary, "command": command, "device": device}, indent=1))
    n = summary["processes"]
    lines = [f"Command: `{command}`", "", f"Device: {device}", "",
             f"Shape {summary['shape']}, global batch {summary['global_batch']} sequences, {summary['steps']} steps.", "",
             "| run | max relative loss difference to 1 process | tokens/s | peak memory GB (rank 0) |", "|---|---|---|---|"]
    for name in summary["losses"]:
        diff = summary["max_rel_loss_diff"].get(name, 0.0)
        tps, mem = summary["tokens_per_s"].get(name), summary["peak_mem_gb"].get(name)
        lines.append(f"| {name} | {diff:.2e} | {'' if tps is None else f'{tps:,.0f}'} | {'' if mem is None else f'{mem:.1f}'} |")
    lines += ["", f"Speed-up {n} processes / 1: {summary['speedup']:.2f}x"]
    (out / f"multi_gpu_{summary['shape']}.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in summary["losses"].items():
        ax.plot(range(1, len(losses) + 1), losses, "-o" if name == "single" else "--", label=name, markersize=3)
    ax.set_xlabel("Stage II step")
    ax.set_ylabel("loss")
    ax.set_title(f"Stage II, {summary['shape']}: 1 vs {n} processes (FSDP2)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"multi_gpu_{summary['shape']}.png", dpi=120)
    plt.close(fig)


@app.command()
def main(out: Path = typer.Option(..., help="results folder"),
         shape: str = typer.Option("llama3.2-1b", help=f"teacher shape: {', '.join(SHAPES)}"),
         tokenizer: Path = typer.Option(..., help="a folder with the SmolLM2 tokenizer (save_pretrained)"),
         corpora: Path = typer.Option(Path("runs/corpora"), help="offline corpora (xlstm-distill data offline)"),
         work: Path = typer.Option(Path("runs/multi-gpu"), help="run folders"),
         nproc: int = 2, steps: int = 20, batch: int = 16) -> None:
    if shape not in SHAPES:
        raise typer.BadParameter(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    if batch % nproc or steps % 2:
        raise typer.BadParameter("batch must divide by nproc and steps by 2 (the resumed runs start at half)")
    import torch

    root = work / shape
    root.mkdir(parents=True, exist_ok=True)
    teacher = root / "teacher"
    make_teacher(teacher, shape, tokenizer)
    half = steps // 2
    # each source run, then its continuation by the other world size; pruned as soon as they are done (the peak is
    # two checkpoints: the source's middle one and the continuation's last one)
    for name, procs, source in (("single", 1, None), (f"one-to-{nproc}", nproc, "single"),
                                ("sharded", nproc, None), (f"{nproc}-to-one", 1, "sharded")):
        run = root / name
        recipe = write_recipe(root, name, teacher, corpora, shape, steps, batch // procs)
        if finished(run, steps):
            continue
        if name == "sharded":  # from the single run's Stage I model and targets
            shutil.rmtree(run, ignore_errors=True)
            for part in ("student-init", "stage1", "targets"):
                link_tree(root / "single" / part, run / part)
        elif source is not None:
            shutil.rmtree(run, ignore_errors=True)
            roll_back(root / source, run, half)
        distill(recipe, procs)  # the single run makes Stage I and the targets first, or continues after a crash
        prune(run, half if source is None else None)
        if source is not None:
            prune(root / source, None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
    device = f"{torch.cuda.device_count()} x {device}" if torch.cuda.is_available() else device
    command = " ".join(["python", *sys.argv])
    summary = summarize(root, nproc, shape, batch)
    report(out, summary, command, f"{device}; torch {torch.__version__}")
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    app()
