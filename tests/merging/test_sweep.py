"""Choosing the merge weights on the sweep split (xlstm_distill.merging.sweep) on tiny hybrid students whose best
weights are known by construction."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import SyntheticPacks, tiny_recipe, tiny_teacher
from xlstm_distill import HybridConfig, convert
from xlstm_distill.cli import app
from xlstm_distill.data import SPLITS, split_of
from xlstm_distill.merging import MergeError, SweepConfig, merge, merge_with_sweep, sweep_weights
from xlstm_distill.merging.sweep import grid_points
from xlstm_distill.modeling import HybridForCausalLM
from xlstm_distill.stages import Recipe, RunContext
from xlstm_distill.stages.common import compare_to_teacher

SEQ = 48
runner = CliRunner()


def student_of(teacher: torch.nn.Module) -> HybridForCausalLM:
    """A window covering the sequence: the student computes the teacher's function exactly (KL 0)."""
    return convert(teacher, HybridConfig(mixer="swa", window_size=SEQ, num_sink_tokens=2, backend="native")).eval()


def save_shifted(student: torch.nn.Module, direction: dict[str, torch.Tensor], scale: float, path: Path) -> Path:
    """Save ``student``'s weights + ``scale * direction``."""
    state = {name: value + scale * direction[name] for name, value in student.state_dict().items()}
    student.save_pretrained(path, state_dict=state)
    return path


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher("llama", logit_scale=3.0)


@pytest.fixture(scope="module")
def experts(teacher, tmp_path_factory):
    """theta_1 = theta* + d, theta_2 = theta* - 3 d, theta* the teacher's student: the merge 0.75 theta_1 +
    0.25 theta_2 is theta* (KL 0), every other weight is further from it."""
    root = tmp_path_factory.mktemp("sweep-experts")
    student = student_of(teacher)
    g = torch.Generator().manual_seed(0)
    direction = {name: torch.randn(v.shape, generator=g) * 0.02 for name, v in student.state_dict().items()}
    return [save_shifted(student, direction, 1.0, root / "e1"), save_shifted(student, direction, -3.0, root / "e2")]


def domains() -> dict[str, list[dict[str, torch.Tensor]]]:
    return {name: [SyntheticPacks(batch_size=2, seq_len=SEQ, seed=seed).make(0)] for name, seed in (("x", 1), ("y", 2))}


def test_grid_points_cover_the_simplex():
    points = grid_points(4, 4)
    assert len(points) == 35 == len(set(points))
    assert all(abs(sum(p) - 1) < 1e-12 and min(p) >= 0 for p in points)
    assert (0.25, 0.25, 0.25, 0.25) in points and (0.0, 1.0, 0.0, 0.0) in points
    assert grid_points(2, 2) == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]


def test_sweep_finds_the_known_best_weights_and_records_them(experts, teacher, tmp_path):
    lines = []
    out = merge_with_sweep(experts, tmp_path / "merged", teacher, domains(), SweepConfig(grid=2, refine=1),
                           data={"domains": {"x": "synthetic"}}, log=lines.append)
    info = json.loads((out / "merge_info.json").read_text())
    sweep = info["sweep"]
    # the grid has 0, 0.5, 1; the refinement's step of 1/4 reaches the optimum 0.75
    assert sweep["chosen"] == [0.75, 0.25] and info["normalized_weights"] == [0.75, 0.25]
    assert sweep["objective"] == "mean" and sweep["data"] == {"domains": {"x": "synthetic"}}
    stages = [c["stage"] for c in sweep["candidates"]]  # the grid's 3 points are the uniform merge and the experts
    assert stages[:3] == ["uniform", "expert", "expert"] and set(stages[3:]) == {"refine"}
    for c in sweep["candidates"]:
        assert c["objective"] == pytest.approx(sum(c["kl"].values()) / 2)
    assert max(sweep["chosen_kl"].values()) < 1e-4 < min(c["objective"] for c in sweep["candidates"]
                                                        if c["weights"] != [0.75, 0.25])
    assert len(lines) == len(sweep["candidates"]) + 2 and "chosen weights 0.7500 0.2500" in lines[-1]
    assert (out / "sweep.png").stat().st_size > 0
    # the KL the sweep measured in memory is that of the merged folder (the teacher's probabilities stored in
    # float16 move it by less than 1e-3 relative)
    uniform = merge(experts, None, tmp_path / "uniform")
    for folder, weights in ((out, [0.75, 0.25]), (uniform, [0.5, 0.5])):
        measured = next(c["kl"] for c in sweep["candidates"] if c["weights"] == weights)
        merged = HybridForCausalLM.from_pretrained(folder).eval()
        for name, batches in domains().items():
            kl = compare_to_teacher(merged, teacher, batches)["kl"]
            assert kl == pytest.approx(measured[name], rel=1e-3, abs=1e-6), (weights, name)
    e1, e2, m = (load_file(str(p / "model.safetensors")) for p in (*experts, out))
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(m[key], 0.75 * e1[key] + 0.25 * e2[key])


def test_worst_domain_objective(experts, teacher):
    record = sweep_weights(experts, teacher, domains(), SweepConfig(objective="worst", grid=2, refine=0),
                           log=lambda line: None)
    assert all(c["objective"] == max(c["kl"].values()) for c in record["candidates"])
    assert record["chosen"] in ([0.5, 0.5], [1.0, 0.0])  # the grid's points nearest to 0.75


def test_sweep_errors_name_the_fix(experts, teacher, tmp_path):
    with pytest.raises(MergeError, match="at least one domain"):
        sweep_weights(experts, teacher, {}, log=lambda line: None)
    other = tiny_teacher("llama", vocab_size=96)
    with pytest.raises(MergeError, match="experts predict 128 tokens, the teacher 96: pass the teacher"):
        sweep_weights(experts, other, {"x": [SyntheticPacks(batch_size=2, seq_len=SEQ, vocab=96).make(0)]},
                      log=lambda line: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(MergeError, match="not empty; pass overwrite=True"):  # refused before the search
        merge_with_sweep(experts, tmp_path / "full", other, {}, log=lambda line: None)
    for bad, match in [(dict(objective="median"), "choose one of mean, worst"), (dict(grid=0), "grid must be"),
                       (dict(refine=-1), "refine must be")]:
        with pytest.raises(ValueError, match=match):
            SweepConfig(**bad)


def test_sweep_split_never_overlaps_the_reports_held_out_documents(tmp_path):
    """With `experts.sweep` the sweep documents leave training and never meet the report's; without it they stay in
    training (the same text and the same target fingerprint as a recipe that has no sweep split at all)."""
    plain = RunContext(Recipe.load(tiny_recipe(tmp_path, "plain")))
    experts = {"domains": {"a": {"a": 1.0}, "b": {"b": 1.0}}, "sweep": {}}
    ctx = RunContext(Recipe.load(tiny_recipe(tmp_path, "split", experts=experts)))
    assert ctx.sweep_split and not plain.sweep_split
    with pytest.raises(ValueError, match="experts.sweep"):
        plain.sources("sweep")
    docs = {split: [r for src in ctx.sources(split) for _, r in src.records(seed=0)] for split in SPLITS}
    plain_train = [r for src in plain.sources("train") for _, r in src.records(seed=0)]
    assert len(plain_train) == len(docs["train"]) + len(docs["sweep"])
    assert plain.target_meta()["data"] != ctx.target_meta()["data"]  # the training text differs
    texts = {split: {json.dumps(r, sort_keys=True) for r in records} for split, records in docs.items()}
    assert texts["sweep"] and texts["held_out"] and texts["train"]
    assert not texts["sweep"] & texts["held_out"] and not texts["sweep"] & texts["train"]
    assert not texts["held_out"] & texts["train"]
    lines = [json.loads(line) for name in ("a", "b") for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert sum(len(t) for t in texts.values()) == len(lines)
    assert all(split_of(r) == split for split, records in docs.items() for r in records)
    assert all(split_of(r, sweep_split=False) in ("train", "held_out") for r in lines)
    # the report's batches are packed from the held-out documents only, the sweep's from the sweep split
    assert [src.name for src in ctx.packed("held_out").sources] == ["a:held_out", "b:held_out"]
    assert [src.name for src in ctx.packed("sweep").sources] == ["a:sweep", "b:sweep"]


def test_merge_sweep_command(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_recipe(tmp_path, "unused")  # a tiny teacher folder with the SmolLM2 tokenizer, sources a.jsonl and b.jsonl
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    student = student_of(teacher)
    g = torch.Generator().manual_seed(0)
    direction = {name: torch.randn(v.shape, generator=g) * 0.02 for name, v in student.state_dict().items()}
    experts = [save_shifted(student, direction, scale, tmp_path / f"e{i}") for i, scale in enumerate((1.0, -1.0))]
    for folder in experts:
        AutoTokenizer.from_pretrained(tmp_path / "teacher").save_pretrained(folder)
    base = ["merge", *map(str, experts), "--out", str(tmp_path / "m")]
    sweep = ["--sweep", "--teacher", str(tmp_path / "teacher"), "--sweep-data", f"a={tmp_path / 'a.jsonl'}",
             "--sweep-data", str(tmp_path / "b.jsonl"), "--seq-len", "32", "--sequences", "2", "--batch-size", "2",
             "--grid", "2", "--refine", "0"]
    for args, message in [(["--sweep"], "--sweep needs held-out text for each domain: pass --sweep-data"),
                          (sweep + ["--weights", "1,1"], "--weights and --sweep both set the merge weights"),
                          (sweep[1:], "--sweep-data and --teacher are for --sweep: add --sweep"),
                          (["--sweep", "--sweep-data", str(tmp_path / "a.jsonl")], "pass --teacher"),
                          (sweep[:4] + [str(tmp_path / "none.jsonl")], "none.jsonl does not exist")]:
        result = runner.invoke(app, base + args)
        assert result.exit_code != 0 and message in " ".join(result.output.split()), (args, result.output)
    result = runner.invoke(app, base + sweep)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "m" / "merge_info.json").read_text())["sweep"]
    assert info["chosen"] == [0.5, 0.5]  # theta* = (theta_1 + theta_2) / 2, the teacher's student
    assert set(info["tokens"]) == {"a", "b"} and info["data"]["domains"]["a"]["path"] == str(tmp_path / "a.jsonl")
    assert "chosen weights 0.5000 0.5000" in result.output

