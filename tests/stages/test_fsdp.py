"""Stage II under torchrun + FSDP2 (2 CPU processes, gloo) gives the single-process losses for the same global batch."""

import json
import shutil
import subprocess
import sys

import pytest

from helpers import tiny_recipe
from xlstm_distill.stages import Pipeline, Recipe


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


def _rows(path):
    return [json.loads(line) for line in (path / "stage2" / "metrics.jsonl").read_text().splitlines()]


def _losses(path):
    return [row["loss"] for row in _rows(path)]


def _distill(batch_size: int) -> dict:
    # CE + KL: a loss well above float rounding (the KL alone of a near-exact student is ~1e-7), so that processes
    # compare in relative terms
    return dict(steps=4, batch_size=batch_size, lr=1e-3, warmup_steps=1, checkpoint_every=2, gamma=0.9, beta=0.1)


@pytest.fixture(scope="module")
def runs(root):
    """Stage II of one recipe by 1 process (batch 4) and by 2 processes (batch 2 each), from the same Stage I."""
    Pipeline(Recipe.load(tiny_recipe(root, "single", distill=_distill(4)))).distill()  # Stage I and targets first
    tiny_recipe(root, "sharded", distill=_distill(2))  # 2 ranks x 2 = the same global batch of 4
    for part in ("student-init", "stage1", "targets"):
        shutil.copytree(root / "single" / part, root / "sharded" / part)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "xlstm_distill.cli",
           "distill", str(root / "sharded.yaml")]
    subprocess.run(cmd, check=True, timeout=600)
    return root


def test_two_process_fsdp_matches_single_process(runs):
    root = runs
    a, b = _losses(root / "single"), _losses(root / "sharded")
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=2e-3), (a, b)
    assert a[-1] < a[0]
    assert (root / "sharded" / "stage2" / "model" / "config.json").exists()


def _from_checkpoint(src, name: str, step: int):
    """A copy of run ``src`` rolled back to its step-``step`` checkpoint (final model removed)."""
    dst = src.parent / name
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "stage2" / "model")
    ckpts = dst / "stage2" / "checkpoints"
    for old in ckpts.glob("step_*"):
        if int(old.name.split("_")[1]) > step:
            shutil.rmtree(old)
    (ckpts / "latest").write_text(f"step_{step:08d}")
    return dst


def test_checkpoints_resume_across_world_sizes(runs):
    """Stage II saved by 2 processes continues on 1, and saved by 1 continues on 2, with the single-process losses
    (the model and optimizer reshard through torch.distributed.checkpoint, the target reader keeps a global position)."""
    root = runs
    full = _losses(root / "single")
    _from_checkpoint(root / "sharded", "two-to-one", 2)
    Pipeline(Recipe.load(tiny_recipe(root, "two-to-one", distill=_distill(4)))).distill()
    assert _losses(root / "two-to-one") == pytest.approx(full, rel=2e-3)
    _from_checkpoint(root / "single", "one-to-two", 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "xlstm_distill.cli",
           "distill", str(tiny_recipe(root, "one-to-two", distill=_distill(2)))]
    subprocess.run(cmd, check=True, timeout=600)
    assert _losses(root / "one-to-two") == pytest.approx(full, rel=2e-3)
    for src, dst in (("sharded", "two-to-one"), ("single", "one-to-two")):  # resumed: steps 1-2 were not re-run
        assert _rows(root / dst)[:2] == _rows(root / src)[:2]


def _distill_compiled(root, src: str, name: str, distill: dict, monkeypatch) -> list[tuple[str, dict]]:
    """Stage II with distill.compile of a recipe ``name`` that starts from run ``src``'s converted student, Stage I
    and targets, through torch.compile's aot_eager backend (CPU). Returns each compile call's model type and
    arguments."""
    import torch

    compile_, calls = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append((type(model).__name__, kwargs))
                        or compile_(model, backend="aot_eager", **kwargs))
    tiny_recipe(root, name, distill={**distill, "compile": True})
    for part in ("student-init", "stage1", "targets"):
        shutil.copytree(root / src / part, root / name / part)
    Pipeline(Recipe.load(root / f"{name}.yaml")).distill()
    return calls


def test_compiled_student_forward_gives_the_eager_losses(runs, monkeypatch):
    """distill.compile: Stage II through torch.compile(model) from the same Stage I and targets gives the same
    losses as the eager run (CPU, backend aot_eager: the recipe's plumbing and the traced graph; inductor's kernels
    are timed on CUDA by benchmarks/gpu_check.py --compile-model)."""
    root = runs
    calls = _distill_compiled(root, "single", "compiled", _distill(4), monkeypatch)
    assert calls == [("HybridForCausalLM", {"fullgraph": True})]
    assert _losses(root / "compiled") == pytest.approx(_losses(root / "single"), rel=1e-4)


def test_compiled_lora_student_gives_the_eager_losses(tmp_path, monkeypatch):
    """distill.compile with train: lora: the peft-wrapped student compiles as one graph (fullgraph) and trains with
    the eager LoRA run's losses (CPU, backend aot_eager)."""
    lora = {**_distill(4), "train": "lora", "lora_rank": 4}
    Pipeline(Recipe.load(tiny_recipe(tmp_path, "eager", distill=lora))).distill()
    calls = _distill_compiled(tmp_path, "eager", "compiled", lora, monkeypatch)
    assert calls == [("PeftModel", {"fullgraph": True})]  # the adapted model itself
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == 4 and eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_memory_settings_under_fsdp_give_the_plain_losses(runs):
    """Chunked KD loss (the LM head applied outside the root module's forward) and per-layer activation
    checkpointing, 1 process and 2 FSDP2 processes: the losses of the plain single-process run."""
    root = runs
    settings = dict(loss_chunk_tokens=48, activation_checkpointing=True)
    for name, batch in (("single-memory", 4), ("sharded-memory", 2)):
        tiny_recipe(root, name, distill={**_distill(batch), **settings})
        for part in ("student-init", "stage1", "targets"):
            shutil.copytree(root / "single" / part, root / name / part)
    Pipeline(Recipe.load(root / "single-memory.yaml")).distill()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "xlstm_distill.cli",
           "distill", str(root / "sharded-memory.yaml")]
    subprocess.run(cmd, check=True, timeout=600)
    plain = _losses(root / "single")
    assert _losses(root / "single-memory") == pytest.approx(plain, rel=1e-4)
    assert _losses(root / "sharded-memory") == pytest.approx(plain, rel=2e-3)
