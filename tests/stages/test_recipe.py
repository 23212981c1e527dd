"""A whole recipe on a tiny teacher: every stage, Stage III experts and merge, the report, resume by re-running."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import tiny_recipe
from xlstm_distill.stages import Pipeline, Recipe, RunContext
from xlstm_distill.stages.targets import TargetShards


def test_run_with_experts_and_report(tmp_path):
    experts = {"domains": {"a": {"a": 1.0}, "b": {"b": 1.0}}, "merge_weights": {"a": 3, "b": 1}}
    evaluate = {"held_out_sequences": 2, "batch_size": 2, "long_documents": 2, "long_length": 16}
    path = tiny_recipe(tmp_path, "run", experts=experts, evaluate=evaluate)
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
    held_out = json.loads((out / "report" / "held_out.json").read_text())
    report = held_out["rows"]
    assert set(report) == {"converted (untrained)", "after Stage I", "after Stage II", "merged experts (Stage III)",
                           "merged experts, uniform (Stage III)"}
    from xlstm_distill.stages.report import fingerprint  # the held-out tokens' identity, for pairing across runs
    assert held_out["data"] == fingerprint(RunContext(Recipe.load(path)).held_out_batches())
    assert all({"kl_in_window", "kl_beyond_window", "tokens_beyond_window"} <= set(r) for r in report.values())
    assert (out / "report" / "held_out.png").stat().st_size > 0
    by_position = json.loads((out / "report" / "by_position.json").read_text())  # long held-out documents
    assert (by_position["documents"], by_position["bucket"]) == (2, 8) and set(by_position["rows"]) == set(report)
    assert by_position["rows"]["after Stage II"]["tokens"] == [16.0, 14.0]
    gates = json.loads((out / "report" / "output_gates.json").read_text())
    assert len(gates["after Stage I"]["beyond"]) == 2  # layers x heads
    check_domain_report(path, out)

    # re-running a finished recipe does no training again
    mtime = (out / "stage2" / "model" / "model.safetensors").stat().st_mtime
    Pipeline(Recipe.load(path)).run()
    assert (out / "stage2" / "model" / "model.safetensors").stat().st_mtime == mtime


def check_domain_report(path, out):
    """Stage III per domain: every model on every domain's held-out documents, the numbers those of
    compare_to_teacher on that domain's held-out batches, each merged model - generalist paired per domain; the
    uniform merge of the same experts written beside the given weights' merge."""
    from xlstm_distill.stages.common import compare_to_teacher
    from xlstm_distill.stages.domains import GENERALIST

    report = json.loads((out / "report" / "domains.json").read_text())
    labels = ["expert a", "expert b", "merged (given weights)", "merged (uniform)", GENERALIST]
    info = json.loads((out / "merged-uniform" / "merge_info.json").read_text())
    assert info["normalized_weights"] == [0.5, 0.5] and "sweep" not in info
    assert list(report["models"]) == labels and set(report["domains"]) == {"a", "b"}
    ctx = RunContext(Recipe.load(path))
    for domain, d in report["domains"].items():
        assert list(d["rows"]) == labels and d["data_weights"] == {domain: 1.0}
        batches = ctx.for_expert(domain, {domain: 1.0}).held_out_batches()
        generalist = compare_to_teacher(ctx.load_student(out / "stage2" / "model").eval(), ctx.teacher, batches)
        assert d["rows"][GENERALIST]["kl"] == pytest.approx(generalist["kl"], rel=1e-5)
        assert d["rows"][GENERALIST]["student_ppl"] == pytest.approx(generalist["student_ppl"], rel=1e-5)
        assert list(d["merged - generalist"]) == ["merged (given weights)", "merged (uniform)"]
        for label, diff in d["merged - generalist"].items():
            assert diff["difference"] == pytest.approx(d["rows"][label]["kl"] - generalist["kl"], rel=1e-4, abs=1e-7)
            assert diff["stderr"] > 0
    rows = report["domains"]["a"]["rows"]  # the two merges differ
    assert rows["merged (given weights)"]["kl"] != rows["merged (uniform)"]["kl"]
    # the domains' held-out documents differ, so do the measurements
    assert report["domains"]["a"]["rows"][GENERALIST]["kl"] != report["domains"]["b"]["rows"][GENERALIST]["kl"]
    markdown = (out / "report" / "domains.md").read_text()
    assert all(f"| {label} |" in markdown for label in labels) and "| teacher (" in markdown
    assert markdown.count("- generalist KL") == 4
    assert (out / "report" / "domains.png").stat().st_size > 0


def test_recipe_errors(tmp_path):
    path = tiny_recipe(tmp_path, "bad", colour="blue")
    with pytest.raises(ValueError, match="unknown key\\(s\\) colour; valid keys of recipe: name, out_dir"):
        Recipe.load(path)
    path = tiny_recipe(tmp_path, "ok")
    with pytest.raises(ValueError, match="section.key=value"):
        Recipe.load(path, ["distill.steps"])
    recipe = Recipe.load(path, ["distill.steps=7", "data.weights={a: 1.0, zzz: 1.0}", "distill.lr=1e-5"])
    assert recipe.distill.steps == 7 and recipe.distill.lr == 1e-5 and isinstance(recipe.distill.lr, float)
    with pytest.raises(ValueError, match="unknown sources \\['zzz'\\]"):
        RunContext(recipe).sources("train")


@pytest.mark.parametrize("override, message", [
    ("distill.stepz=5", "distill: unknown key\\(s\\) stepz; valid keys of distill: steps, lr, min_lr"),
    ("align.beyond_window=2", "align: unknown key\\(s\\) beyond_window; valid keys of align: .*beyond_window_weight"),
    ("student.windw=8", "student: unknown key\\(s\\) windw; valid keys of student: mixer, window_size"),
    ("student.kernels.copysinks=none", "kernels: unknown key\\(s\\) copysinks; valid keys of kernels: mlstm, swa"),
    ("student.kernels.copy_sinks=some", "kernels.copy_sinks='some': choose one of rows, all, none"),
    ("student.mixer=mamba", "mixer='mamba' is not supported"),
    ("distill.steps=many", "distill.steps must be a number, got 'many'"),
    ("distill.steps=2.5", "distill.steps must be an integer, got 2.5"),
    ("distill.compile=1", "distill.compile must be true or false, got 1"),
    ("distill.topk_mode=top", "distill.topk_mode='top': choose one of renormalize, residual"),
    ("targets.mode=later", "targets.mode='later': choose one of offline, online"),
    ("evaluate.tasks=xd_piqa", "evaluate.tasks must be a list, got 'xd_piqa'"),
    ("experts.domains={}", "experts.domains must name at least one expert"),
    ("experts={domains: {a: {a: 1}}, merge_weights: {a: 1}, sweep: {}}", "merge_weights and experts.sweep both"),
    ("experts={domains: {a: {a: 1}}, sweep: {objective: best}}", "objective='best': choose one of mean, worst"),
])
def test_bad_recipe_values_are_refused_at_load_naming_the_key(tmp_path, override, message):
    """Every key is checked when the recipe is read (before any stage runs): an unknown key names itself and the
    valid keys of its section; a bad value names the key and what it must be."""
    path = tiny_recipe(tmp_path, "ok")
    with pytest.raises(ValueError, match=message):
        Recipe.load(path, [override])


def test_recipe_defaults_live_in_the_sections(tmp_path):
    """A recipe that leaves keys out gets the sections' defaults (Stage II: constant schedule, weight decay 0.1, KL
    to the teacher only with the tail as one bucket),
    and student kernel options reach the student's config."""
    path = tiny_recipe(tmp_path, "ok", distill={"steps": 3}, targets=None, evaluate=None)
    recipe = Recipe.load(path, ["student.kernels.copy_sinks=none", "student.backend=native"])
    assert (recipe.distill.schedule, recipe.distill.weight_decay) == ("constant", 0.1)
    assert (recipe.distill.gamma, recipe.distill.beta, recipe.distill.topk_mode) == (0.0, 1.0, "residual")
    assert (recipe.targets.k, recipe.evaluate.held_out_sequences, recipe.align.schedule) == (256, 8, "cosine")
    config = recipe.student_config()
    assert (config.kernels.copy_sinks, config.kernels.mlstm, config.backend) == ("none", "native", "native")


def test_recipe_reference_is_current():
    """docs/recipes.md is the generated reference of every recipe key (regenerate: python -c "from
    xlstm_distill.stages.recipe import recipe_reference as r; print(r(), end='')" > docs/recipes.md); every key has
    a meaning."""
    from pathlib import Path

    from xlstm_distill.stages.recipe import recipe_reference

    text = recipe_reference()
    assert (Path(__file__).parents[2] / "docs" / "recipes.md").read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 50 and all(not line.rstrip().endswith("|  |") for line in rows), rows


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


def test_targets_on_the_teachers_own_text(tmp_path):
    """targets.text: teacher: Stage II reads the teacher's sampled continuations of each corpus sequence's first
    tokens (one document per row, every token a target); the manifest records it, and Stage II trains on it."""
    path = tiny_recipe(tmp_path, "teacher-text", targets=dict(k=8, num_sequences=8, batch_size=4, text="teacher",
                                                              prompt_tokens=8))
    recipe = Recipe.load(path)
    ctx = RunContext(recipe)
    corpus = next(ctx.packed(rank=0, world_size=1).iter_batches(4))["input_ids"]
    Pipeline(recipe).distill()
    manifest = json.loads((tmp_path / "teacher-text" / "targets" / "manifest.json").read_text())
    assert manifest["text"] == "teacher:8:1.0" and manifest["complete"]
    shard = TargetShards(tmp_path / "teacher-text" / "targets", batch_size=8).read(np.arange(8))
    assert shard["input_ids"].shape == (8, 64) and shard["loss_mask"].all() and not shard["document_ids"].any()
    assert torch.equal(shard["input_ids"][:4, :8], corpus[:, :8])  # the corpus prompts
    assert not torch.equal(shard["input_ids"][:4, 8:], corpus[:, 8:])  # the teacher's continuations
    assert (tmp_path / "teacher-text" / "stage2" / "model" / "config.json").exists()


def test_merged_model_is_labelled_by_how_its_weights_were_chosen(tmp_path):
    from xlstm_distill.stages.domains import merge_kind

    for info, kind in (({"normalized_weights": [0.5, 0.5]}, "uniform"), ({"normalized_weights": [0.75, 0.25]},
                       "given weights"), ({"normalized_weights": [0.5, 0.5], "sweep": {}}, "swept")):
        (tmp_path / "merge_info.json").write_text(json.dumps(info))
        assert merge_kind(tmp_path) == kind


def test_shipped_recipes_load():
    """Every recipe under recipes/ reads with its typed sections; the GPU expert recipe gives the generalist the
    experts' Stage II tokens together."""
    from pathlib import Path

    paths = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
    recipes = {path.stem: Recipe.load(path) for path in paths}
    assert "smollm2-135m-experts-gpu" in recipes and len(recipes) >= 5
    gpu = recipes["smollm2-135m-experts-gpu"]
    experts = gpu.experts
    assert gpu.data.seq_len == 4096 and len(experts.domains) == 4 and experts.sweep is not None
    assert gpu.distill.steps == len(experts.domains) * experts.distill_steps
    assert gpu.targets.num_sequences == len(experts.domains) * experts.num_sequences
    assert (gpu.distill.gamma, gpu.distill.beta, gpu.distill.topk_mode, gpu.distill.lr, gpu.distill.train) == (
        0.0, 1.0, "residual", 1e-5, "full")
    assert {"xd_gsm8k", "xd_humaneval", "xd_mbpp"} <= set(gpu.evaluate.tasks)


def test_expert_budget_overrides_reach_each_expert(tmp_path):
    path = tiny_recipe(tmp_path, "budget", experts={"domains": {"a": {"a": 1.0}, "b": {"b": 1.0}},
                                                   "distill_steps": 2, "num_sequences": 8})
    ctx = RunContext(Recipe.load(path))
    expert = ctx.for_expert("a", {"a": 1.0}).recipe
    assert (expert.distill.steps, expert.targets.num_sequences) == (2, 8)
    assert (ctx.recipe.distill.steps, ctx.recipe.targets.num_sequences) == (4, 16)  # the generalist's
    with pytest.raises(ValueError, match="experts.distill_steps must be an integer >= 1"):
        Recipe.load(path, ["experts.distill_steps=0"])
