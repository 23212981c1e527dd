"""`xlstm-distill bench` on CPU with tiny models: every point measured or recorded, result files written."""

import json

import torch
from typer.testing import CliRunner

import xlstm_distill as xd
from xlstm_distill.benchmarks import inference, mixer
from xlstm_distill.cli import app
from helpers import tiny_teacher

SETTINGS = dict(contexts=[16, 64], batches=[1, 2], decode_contexts=[40], decode_batches=[2], decode_steps=3,
                student_prefill=32, flat_steps=8, repeats=1, student=xd.HybridConfig(window_size=8, num_sink_tokens=2))


def test_bench_measures_both_models_and_keeps_student_memory_flat():
    config = tiny_teacher().config
    models = inference.random_models(config, SETTINGS["student"], torch.device("cpu"), torch.float32)
    seen = []
    rows = inference.run_bench(models, inference.BenchSettings(**SETTINGS), on_row=lambda r: seen.append(len(r)))
    timed = [r for r in rows if r["measure"] in ("prefill", "decode")]
    assert len(timed) == 2 * (4 + 1) and all(r["status"] == "ok" for r in timed)
    # results rewritten after every point and every memory reading (the student's decode point is followed by its 8
    # memory readings): a run cut short keeps what it measured
    assert seen == list(range(1, 19))
    assert [r["measure"] for r in rows[:2]] == ["decode", "prefill"]  # decode first: a cut run has both
    assert all(r["ttft_ms"] > 0 and r["prefill_tok_s"] > 0 for r in timed if r["measure"] == "prefill")
    memory = [r["allocated_gb"] for r in rows if r["measure"] == "memory"]
    assert len(memory) == 8 and max(memory) == min(memory)
    ratios = inference.speedups(rows)
    assert {(r["measure"], r["batch"], r["context"]) for r in ratios} == {
        ("prefill", 1, 16), ("prefill", 1, 64), ("prefill", 2, 16), ("prefill", 2, 64), ("decode", 2, 40)}
    decode = {r["model"]: r for r in timed if r["measure"] == "decode"}
    assert decode["teacher"]["cache_gb"] > 0 and decode["student"]["cache_gb"] > 0
    assert decode["student"]["prefilled"] == 32  # min(context 40, student_prefill 32)


def test_student_prefill_zero_prefills_the_context_and_memory_run_uses_the_timed_step(monkeypatch):
    """--student-prefill 0: the student's decode point prefills its whole context; the memory run decodes with the
    decode points' step (compiled when they are)."""
    built = []
    decoder = inference.StaticDecoder

    def recording(model, cache, use_graph=None, compile=False, **kwargs):
        built.append((cache.seen_tokens, compile))
        return decoder(model, cache, use_graph, compile, **kwargs)

    monkeypatch.setattr(inference, "StaticDecoder", recording)
    student = inference.random_models(tiny_teacher().config, SETTINGS["student"], torch.device("cpu"), torch.float32)
    settings = inference.BenchSettings(**{**SETTINGS, "contexts": [], "student_prefill": 0, "compile_decode": True})
    rows = inference.run_bench({"student": student["student"]}, settings)
    assert [r["prefilled"] for r in rows if r["measure"] == "decode"] == [40]
    assert built == [(40, True), (4096, True)] and len([r for r in rows if r["measure"] == "memory"]) == 8


def test_full_attention_heads_prefill_the_context_and_their_cache_grows_with_it():
    """A student keeping half of its KV heads: its decode points prefill the whole context, and the cache grows by
    those heads' K/V (2 of 4 KV heads, head_dim 16, float32) plus one position per token."""
    from xlstm_distill.cli.bench import _full_heads

    config = tiny_teacher().config
    heads = inference.spread_full_heads(2, 2, 0.5)
    assert heads == [[0, 0], [1, 0]] and len(inference.spread_full_heads(32, 8, 0.05)) == 13
    assert _full_heads("0:1,1:0", config) == [[0, 1], [1, 0]] and _full_heads("0.5", config) == heads
    student = xd.HybridConfig(window_size=8, num_sink_tokens=2, full_attention_heads=heads)
    models = inference.random_models(config, student, torch.device("cpu"), torch.float32)
    settings = inference.BenchSettings(**{**SETTINGS, "contexts": [], "decode_contexts": [24, 40], "flat_steps": 0,
                                          "student": student})
    rows = {r["context"]: r for r in inference.run_bench({"student": models["student"]}, settings)}
    assert [rows[c]["prefilled"] for c in (24, 40)] == [24, 40] and all(r["status"] == "ok" for r in rows.values())
    per_token = 2 * (2 * 2 * 16 * 4 + 8)  # batch 2 x (K and V of 2 heads + the slot's position)
    grown = (rows[40]["cache_gb"] - rows[24]["cache_gb"]) * 2**30
    assert abs(grown - 16 * per_token) < 1


def test_failed_points_are_recorded_and_larger_contexts_skipped(monkeypatch):
    """Out of memory at batch 1 from 64 tokens, a refused kernel launch at batch 2 from 128: both recorded."""
    def fake_prefill(model, batch, context, repeats):
        if batch == 1 and context >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if batch == 2 and context >= 128:
            raise RuntimeError("Triton Error [CUDA]: invalid argument\n(simulated)")
        return {"ttft_ms": 1.0, "prefill_tok_s": 1.0, "peak_gb": None}

    monkeypatch.setattr(inference, "prefill_point", fake_prefill)
    settings = inference.BenchSettings(**{**SETTINGS, "contexts": [16, 64, 128, 256], "batches": [1, 2],
                                          "decode_contexts": [], "flat_steps": 0})
    rows = inference.run_bench({"teacher": lambda: tiny_teacher()}, settings)
    skipped = "skipped (a smaller context failed)"
    assert [(r["batch"], r["status"]) for r in rows] == [
        (1, "ok"), (1, "oom"), (1, skipped), (1, skipped),
        (2, "ok"), (2, "ok"), (2, "failed: Triton Error [CUDA]: invalid argument"), (2, skipped)]


def test_max_prefill_tokens_leaves_out_large_points():
    assert inference._points([16, 64], [1, 4], max_tokens=64) == [(1, 16), (1, 64), (4, 16)]


def test_unknown_shape_is_refused():
    import pytest

    with pytest.raises(ValueError, match="Unknown shape"):
        inference.shape_config("gpt-5")


def _teacher_checkpoint(tmp_path):
    """A tiny teacher saved with a tokenizer (load_teacher wants one next to the weights)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    teacher_dir = tmp_path / "teacher"
    tiny_teacher().save_pretrained(teacher_dir)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))).save_pretrained(teacher_dir)
    return teacher_dir


def test_bench_command_on_a_checkpoint_writes_results(tmp_path, monkeypatch):
    teacher_dir = _teacher_checkpoint(tmp_path)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "bench", "--model", str(teacher_dir), "--out", str(out), "--contexts", "16,32", "--batches", "1",
        "--decode-contexts", "24", "--decode-batches", "1", "--decode-steps", "2", "--repeats", "1", "--window", "8",
        "--sinks", "2", "--dtype", "float32", "--mixer-contexts", "32,64"])
    assert result.exit_code == 0, result.output
    for name in ("inference", "speedup", "mixer"):
        assert (out / f"{name}.json").exists() and (out / f"{name}.md").exists()
    assert (out / "inference.png").exists() and (out / "mixer.png").exists() and (out / "mixer_profile.txt").exists()
    rows = json.loads((out / "inference.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"teacher", "student"}
    assert json.loads((out / "mixer.json").read_text())["rows"][1]["seq_len"] == 64
    profile = (out / "mixer_profile.txt").read_text()
    assert "## forward (no gradients), 32 tokens" in profile and "## forward + backward, 32 tokens" in profile
    assert "failed" not in profile

    # time only the student's 16-token prefill again, keeping every other row of the first run
    (out / "first.json").write_text((out / "inference.json").read_text())
    result = CliRunner().invoke(app, [
        "bench", "--model", str(teacher_dir), "--out", str(out), "--contexts", "16", "--batches", "1",
        "--decode-contexts", "", "--decode-batches", "1", "--repeats", "1", "--window", "8", "--sinks", "2",
        "--dtype", "float32", "--models", "student", "--reuse", str(out / "first.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "inference.json").read_text())["rows"]
    first = json.loads((out / "first.json").read_text())["rows"]
    fresh = [(r["model"], r["measure"], r["context"]) for r in rows if not r.get("reused")]
    assert fresh == [("student", "prefill", 16)]
    reused = sorted((r["model"], r["measure"], r.get("context") or 0) for r in rows if r.get("reused"))
    assert reused == sorted((r["model"], r["measure"], r.get("context") or 0) for r in first
                            if (r["model"], r["measure"], r.get("context")) != ("student", "prefill", 16))
    speedup = json.loads((out / "speedup.json").read_text())["rows"]
    assert sorted((r["measure"], r["context"]) for r in speedup) == [("decode", 24), ("prefill", 16), ("prefill", 32)]
    # a run stopped before its second point keeps the earlier row of that point
    (out / "second.json").write_text((out / "inference.json").read_text())
    timed = inference.prefill_point

    def stop_at_32(model, batch, context, repeats):
        if context == 32:
            raise KeyboardInterrupt  # the time limit of a device call
        return timed(model, batch, context, repeats)

    monkeypatch.setattr(inference, "prefill_point", stop_at_32)
    CliRunner().invoke(app, [
        "bench", "--model", str(teacher_dir), "--out", str(out), "--contexts", "16,32", "--batches", "1",
        "--decode-contexts", "", "--repeats", "1", "--window", "8", "--sinks", "2", "--dtype", "float32",
        "--models", "student", "--reuse", str(out / "second.json")])
    rows = json.loads((out / "inference.json").read_text())["rows"]
    student_prefill = {r["context"]: r.get("reused", False) for r in rows if r["model"] == "student"
                       and r["measure"] == "prefill"}
    assert student_prefill == {16: False, 32: True} and len(rows) == len(first)
    result = CliRunner().invoke(app, ["bench", "--model", str(teacher_dir), "--out", str(out), "--models", "gpt"])
    assert result.exit_code != 0 and "--models" in result.output
    result = CliRunner().invoke(app, ["bench", "--model", str(teacher_dir), "--out", str(out), "--student-prefill", "-1"])
    assert result.exit_code != 0 and "--student-prefill" in result.output


def test_hybrid_swa_mixer_with_full_window_equals_causal_attention():
    """The benchmarked mixer is the model's: SWA with a window covering the sequence is causal attention."""
    layer = mixer.hybrid_layer(4, 2, 16, xd.HybridConfig(mixer="swa", window_size=64, num_sink_tokens=0),
                               torch.device("cpu"), torch.float32)
    q, k, v, gates = mixer.mixer_inputs(layer, 2, 48, torch.device("cpu"), torch.float32)
    from xlstm_distill.modeling.cache import full_layout

    out = layer.mix(q, k, v, gates, full_layout(2, 48, torch.device("cpu")))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=layer.scaling)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_mixer_point_records_a_failing_kernel(monkeypatch):
    layer = mixer.hybrid_layer(4, 2, 16, xd.HybridConfig(window_size=8, num_sink_tokens=2), torch.device("cpu"),
                               torch.float32)

    def broken(*args, **kwargs):
        raise RuntimeError("Triton Error [CUDA]: invalid argument (simulated)\nmore")

    monkeypatch.setattr(layer, "mix", broken)
    row = mixer.mixer_point(layer, 1, 32, repeats=1)
    assert row["error"].startswith("hybrid_fwd_ms: Triton Error") and "; hybrid_fwd_bwd_ms: Triton" in row["error"]
    assert "hybrid_fwd_ms" not in row
    assert row["sdpa_fwd_ms"] > 0 and row["sdpa_fwd_bwd_ms"] > 0 and "fwd_bwd_speedup" not in row


def test_compiled_teacher_decode_step_equals_eager():
    """The teacher baseline's decode step through torch.compile (`--compile-decode`) gives the eager logits."""
    teacher = tiny_teacher().eval()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = []
    for compile in (False, True):
        decoder = inference.TeacherDecoder(teacher, batch=2, cache_len=16, start=0, use_graph=False, compile=compile)
        logits.append(torch.stack([decoder.step(ids[:, t:t + 1]).clone() for t in range(6)]))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_teacher_decode_steps_equal_full_forward():
    """The teacher baseline's static-cache decode, token by token from position 0, gives the full forward's logits,
    and a decoder started at position 5 (a decode point's cache length) writes its first keys there (with either
    transformers cache convention: cache_position, or the cache's own count since 5.24)."""
    teacher = tiny_teacher().eval()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    decoder = inference.TeacherDecoder(teacher, batch=2, cache_len=16, start=0, use_graph=False)
    steps = torch.stack([decoder.step(ids[:, t:t + 1]).clone() for t in range(6)], 1)  # (B, T, V)
    with torch.no_grad():
        full = teacher(ids).logits
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    late = inference.TeacherDecoder(teacher, batch=2, cache_len=16, start=5, use_graph=False)
    late.step(ids[:, :1])
    written = late.cache.layers[0].keys.abs().sum(dim=(0, 1, 3))  # (cache_len,)
    assert written[5] > 0 and written[:5].sum() == 0 and written[6:].sum() == 0


def test_bench_runs_the_decode_memory_readings_alone(tmp_path):
    """--flat-steps with no context points: only the student's memory readings (the long-decode runs); no decode
    batch size is refused."""
    teacher_dir, out = _teacher_checkpoint(tmp_path), tmp_path / "out"
    args = ["bench", "--model", str(teacher_dir), "--out", str(out), "--contexts", "", "--decode-contexts", "",
            "--flat-steps", "16", "--student-prefill", "8", "--window", "8", "--sinks", "2", "--dtype", "float32"]
    refused = CliRunner().invoke(app, args + ["--decode-batches", ""])
    assert refused.exit_code != 0 and "--flat-steps decodes at the largest of --decode-batches" in refused.output
    result = CliRunner().invoke(app, args + ["--decode-batches", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "inference.json").read_text())["rows"]
    assert [r["generated"] for r in rows] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert len({r["allocated_gb"] for r in rows}) == 1 and rows[0]["allocated_gb"] > 0


def test_a_model_with_nothing_to_measure_is_not_built():
    def teacher() -> torch.nn.Module:
        raise AssertionError("the teacher has no point to measure: it must not be built")

    student = inference.random_models(tiny_teacher().config, SETTINGS["student"], torch.device("cpu"), torch.float32)
    settings = inference.BenchSettings(**{**SETTINGS, "contexts": [], "decode_contexts": []})
    rows = inference.run_bench({"teacher": teacher, "student": student["student"]}, settings)
    assert [r["model"] for r in rows] == ["student"] * 8


def test_decode_points_record_their_bandwidth_floor():
    """Each decode point records the bytes a step reads (weights without the untied input embedding, the cache) and
    the step's floor at the given bandwidth; without a GPU and without --bandwidth there is no floor."""
    config = tiny_teacher().config
    models = inference.random_models(config, SETTINGS["student"], torch.device("cpu"), torch.float32)
    settings = inference.BenchSettings(**{**SETTINGS, "contexts": [], "flat_steps": 0, "bandwidth_gbs": 100.0})
    rows = {r["model"]: r for r in inference.run_bench(models, settings)}
    teacher = models["teacher"]()
    embedding = teacher.get_input_embeddings().weight
    weights = sum(p.numel() * 4 for p in teacher.parameters()) - embedding.numel() * 4
    assert inference.weight_bytes_per_step(teacher) == weights
    for name, row in rows.items():
        assert row["read_gb"] > row["cache_gb"] > 0 and row["bandwidth_source"] == "--bandwidth"
        assert abs(row["floor_ms"] - 1e3 * row["read_gb"] * 2**30 / 100e9) < 1e-9
        assert abs(row["of_floor"] - row["ms_per_token"] / row["floor_ms"]) < 1e-6
    assert inference.device_bandwidth(torch.device("cpu")) == (None, "none (not a GPU)")
