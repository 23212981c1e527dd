"""The memory settings for large students: bf16 parameters with torchao's AdamW8bit train and resume exactly, layer
activation checkpointing and the chunked KD loss give the same gradients as without them, bad settings are refused."""

import copy
import json
import shutil

import pytest
import torch

import xlstm_distill as xd
from helpers import SyntheticPacks, tiny_teacher
from xlstm_distill.stages.distill import (OnlineTargets, kd_loss, kd_loss_chunked, make_distill_step,
                                          set_stage2_trainable)
from xlstm_distill.stages.recipe import DistillSection
from xlstm_distill.stages.trainer import TrainConfig, Trainer, checkpoint_layers, prepare_model

MIXER = dict(window_size=2, num_sink_tokens=1, chunk_size=8)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def student_and_teacher(device="cpu"):
    teacher = tiny_teacher("llama", num_hidden_layers=3, logit_scale=5.0).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return xd.convert(teacher, xd.HybridConfig(mixer="mlstm_swa", **MIXER)).to(device), teacher


def skip_without_cuda(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def batch_with_targets(teacher, seed=0):
    """One packed batch with the teacher's top-16 targets (on the CPU)."""
    return {k: v.cpu() for k, v in next(iter(OnlineTargets(teacher, SyntheticPacks(seed=seed), k=16))).items()}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["renormalize", "residual"])
def test_chunked_kd_loss_equals_the_whole(mode, device):
    """Pieces of 7 positions (not a divisor of the 4 x 47 positions): same loss and same gradients, LM head and
    backbone included."""
    skip_without_cuda(device)
    student, teacher = student_and_teacher(device)
    batch = {k: v.to(device) for k, v in batch_with_targets(teacher).items()}
    whole, chunked = student.train(), copy.deepcopy(student).train()
    loss, metrics = kd_loss(whole(batch["input_ids"], document_ids=batch["document_ids"]).logits, batch, 0.9, 0.1, mode)
    loss.backward()
    hidden = chunked(batch["input_ids"], document_ids=batch["document_ids"], skip_logits=True).hidden_states[-1]
    loss_c, metrics_c = kd_loss_chunked(hidden, chunked.logits, batch, 0.9, 0.1, mode, chunk_tokens=7)
    loss_c.backward()
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-5)
    assert metrics_c["kl"] == pytest.approx(metrics["kl"], rel=1e-5) and metrics_c["ce"] == pytest.approx(metrics["ce"], rel=1e-5)
    ref, got = grads(whole), grads(chunked)
    assert set(ref) == set(got) and "lm_head.weight" in got
    tol = dict(atol=1e-6, rtol=1e-4) if device == "cpu" else dict(atol=1e-5, rtol=1e-3)  # GPU: other sum orders
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **tol, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_activation_checkpointing_gives_the_same_gradients(device):
    skip_without_cuda(device)
    student, teacher = student_and_teacher(device)
    batch = batch_with_targets(teacher)
    batch = {k: v.to(device) for k, v in batch.items()}
    plain, recomputed = student.train(), copy.deepcopy(student).train()
    assert checkpoint_layers(recomputed) == 3
    for model in (plain, recomputed):
        make_distill_step(model, 0.9, 0.1, "residual")(batch, 1.0)
    ref, got = grads(plain), grads(recomputed)
    assert set(ref) == set(got) and len(got) == len(list(student.parameters()))
    tol = dict(atol=1e-6, rtol=1e-5) if device == "cpu" else dict(atol=1e-5, rtol=1e-3)  # GPU: atomic sums
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **tol, msg=name)


def test_activation_checkpointing_recomputes_the_layers():
    """The checkpointed layers run their forward a second time in the backward pass (and only there)."""
    student, teacher = student_and_teacher()
    checkpoint_layers(student.train())
    calls = []
    handles = [layer.self_attn.register_forward_hook(lambda *a, i=i: calls.append(i))
               for i, layer in enumerate(student.model.layers)]
    batch = batch_with_targets(teacher)
    loss = student(batch["input_ids"], document_ids=batch["document_ids"]).logits.float().pow(2).mean()
    assert calls == [0, 1, 2]
    loss.backward()
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]
    for h in handles:
        h.remove()


def _bf16_run(tmp_path, steps, data=None, device="cpu", chunk=None, checkpointing=False):
    """Full fine-tuning in bfloat16 with AdamW8bit on a small repeated data set (so the loss can fall)."""
    student, teacher = student_and_teacher(device)
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup_steps=1, schedule="constant", checkpoint_every=2,
                      optimizer="adamw8bit", param_dtype="bfloat16", weight_decay=0.1)
    model = prepare_model(set_stage2_trainable(student, "full"), cfg)
    if checkpointing:
        checkpoint_layers(model)
    data = data or OnlineTargets(teacher, SyntheticPacks(tokens=_rows()), k=16)
    step = make_distill_step(model, 0.9, 0.1, "residual", loss_chunk_tokens=chunk)
    trainer = Trainer(model, step, data, cfg, tmp_path, "stage2")
    return trainer.fit(), trainer


def _rows():
    return SyntheticPacks(batch_size=8, seed=3).make(0)["input_ids"]  # 8 fixed rows: two batches used in turn


def test_bf16_adamw8bit_trains_and_resumes_exactly(tmp_path):
    """Four steps with checkpoints at 2 and 4; then a fresh process resumes from step 2 and must reach step 4's
    losses and weights bit for bit (the 8-bit moments, the step counts and the generators of the stochastic
    rounding all come back)."""
    pytest.importorskip("torchao")
    reference, trainer = _bf16_run(tmp_path, steps=4, chunk=64, checkpointing=True)
    model = trainer.model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    moments = {type(v).__name__ for state in trainer.optimizer.state.values() for v in state.values()}
    assert "OptimState8bit" in moments  # the large matrices' moments are 8-bit
    losses = [r["loss"] for r in reference]
    assert losses[2] < losses[0] and losses[3] < losses[1], losses  # the loss falls (two batches in turn)
    ckpts = tmp_path / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002")
    resumed, again = _bf16_run(tmp_path, steps=4, chunk=64, checkpointing=True)
    again = again.model
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == losses[2:]
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


@pytest.mark.cuda
def test_bf16_adamw8bit_trains_on_cuda(tmp_path):
    """The compiled torchao update on the GPU: the loss falls with every memory setting on."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("torchao")
    rows, _ = _bf16_run(tmp_path, steps=8, device="cuda", chunk=16, checkpointing=True)
    losses = [r["loss"] for r in rows]
    assert losses[-2] < losses[0] and losses[-1] < losses[1], losses


def test_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs optimizer: adamw8bit"):
        TrainConfig(param_dtype="bfloat16")
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="param_dtype='float16'"):
        TrainConfig(param_dtype="float16")
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        DistillSection(loss_chunk_tokens=0)
    student, teacher = student_and_teacher()
    cfg = TrainConfig(optimizer="adamw8bit", param_dtype="bfloat16")
    with pytest.raises(ValueError, match="prepare_model"):  # a float32 model under a bfloat16 setting
        Trainer(student, lambda *a: {}, SyntheticPacks(), cfg, tmp_path)
    with pytest.raises(ValueError, match="no transformers decoder layer"):
        checkpoint_layers(torch.nn.Linear(2, 2))


def test_no_checkpoints_when_checkpoint_every_is_zero(tmp_path):
    student, teacher = student_and_teacher()
    cfg = TrainConfig(steps=1, lr=1e-3, warmup_steps=1, checkpoint_every=0)
    model = set_stage2_trainable(student, "mixer")
    Trainer(model, make_distill_step(model, 0.9, 0.1, "residual"), OnlineTargets(teacher, SyntheticPacks(), k=16),
            cfg, tmp_path).fit()
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "metrics.jsonl").exists()
