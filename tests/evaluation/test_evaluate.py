"""End to end: tiny random models through lm-eval on offline tasks, the report files, and the typer commands."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig


from xlstm_distill.evaluation import evaluate_models, write_report  # noqa: E402
from xlstm_distill.teacher import resolve_teacher  # noqa: E402

TASKS = ["xd_arc_easy", "xd_piqa"]


@pytest.fixture(scope="module")
def tokenizer():
    folder, gguf = resolve_teacher("smollm2-135m")
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def tiny_model(seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def evaluated(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    teacher, other = tiny_model(0), tiny_model(1)
    results = evaluate_models(
        {"teacher": (teacher, tokenizer), "teacher-again": (teacher, tokenizer), "other": (other, tokenizer)},
        TASKS, limit=5, batch_size=4, max_length=512, output_dir=out,
    )
    return results, out


def test_scores_and_settings(evaluated):
    results, out = evaluated
    assert results["settings"]["tasks"] == TASKS
    assert results["settings"]["num_fewshot"] == {"xd_arc_easy": 0, "xd_piqa": 0}
    assert results["settings"]["metrics"] == {"xd_arc_easy": "acc,none", "xd_piqa": "acc,none"}
    models = results["models"]
    assert list(models) == ["teacher", "teacher-again", "other"]
    for entry in models.values():
        assert set(entry["scores"]) == set(TASKS)
        assert all(0.0 <= s <= 1.0 for s in entry["scores"].values())
        assert entry["n_samples"] == {"xd_arc_easy": 5, "xd_piqa": 5}
    # the same model twice gives the same scores (deterministic, identical settings)
    assert models["teacher"]["scores"] == models["teacher-again"]["scores"]
    assert models["teacher"]["scores"]["xd_piqa"] > 0  # seed chosen so that no task is left out below
    raw = json.loads((out / "lm_eval" / "teacher.json").read_text())
    assert raw["n-shot"]["xd_arc_easy"] == 0 and "xd_piqa" in raw["results"]


def test_report_files(evaluated, tmp_path):
    results, _ = evaluated
    paths = write_report(results, "teacher", tmp_path, baselines=["other"])
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert set(data["models"]["teacher"]["scores"]) == set(TASKS)
    assert data["versions"]["lm_eval"] and data["versions"]["torch"] and data["versions"]["transformers"]
    comp = data["comparison"]["models"]
    same = comp["teacher-again"]
    included = [t for t in TASKS if results["models"]["teacher"]["scores"][t] > 0]
    assert same["benchmarks"] == included and len(included) >= 1
    assert same["win_and_tie"]["0"] == 1.0 and same["critical_tolerance"] == 0.0
    assert all(r == 1.0 for r in same["recovery"].values())
    assert comp["other"]["role"] == "baseline" and same["role"] == "student"
    md = paths["markdown"].read_text()
    assert "| teacher-again | student |" in md and "C_0.01" in md and "alpha*" in md and "limit = 5" in md
    # published baseline scores can be compared without running the model
    paths = write_report(paths["json"], "teacher", tmp_path / "again", baselines={"paper": {"xd_piqa": 0.1}})
    comp = json.loads(paths["json"].read_text())["comparison"]["models"]["paper"]
    assert comp["excluded"] == {"xd_arc_easy": "no score"} and comp["benchmarks"] == ["xd_piqa"]


def test_generation_task(tokenizer):
    results = evaluate_models({"m": (tiny_model(0), tokenizer)}, ["xd_gsm8k"], num_fewshot={"gsm8k": 1},
                              limit=2, batch_size=2, max_length=512, max_gen_toks=8)
    entry = results["models"]["m"]
    assert results["settings"]["num_fewshot"] == {"xd_gsm8k": 1}
    assert results["settings"]["metrics"]["xd_gsm8k"] == "exact_match,flexible-extract"
    assert entry["scores"]["xd_gsm8k"] == 0.0 and "exact_match,strict-match" in entry["metrics"]["xd_gsm8k"]


def test_cli_commands(tokenizer, tmp_path):
    import typer
    from typer.testing import CliRunner

    from xlstm_distill.cli.evaluate import evaluate, merge

    app = typer.Typer()
    app.command()(evaluate)
    app.command()(merge)
    runner = CliRunner()

    model = tiny_model(0)
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    res = runner.invoke(app, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1,3",
                              "--out", str(tmp_path / "merged13")])
    assert res.exit_code == 0, res.output
    assert "weights [0.25, 0.75]" in res.output
    # a and b are the same model: 0.5 * x + 0.5 * x == x exactly, so the merged model scores like a
    res = runner.invoke(app, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "-w", "2", "-w", "2",
                              "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "-w", "1", "-w", "-1",
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and "non-negative" in res.output

    (tmp_path / "paper.json").write_text(json.dumps({"xd_piqa": 0.2}))
    res = runner.invoke(app, [
        "evaluate", "--teacher", str(tmp_path / "a"), "--student", f"merged={tmp_path / 'merged'}",
        "--tasks", "xd_piqa", "--limit", "3", "--shots", "piqa=1", "--baseline", f"paper={tmp_path / 'paper.json'}",
        "--batch-size", "4", "--max-length", "256", "--output-dir", str(tmp_path / "report"), "--device", "cpu",
        "--log-samples",
    ])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert list(data["models"]) == [str(tmp_path / "a"), "merged", "paper"]
    assert data["settings"]["num_fewshot"] == {"xd_piqa": 1}
    assert data["comparison"]["models"]["paper"]["role"] == "baseline"
    # identical weights merged are the same model: same scores
    assert data["models"]["merged"]["scores"] == data["models"][str(tmp_path / "a")]["scores"]
    # --log-samples: paired differences where per-document scores exist (not for given baseline scores)
    assert data["comparison"]["models"]["merged"]["paired"]["xd_piqa"] == {"difference": 0.0, "stderr": 0.0,
                                                                          "documents": 3}
    assert data["comparison"]["models"]["paper"]["paired"] == {}
    res = runner.invoke(app, ["evaluate", "--teacher", str(tmp_path / "a"), "--student", str(tmp_path / "a"),
                              "--shots", "piqa=x", "--tasks", "xd_piqa"])
    assert res.exit_code != 0 and "shot counts must be integers" in res.output


def test_per_task_limits(tokenizer):
    results = evaluate_models({"m": (tiny_model(0), tokenizer)}, TASKS, limit={"xd_arc_easy": 3, "xd_piqa": 6},
                              batch_size=4, max_length=512)
    assert results["models"]["m"]["n_samples"] == {"xd_arc_easy": 3, "xd_piqa": 6}
    with pytest.raises(ValueError, match="not evaluated"):
        evaluate_models({"m": (tiny_model(0), tokenizer)}, TASKS, limit={"xd_hellaswag": 3})


def test_per_document_scores_and_paired_differences(tokenizer, tmp_path):
    """With ``log_samples`` every task keeps its metric per document (a group: over its subtasks' documents): their
    mean is the task's score, and the report's paired difference to the teacher (and of a student to a baseline) is
    the score difference, with a paired standard error (zero for the teacher against itself)."""
    teacher, other = tiny_model(0), tiny_model(1)
    results = evaluate_models(
        {"teacher": (teacher, tokenizer), "teacher-again": (teacher, tokenizer), "other": (other, tokenizer)},
        ["xd_piqa", "xd_mmlu"], limit={"xd_piqa": 8, "xd_mmlu": 1}, batch_size=4, max_length=512, log_samples=True,
    )
    for entry in results["models"].values():
        docs = entry["per_document"]
        assert len(docs["xd_piqa"]) == 8 and len(docs["xd_mmlu"]) == 57  # one document per MMLU subject
        for task, values in docs.items():
            assert sum(values.values()) / len(values) == pytest.approx(entry["scores"][task])
    paths = write_report(results, "teacher", tmp_path, baselines=["teacher-again"])
    comparison = json.loads(paths["json"].read_text())["comparison"]["models"]
    scores = {name: entry["scores"] for name, entry in results["models"].items()}
    for task in ("xd_piqa", "xd_mmlu"):
        assert comparison["teacher-again"]["paired"][task] == {"difference": 0.0, "stderr": 0.0,
                                                              "documents": len(results["models"]["other"]["per_document"][task])}
        paired = comparison["other"]["paired"][task]
        assert paired["difference"] == pytest.approx(scores["other"][task] - scores["teacher"][task])
        assert paired["stderr"] > 0 or paired["difference"] == 0
        # the student against the baseline (here the teacher's twin): the same as against the teacher
        assert comparison["other"]["paired_vs_baselines"]["teacher-again"][task] == paired
    assert "| other - teacher | other - teacher-again |" in paths["markdown"].read_text()


def test_results_of_separate_runs_combine(evaluated, tmp_path):
    from xlstm_distill.evaluation import combine_results

    results, _ = evaluated
    parts = [{**results, "models": {name: entry}} for name, entry in results["models"].items()]
    (tmp_path / "other.json").write_text(json.dumps(parts[2]))
    combined = combine_results([parts[0], parts[1], tmp_path / "other.json"])
    assert combined["models"] == results["models"] and combined["settings"] == results["settings"]
    with pytest.raises(ValueError, match="evaluated twice"):
        combine_results([parts[0], parts[0]])
    with pytest.raises(ValueError, match="setting 'limit'"):
        combine_results([parts[0], {**parts[1], "settings": {**results["settings"], "limit": 7}}])


def test_cache_resumes_an_interrupted_evaluation_and_follows_the_model(tokenizer, tmp_path, monkeypatch):
    """With ``cache_dir`` answers are kept as they are computed: a rerun computes only what is missing (here: an
    evaluation stopped after 3 of 5 documents per task) and scores as a fresh run; changed weights get a new cache."""
    from lm_eval.models.huggingface import HFLM

    from xlstm_distill.evaluation.harness import fingerprint

    model = tiny_model(0)
    settings = dict(batch_size=4, max_length=512)
    evaluate_models({"m": (model, tokenizer)}, TASKS, limit=3, cache_dir=tmp_path / "cache", **settings)
    computed = []
    original = HFLM._loglikelihood_tokens

    def counting(self, requests, *args, **kwargs):
        computed.append(len(requests))
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", counting)
    resumed = evaluate_models({"m": (model, tokenizer)}, TASKS, limit=5, cache_dir=tmp_path / "cache", **settings)
    resumed_requests, computed[:] = sum(computed), []
    fresh = evaluate_models({"m": (model, tokenizer)}, TASKS, limit=5, **settings)
    assert resumed["models"]["m"]["scores"] == fresh["models"]["m"]["scores"]
    assert 0 < resumed_requests < sum(computed)  # only the last 2 documents' answers were computed
    assert len(list((tmp_path / "cache").iterdir())) == 1
    before = fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert fingerprint(model) != before
    evaluate_models({"m": (model, tokenizer)}, TASKS, limit=3, cache_dir=tmp_path / "cache", **settings)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the changed model did not reuse the old answers


def test_per_document_picks_metric_filter_and_nested_group_leaves():
    """Synthetic lm-eval output: the chosen metric and filter of every leaf of a nested group, nothing else."""
    from xlstm_distill.evaluation.harness import _per_document

    def sample(doc_id, filt, acc, acc_norm):
        return {"doc_id": doc_id, "filter": filt, "acc": acc, "acc_norm": acc_norm}

    raw = {
        "group_subtasks": {"g": ["sub", "leaf_a"], "sub": ["leaf_b"], "leaf_a": [], "leaf_b": []},
        "samples": {
            "leaf_a": [sample(0, "none", 1.0, 0.0), sample(0, "flex", 0.0, 1.0), sample(1, "none", 0.0, 1.0)],
            "leaf_b": [sample(0, "none", 1.0, 1.0), {"doc_id": 1, "filter": "none", "exact_match": 1.0}],
            "other": [sample(0, "none", 1.0, 1.0)],
        },
    }
    assert _per_document(raw, "g", "acc_norm,none") == {"leaf_a/0": 0.0, "leaf_a/1": 1.0, "leaf_b/0": 1.0}
    assert _per_document(raw, "leaf_a", "acc,flex") == {"leaf_a/0": 0.0}
    assert _per_document({"results": {}}, "g", "acc,none") == {}


def test_paired_table_only_where_per_document_scores_exist(tmp_path):
    """A teacher without per-document scores: the table still shows the student against the evaluated baseline;
    no column for a baseline given as scores."""
    def entry(values):
        return {"scores": {"t": sum(values) / len(values)}, "stderr": {"t": None},
                "per_document": {"t": {f"t/{i}": v for i, v in enumerate(values)}}}

    results = {"settings": {"tasks": ["t"]},
               "models": {"teacher": {"scores": {"t": 0.5}, "stderr": {"t": None}},
                          "student": entry([1.0, 1.0, 0.0, 1.0]), "base": entry([1.0, 0.0, 0.0, 1.0])}}
    paths = write_report(results, "teacher", tmp_path, baselines=["base"])
    text = paths["markdown"].read_text()
    assert "| task | student - base |" in text and "+0.2500 ± 0.2500 (4)" in text
    assert "| **mean over tasks** | **+0.2500** ± 0.2500 (1 task) |" in text
    paths = write_report(results, "teacher", tmp_path / "given", baselines={"paper": {"t": 0.4}})
    assert "## Paired differences" not in paths["markdown"].read_text()
