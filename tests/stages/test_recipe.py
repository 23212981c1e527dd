"""A whole recipe on a tiny teacher: every stage, Stage III experts and merge, the report, resume by re-running."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import tiny_recipe
from xlstm_distill.stages.recipe import Pipeline, Recipe


def test_run_with_experts_and_report(tmp_path):
    experts = {"domains": {"a": {"a": 1.0}, "b": {"b": 1.0}}, "merge_weights": {"a": 3, "b": 1}}
    path = tiny_recipe(tmp_path, "run", experts=experts)
    Pipeline(Recipe.load(path)).run()
    out = tmp_path / "run"
    for part in ("student-init", "stage1/model", "stage2/model", "experts/a/stage2/model", "experts/b/stage2/model", "merged"):
        assert (out / part / "config.json").exists(), part
    # each expert trained on its own domain's targets only
    for name in ("a", "b"):
        manifest = json.loads((out / "experts" / name / "targets" / "manifest.json").read_text())
        assert manifest["complete"]
    a, b, m = (load_file(str(out / p / "model.safetensors")) for p in ("experts/a/stage2/model", "experts/b/stage2/model", "merged"))
    key = "model.layers.0.self_attn.gate_proj.bias"
    torch.testing.assert_close(m[key], 0.75 * a[key] + 0.25 * b[key])
    assert not torch.equal(a[key], b[key])
    assert AutoModelForCausalLM.from_pretrained(out / "merged") is not None
    report = json.loads((out / "report" / "held_out.json").read_text())["rows"]
    assert set(report) == {"converted (untrained)", "after Stage I", "after Stage II", "merged experts (Stage III)"}
    assert all({"kl_in_window", "kl_beyond_window", "tokens_beyond_window"} <= set(r) for r in report.values())
    assert (out / "report" / "held_out.png").stat().st_size > 0

    # re-running a finished recipe does no training again
    mtime = (out / "stage2" / "model" / "model.safetensors").stat().st_mtime
    Pipeline(Recipe.load(path)).run()
    assert (out / "stage2" / "model" / "model.safetensors").stat().st_mtime == mtime


def test_recipe_errors(tmp_path):
    path = tiny_recipe(tmp_path, "bad", colour="blue")
    with pytest.raises(ValueError, match="unknown recipe keys \\['colour'\\]"):
        Recipe.load(path)
    path = tiny_recipe(tmp_path, "ok")
    with pytest.raises(ValueError, match="section.key=value"):
        Recipe.load(path, ["distill.steps"])
    recipe = Recipe.load(path, ["distill.steps=7", "data.weights={a: 1.0, zzz: 1.0}"])
    assert recipe.distill["steps"] == 7
    with pytest.raises(ValueError, match="unknown sources \\['zzz'\\]"):
        Pipeline(recipe).sources(held_out=False)


def test_swa_student_skips_stage1_and_students_share_targets(tmp_path):
    """mixer=swa has no new parameters: Stage I passes the converted model on. Two recipes with the same data and
    targets.dir share one set of teacher targets."""
    shared = str(tmp_path / "shared-targets")
    for mixer in ("swa", "mlstm_swa"):
        path = tiny_recipe(tmp_path, mixer, student=dict(mixer=mixer, window_size=8, num_sink_tokens=2, chunk_size=16),
                           targets=dict(k=8, num_sequences=16, batch_size=4, dir=shared))
        Pipeline(Recipe.load(path)).distill()
        assert (tmp_path / mixer / "stage2" / "model" / "config.json").exists()
        assert not (tmp_path / mixer / "targets").exists()
    init = load_file(str(tmp_path / "swa" / "student-init" / "model.safetensors"))
    stage1 = load_file(str(tmp_path / "swa" / "stage1" / "model" / "model.safetensors"))
    assert init.keys() == stage1.keys() and all(torch.equal(init[k], stage1[k]) for k in init)
    assert json.loads((tmp_path / "shared-targets" / "manifest.json").read_text())["complete"]
