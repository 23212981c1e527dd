"""Stage I lowers every layer's MSE, Stage II lowers held-out KL, resume is exact, bad targets are refused."""

import itertools
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import xlstm_distill as xd
from helpers import SyntheticPacks, teacher_samples, tiny_teacher
from xlstm_distill.metrics import paired_kl_difference
from xlstm_distill.modeling.cache import full_layout
from xlstm_distill.stages.align import (AttentionTransfer, capture_attention, layer_losses, layer_mse, make_align_step,
                                        set_stage1_trainable)
from xlstm_distill.stages.common import compare_to_teacher, teacher_forward
from xlstm_distill.stages.distill import OnlineTargets, make_distill_step, set_stage2_trainable, sparse_kl
from xlstm_distill.stages.targets import TargetMismatchError, TargetShards, write_targets
from xlstm_distill.stages.trainer import TrainConfig, Trainer

MIXER = dict(window_size=2, num_sink_tokens=1, chunk_size=8)  # far from the teacher: there is something to learn


def student_and_teacher(mixer="mlstm_swa"):
    teacher = tiny_teacher("llama", num_hidden_layers=3, logit_scale=5.0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return xd.convert(teacher, xd.HybridConfig(mixer=mixer, **MIXER)), teacher


def test_teacher_forward_keeps_packed_documents_apart():
    teacher = tiny_teacher("llama")
    batch = SyntheticPacks(batch_size=1).make(0)
    with torch.no_grad():
        packed = teacher_forward(teacher, batch)
        ids = batch["input_ids"]
        separate = torch.cat([teacher(ids[:, a:b]).logits for a, b in ((0, 16), (16, 32), (32, 48))], 1)
    torch.testing.assert_close(packed, separate, atol=1e-4, rtol=1e-4)


def test_held_out_kl_is_split_at_the_window():
    """A window-only student equals the teacher wherever its window (+ sinks) covers the whole document prefix:
    the KL there is 0; beyond it is not; the split averages back to the total. Packed documents restart positions."""
    student, teacher = student_and_teacher("swa")  # window 2 + 1 sink: positions 0..2 of each document are exact
    batches = [SyntheticPacks(seed=5).make(i) for i in range(2)]
    result = compare_to_teacher(student, teacher, batches)
    assert result["kl_in_window"] < 1e-6 < 1e-3 < result["kl_beyond_window"]
    inside = result["tokens"] - result["tokens_beyond_window"]
    assert inside == 2 * 4 * 3 * 3  # 2 batches x 4 rows x 3 documents x 3 positions (all trained: none is a last token)
    beyond = result["tokens_beyond_window"]
    total = (result["kl_in_window"] * inside + result["kl_beyond_window"] * beyond) / result["tokens"]
    assert abs(total - result["kl"]) < 1e-6
    full = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=64, num_sink_tokens=1))
    assert compare_to_teacher(full, teacher, batches)["tokens_beyond_window"] == 0  # the window covers everything
    # per sequence: one entry per row of every batch, adding up to the pooled numbers
    for key, tokens in (("kl", result["tokens"]), ("kl_beyond_window", beyond)):
        rows = result["per_sequence"][key]
        assert len(rows["sum"]) == 2 * 4 and sum(rows["tokens"]) == tokens
        assert sum(rows["sum"]) / tokens == pytest.approx(result[key], rel=1e-6)
    same = paired_kl_difference(result["per_sequence"]["kl"], result["per_sequence"]["kl"])
    assert same == {"difference": 0.0, "stderr": 0.0, "sequences": 8}


def test_stage1_loss_can_weight_the_positions_beyond_the_window():
    """Inside the window's reach (window 2 + 1 sink from each document start) the window-only mixer reproduces the
    teacher attention, so all its error lies beyond; weighting those positions w rescales the mean accordingly."""
    student, teacher = student_and_teacher("swa")
    batch = SyntheticPacks(seed=3).make(0)  # 4 rows x 3 documents of 16 tokens: 36 positions inside, 156 beyond
    plain = [loss.mse for loss in layer_losses(student, teacher, batch)]
    weighted = [loss.mse for loss in layer_losses(student, teacher, batch, beyond_window_weight=10.0)]
    with torch.no_grad(), capture_attention(teacher) as records:
        teacher_forward(teacher, batch)
    for a, b in zip(plain, weighted):
        assert float(a) > 1e-6
        torch.testing.assert_close(b * (36 + 10 * 156) / 10, a * (36 + 156), rtol=1e-5, atol=0)
    layout = full_layout(4, 48, torch.device("cpu"), document_ids=batch["document_ids"])
    out, _ = student.model.layers[0].self_attn(hidden_states=records[0]["input"],
                                               position_embeddings=records[0]["rope"], layout=layout)
    torch.testing.assert_close(plain[0], F.mse_loss(out, records[0]["output"]))  # weight 1: the plain MSE


def test_stage1_lowers_every_layer_mse(tmp_path):
    student, teacher = student_and_teacher()
    trainable = set_stage1_trainable(student)
    assert trainable and all("feature_map" in n or "gate_proj" in n for n in trainable)
    held_out = [SyntheticPacks(seed=99).make(0)]
    before = layer_mse(student, teacher, held_out)
    cfg = TrainConfig(steps=40, lr=5e-2, warmup_steps=3, checkpoint_every=100)
    frozen = student.model.layers[0].self_attn.q_proj.weight.clone()
    Trainer(student, make_align_step(student, teacher), SyntheticPacks(), cfg, tmp_path, "align").fit()
    after = layer_mse(student, teacher, held_out)
    assert all(a < 0.97 * b for a, b in zip(after, before)), (before, after)
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight, frozen)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and "layer_02_mse" in rows[0]


def test_stage1_attention_transfer_teaches_the_memory_the_teachers_weights(tmp_path):
    """With ``attention_transfer``, each layer's loss is its MSE plus the weight times the transfer cross-entropy
    (logged per layer), the queries are the same for the same step and call, and training lowers the held-out
    cross-entropy, which the MSE alone raises."""
    def held_out_transfer(student, teacher):
        losses = layer_losses(student, teacher, SyntheticPacks(seed=99).make(0), transfer=AttentionTransfer(1.0, 16),
                              key="held-out")
        return sum(loss.transfer.item() for loss in losses)

    results = {}
    for weight in (0.0, 0.05):
        student, teacher = student_and_teacher()
        student.config.window_size = 2
        set_stage1_trainable(student)
        start = held_out_transfer(student, teacher)
        step = make_align_step(student, teacher, transfer=AttentionTransfer(weight, 16, seed=1))
        if weight:
            metrics = step(SyntheticPacks().make(0), 1.0, 0)
            transfer = sum(v for k, v in metrics.items() if k.endswith("_transfer"))
            mse = sum(v for k, v in metrics.items() if k.endswith("_mse"))
            assert "layer_02_transfer" in metrics and transfer > 0
            assert metrics["loss"] == pytest.approx(mse + weight * transfer)
        cfg = TrainConfig(steps=30, lr=5e-2, warmup_steps=3, checkpoint_every=100)
        Trainer(student, step, SyntheticPacks(), cfg, tmp_path / str(weight), "align").fit()
        results[weight] = (start, held_out_transfer(student, teacher))
    assert results[0.0][0] == pytest.approx(results[0.05][0])  # the same start and the same held-out queries
    # the tiny teacher's attention is nearly even, so the cross-entropy's floor (its entropy) lies just below the start;
    # the MSE alone moves the memory away from the teacher's weights, the transfer toward them
    assert results[0.05][1] < results[0.05][0] and results[0.05][1] < results[0.0][1] - 0.05, results
    sample = AttentionTransfer(1.0, 8, seed=3)
    layout = full_layout(2, 30, torch.device("cpu"))
    queries, weights = sample.sample(layout, 10, "4/0")
    assert torch.equal(queries, sample.sample(layout, 10, "4/0")[0]) and bool((queries >= 10).all())
    assert not torch.equal(queries, sample.sample(layout, 10, "4/1")[0]) and bool((weights == 1).all())
    with pytest.raises(ValueError, match="attention_transfer"):
        xd.stages.recipe.AlignSection(attention_transfer=-1.0)


def test_stage1_with_a_full_attention_layer_trains_the_others():
    """A layer whose heads all keep full attention is the teacher's (MSE 0, nothing to train); the other layers'
    kept heads are exact and their mixer heads train as before."""
    teacher = tiny_teacher(num_hidden_layers=3)
    student = xd.convert(teacher, xd.HybridConfig(full_attention_layers=[1], full_attention_heads=[[0, 0]], **MIXER))
    set_stage1_trainable(student)
    step = make_align_step(student, teacher)
    metrics = step(SyntheticPacks().make(0), 1.0)
    assert metrics["layer_01_mse"] < 1e-10 and metrics["layer_00_mse"] > 1e-6 and metrics["layer_02_mse"] > 1e-6
    assert student.model.layers[1].self_attn.gate_proj.weight.grad is None
    assert student.model.layers[0].self_attn.gate_proj.weight.grad.abs().sum() > 0


def test_compiled_stage1_step_matches_eager_with_one_graph_for_all_layers(monkeypatch):
    """align.compile: every layer's mixer + MSE through one compiled function (CPU, backend aot_eager): the same
    per-layer losses and gradients as eager, one graph for all layers, and a second step (other documents) compiles
    nothing new."""
    from torch._dynamo.utils import counters

    from xlstm_distill.stages import align

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend="aot_eager", **kwargs))
    align._compiled_mixer_mse.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    student, teacher = student_and_teacher()
    set_stage1_trainable(student)
    results = []
    for compiled in (False, True):
        step = make_align_step(student, teacher, compiled=compiled)
        rows = []
        for n in range(2):
            student.zero_grad()
            with torch._dynamo.config.patch(error_on_recompile=compiled and n > 0):
                metrics = step(SyntheticPacks(seed=n).make(0), 1.0)
            rows.append((metrics, [p.grad.clone() for p in student.parameters() if p.grad is not None]))
        results.append(rows)
    assert counters["stats"]["unique_graphs"] == 1  # three layers, two steps: one graph (no mask to build on CPU)
    for (eager, eager_grads), (fast, fast_grads) in zip(*results):
        assert eager.keys() == fast.keys() and len(eager_grads) == len(fast_grads) > 0
        for key in eager:
            assert fast[key] == pytest.approx(eager[key], rel=1e-5), key
        for a, b in zip(fast_grads, eager_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    align._compiled_mixer_mse.cache_clear()  # later tests compile with the real backend


def _stage2(student, teacher, tmp_path, steps, data=None, name="distill", gamma=0.9, beta=0.1):
    model = set_stage2_trainable(student, "full")
    data = data or OnlineTargets(teacher, SyntheticPacks(), k=16)
    cfg = TrainConfig(steps=steps, lr=3e-4, warmup_steps=2, schedule="constant", weight_decay=0.1, checkpoint_every=4)
    return Trainer(model, make_distill_step(model, gamma, beta, "renormalize"), data, cfg, tmp_path, name).fit()


def test_stage2_lowers_held_out_kl(tmp_path):
    """On teacher-sampled data, Stage II (mixer parameters, the structural part) moves the student to the teacher.

    Full fine-tuning of a 3-layer random model on a few hundred tokens mostly memorizes them, so the held-out
    check trains the mixer; full fine-tuning is covered by the resume test and the SmolLM2 runs."""
    student, teacher = student_and_teacher()
    train, held = teacher_samples(teacher, 64), teacher_samples(teacher, 8, seed=1)
    held_out = [SyntheticPacks(tokens=held).make(i) for i in range(2)]
    before = compare_to_teacher(student, teacher, held_out)["kl"]
    model = set_stage2_trainable(student, "mixer")
    cfg = TrainConfig(steps=60, lr=2e-2, warmup_steps=2, schedule="constant", checkpoint_every=100)
    data = OnlineTargets(teacher, SyntheticPacks(tokens=train), k=16)
    Trainer(model, make_distill_step(model, 0.9, 0.1, "renormalize"), data, cfg, tmp_path, "distill").fit()
    after = compare_to_teacher(student, teacher, held_out)["kl"]
    assert after < 0.95 * before, (before, after)


def test_resume_after_kill_reproduces_losses(tmp_path):
    student, teacher = student_and_teacher()
    reference = _stage2(student, teacher, tmp_path / "a", steps=10)

    student, teacher = student_and_teacher()
    with pytest.raises(RuntimeError):  # "killed": the data ends after 6 steps; the checkpoint at step 4 remains
        _stage2(student, teacher, tmp_path / "b", steps=10, data=OnlineTargets(teacher, SyntheticPacks(limit=6), k=16))
    student, teacher = student_and_teacher()  # a fresh process: new model, resumes from step 4
    resumed = _stage2(student, teacher, tmp_path / "b", steps=10)
    assert [r["step"] for r in resumed] == list(range(5, 11))
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 11))  # the killed run's rows after its checkpoint were replaced
    for ref, res in zip(reference[4:], resumed):
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)


def test_sparse_kl_modes():
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(2, 5, 50, generator=g), torch.randn(2, 5, 50, generator=g) * 2
    ids = t_logits.topk(50, -1).indices
    logp_t = torch.log_softmax(t_logits, -1).gather(-1, ids)
    full = (logp_t.exp() * (logp_t - torch.log_softmax(s_logits, -1).gather(-1, ids))).sum(-1)
    for mode in ("renormalize", "residual"):  # with k = vocabulary both equal the exact KL
        torch.testing.assert_close(sparse_kl(s_logits, ids, logp_t, mode), full, atol=1e-4, rtol=1e-4)
    assert (sparse_kl(t_logits, ids[..., :8], logp_t[..., :8], "renormalize")).abs().max() < 1e-5
    assert (sparse_kl(t_logits, ids[..., :8], logp_t[..., :8], "residual")).abs().max() < 1e-4
    with pytest.raises(ValueError, match="topk_mode"):
        sparse_kl(s_logits, ids, logp_t, "nope")


def _write(teacher, path, k=8, num_sequences=6, encoding="compact"):
    return write_targets(teacher, SyntheticPacks(batch_size=2), path, k=k, num_sequences=num_sequences,
                         teacher_name="tiny", tok_hash="abc", seq_len=48, sequences_per_shard=4, encoding=encoding)


@pytest.mark.parametrize("encoding", ["compact", "exact"])
def test_targets_round_trip_and_refusals(tmp_path, encoding):
    teacher = tiny_teacher("llama")
    manifest = _write(teacher, tmp_path / "t", k=12, encoding=encoding)
    assert manifest["complete"] and [s["num_sequences"] for s in manifest["shards"]] == [4, 2]
    reader = TargetShards(tmp_path / "t", batch_size=3, expect={"k": 12, "tokenizer_hash": "abc", "seq_len": 48})
    batch = next(iter(reader))
    assert batch["topk_ids"].shape == (3, 48, 12) and reader.encoding == encoding
    with torch.no_grad():  # stored targets are the teacher's top-k for the stored tokens (compared in id order)
        logits = teacher_forward(teacher, batch)
    top = torch.log_softmax(logits, -1).topk(12, -1)
    by_id, stored_by_id = top.indices.sort(-1), batch["topk_ids"].long().sort(-1)
    assert torch.equal(by_id.values, stored_by_id.values)
    torch.testing.assert_close(batch["topk_logprobs"].float().gather(-1, stored_by_id.indices),
                               top.values.gather(-1, by_id.indices), atol=0.25 if encoding == "compact" else 2e-2,
                               rtol=1e-2)

    with pytest.raises(TargetMismatchError, match="k=12.*needs 16"):
        TargetShards(tmp_path / "t", batch_size=2, expect={"k": 16})
    with pytest.raises(TargetMismatchError, match="tokenizer_hash"):
        TargetShards(tmp_path / "t", batch_size=2, expect={"tokenizer_hash": "other"})
    shard = tmp_path / "t" / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TargetMismatchError, match="corrupt"):
        next(iter(TargetShards(tmp_path / "t", batch_size=2, seed=1)))
    with pytest.raises(FileNotFoundError, match="xlstm-distill targets"):
        TargetShards(tmp_path / "missing", batch_size=2)


def test_targets_resume_after_partial_write(tmp_path):
    teacher = tiny_teacher("llama")
    full = _write(teacher, tmp_path / "full")
    partial = _write(teacher, tmp_path / "part")
    manifest = json.loads((tmp_path / "part" / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False  # as if killed after shard 0
    (tmp_path / "part" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TargetMismatchError, match="incomplete"):
        TargetShards(tmp_path / "part", batch_size=2)
    resumed = _write(teacher, tmp_path / "part")
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]] == [s["sha256"] for s in partial["shards"]]
    shutil.rmtree(tmp_path / "full")


@pytest.mark.parametrize("mode", ["mixer", "lora"])
def test_stage2_ablation_modes_train_only_their_parameters(mode):
    student, teacher = student_and_teacher()
    frozen = student.model.layers[0].mlp.down_proj.weight.detach().clone()
    model = set_stage2_trainable(student, mode, lora_rank=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    new = student.new_parameter_names()
    assert all(any(n.endswith(x) for x in new) or "lora_" in n for n in names)
    assert any("lora_" in n for n in names) == (mode == "lora")
    batch = next(iter(OnlineTargets(teacher, SyntheticPacks(), k=16)))
    step = make_distill_step(model, 0.9, 0.1, "renormalize")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        losses.append(step(batch, 1.0)["loss"])
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    assert torch.equal(student.model.layers[0].mlp.down_proj.weight, frozen)
    if mode == "lora":  # the saved model folds the adapters in: same logits as the adapted model
        with torch.no_grad():
            adapted = model(batch["input_ids"]).logits
            merged = model.merge_and_unload()
            assert isinstance(merged, xd.HybridForCausalLM)
            torch.testing.assert_close(merged(batch["input_ids"]).logits, adapted, atol=1e-4, rtol=1e-4)


class _Pairs:
    """Two consecutive SyntheticPacks batches of 2 concatenated into one batch of 4."""

    def __init__(self) -> None:
        self.inner = SyntheticPacks(batch_size=2)

    def __iter__(self):
        it = iter(self.inner)
        while True:
            a, b = next(it), next(it)
            yield {k: torch.cat([a[k], b[k]]) for k in a}

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    runs = []
    for accum, data in ((2, SyntheticPacks(batch_size=2)), (1, _Pairs())):
        student, teacher = student_and_teacher()
        model = set_stage2_trainable(student, "full")
        cfg = TrainConfig(steps=3, lr=1e-3, warmup_steps=1, grad_accum=accum, checkpoint_every=100)
        rows = Trainer(model, make_distill_step(model, 0.9, 0.1, "renormalize"), OnlineTargets(teacher, data, k=16),
                       cfg, tmp_path / str(accum), "distill").fit()
        runs.append([r["loss"] for r in rows])
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


@pytest.mark.parametrize("num_sequences", [6, 7])  # 7: an epoch is not a whole number of global steps
def test_target_reader_resumes_on_another_world_size(tmp_path, num_sequences):
    """A position saved by 2 ranks continues on 1 (and back): every global step sees the same sequences."""
    _write(tiny_teacher("llama"), tmp_path / "t", num_sequences=num_sequences)

    def global_steps(readers, n):
        its = [iter(r) for r in readers]
        return [sorted(map(tuple, torch.cat([next(it)["input_ids"][:, :4] for it in its]).tolist())) for _ in range(n)]

    single = global_steps([TargetShards(tmp_path / "t", batch_size=2, seed=3)], 7)  # crosses an epoch
    two = [TargetShards(tmp_path / "t", batch_size=1, seed=3, rank=r, world_size=2) for r in range(2)]
    assert global_steps(two, 2) == single[:2]
    one = TargetShards(tmp_path / "t", batch_size=2, seed=3)
    one.load_state_dict(two[0].state_dict())
    assert global_steps([one], 3) == single[2:5]
    back = [TargetShards(tmp_path / "t", batch_size=1, seed=3, rank=r, world_size=2) for r in range(2)]
    for reader in back:
        reader.load_state_dict(one.state_dict())
    assert global_steps(back, 2) == single[5:7]
    with pytest.raises(ValueError, match="global batch"):
        TargetShards(tmp_path / "t", batch_size=2, seed=3, rank=0, world_size=2).load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match="older xlstm-distill"):
        one.load_state_dict({"epoch": 0, "position": 1, "seed": 3, "world_size": 1})


def test_scheduled_window_dropout_shortens_the_window_on_a_falling_share_of_batches():
    """Stage I's window dropout: deterministic in (seed, step, batch), a share that falls linearly from the rate to 0,
    the shortened window during the step only (the model keeps its own), and the step's metrics say which was used."""
    from xlstm_distill.stages.align import WindowDropout, make_align_step, window_of

    dropout = WindowDropout(rate=1.0, window=4, steps=10, seed=0)
    assert dropout.window_at(0, 0, 16) == 4 and dropout.window_at(10, 0, 16) == 16
    assert WindowDropout(1.0, None, 10).window_at(0, 0, 16) == 4  # a quarter by default
    share = [sum(WindowDropout(0.8, 4, 100, seed).window_at(s, 0, 16) == 4 for seed in range(200)) / 200
             for s in (0, 50, 99)]
    assert abs(share[0] - 0.8) < 0.1 and abs(share[1] - 0.4) < 0.1 and share[2] < 0.05
    assert [dropout.window_at(3, c, 16) for c in range(4)] == [dropout.window_at(3, c, 16) for c in range(4)]

    teacher = tiny_teacher()
    student = xd.convert(teacher, xd.HybridConfig(window_size=8, num_sink_tokens=2, chunk_size=16))
    set_stage1_trainable(student)
    batch = SyntheticPacks().make(0)
    step = make_align_step(student, teacher, dropout=WindowDropout(1.0, 2, 10))
    shortened = step(batch, 1.0, 0)
    assert shortened["window"] == 2.0 and student.model.layers[0].self_attn.window == 8
    with window_of(student, 2):
        assert all(layer.self_attn.window == 2 for layer in student.model.layers)
        reference = sum(layer_losses_values(student, teacher, batch))
    assert abs(shortened["loss"] - reference) < 1e-5
    assert step(batch, 1.0, 10)["window"] == 8.0  # the schedule has reached 0


def layer_losses_values(student, teacher, batch):
    from xlstm_distill.stages.align import layer_losses

    return [loss.mse.item() for loss in layer_losses(student, teacher, batch)]


def test_prefetched_targets_are_the_readers_batches_and_resume_after_the_last_one_taken(tmp_path):
    """Stage II's targets read ahead in a thread: the same batches in the same order as the plain reader (across an
    epoch), a state that counts only the batches handed out (the thread has read further), exact resume from it, and
    the reader's refusal of a corrupt shard raised in the loop."""
    import threading
    import time

    from xlstm_distill.stages.trainer import Prefetched

    manifest = _write(tiny_teacher("llama"), tmp_path / "t", encoding="compact")
    plain = iter(TargetShards(tmp_path / "t", batch_size=2, seed=3))
    expected = [next(plain) for _ in range(6)]  # 6 sequences: 3 batches an epoch, two epochs

    ahead = Prefetched(TargetShards(tmp_path / "t", batch_size=2, seed=3), depth=3)
    batches = iter(ahead)
    taken = [next(batches) for _ in range(2)]
    time.sleep(0.5)  # the thread reads up to 3 batches further
    state = ahead.state_dict()
    assert state == {"epoch": 0, "consumed": 4, "seed": 3, "global_batch": 2}
    resumed = Prefetched(TargetShards(tmp_path / "t", batch_size=2, seed=3))
    resumed.load_state_dict(state)
    reading = iter(resumed)
    taken += [next(reading) for _ in range(4)]
    reading.close()
    for got, want in zip(taken, expected, strict=True):
        assert all(torch.equal(got[key], want[key]) for key in want)
    with pytest.raises(RuntimeError, match="reading ahead"):
        ahead.load_state_dict(state)
    batches.close()  # what the trainer does at its last step: the reader thread ends with the iteration
    assert not any(t.name == "prefetch" for t in threading.enumerate())
    again = iter(ahead)  # a new iteration continues after the last batch taken, not after what was read ahead
    again = [next(again) for _ in range(4)]
    for got, want in zip(again, expected[2:], strict=True):
        assert all(torch.equal(got[key], want[key]) for key in want)

    shard = tmp_path / "t" / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    reading = iter(Prefetched(TargetShards(tmp_path / "t", batch_size=2, seed=0)))
    with pytest.raises(TargetMismatchError, match="corrupt"):
        for _ in range(3):  # both shards within an epoch
            next(reading)


def test_training_on_prefetched_targets_ends_the_reader_thread(tmp_path):
    """A thread left reading inside torch when the interpreter exits aborts the process; the trainer closes its data
    iteration when it stops, also when a step fails."""
    import threading

    from xlstm_distill.stages.trainer import Prefetched

    student, teacher = student_and_teacher()
    _write(teacher, tmp_path / "t", num_sequences=8)
    data = Prefetched(TargetShards(tmp_path / "t", batch_size=2, seed=0))
    _stage2(student, teacher, tmp_path / "run", steps=3, data=data)  # 3 of 4 batches: the thread had more to read
    assert not any(t.name == "prefetch" for t in threading.enumerate())

    model = set_stage2_trainable(student, "full")
    cfg = TrainConfig(steps=3, checkpoint_every=0)

    def failing_step(batch, scale, step):
        raise ValueError("a failing step")

    with pytest.raises(ValueError, match="a failing step"):
        Trainer(model, failing_step, Prefetched(TargetShards(tmp_path / "t", batch_size=2, seed=0)), cfg,
                tmp_path / "fail", "distill").fit()
    assert not any(t.name == "prefetch" for t in threading.enumerate())
