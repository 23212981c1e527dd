"""benchmarks/full_heads.py and needle_retrieval.py on a tiny recipe: every probe scores the heads, every budget and
choice gives a row with both retrieval accuracies; the needle accuracy and calibration KL of given students; the
files are written."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from helpers import REAL_TEXT, tiny_recipe

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _recipe(tmp_path):
    words = REAL_TEXT.split()
    docs = [" ".join(words[i % 300:] + words[:i % 300]) for i in range(200)]  # 200 documents: some are held out
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = {"sources": [{"path": str(tmp_path / "long.jsonl"), "name": "long"}], "seq_len": 96}
    return tiny_recipe(tmp_path, "fh", data=data)


def test_every_probe_and_budget_gives_a_row(tmp_path, monkeypatch):
    module = _load("full_heads", monkeypatch)
    recipe = _recipe(tmp_path)
    written = []
    rows = module.run(recipe, tmp_path / "out", [0, 0.25], None, samples=2, eval_probes=2, overrides=[],
                      ruler_spec=([], [], 0), write=lambda r: written.append(len(r)))
    assert [(r["chosen by"], r["heads"]) for r in rows] == [("-", 0), ("needles", 1), ("retrieval", 1), ("text", 1),
                                                            ("random", 1)]
    assert written == [1, 2, 3, 4, 5]
    for row in rows:
        assert 0 <= row["needles"] <= 1 and 0 <= row["retrieval"] <= 1 and row["kl"] >= 0
        assert "teacher_needles" in row and "teacher_retrieval" in row
    for probe in ("needles", "retrieval", "text"):
        assert (tmp_path / "out" / f"heads_{probe}" / "heads.json").exists()
    module.plot(rows, tmp_path / "out" / "plot.png")
    assert (tmp_path / "out" / "plot.png").stat().st_size > 0


def test_needle_retrieval_of_teacher_and_students(tmp_path, monkeypatch):
    import xlstm_distill as xd
    from xlstm_distill.stages import Pipeline, Recipe

    module = _load("needle_retrieval", monkeypatch)
    recipe = _recipe(tmp_path)
    converted = Pipeline(Recipe.load(recipe)).convert()
    student = xd.HybridForCausalLM.from_pretrained(converted)
    student.set_full_attention([], [0, 1])  # every head kept: the teacher itself
    student.save_pretrained(tmp_path / "all-kept")
    rows = module.run(recipe, {"converted": converted, "all kept": tmp_path / "all-kept"}, probes=3, overrides=[])
    assert [r["model"] for r in rows] == ["teacher", "converted", "all kept"]
    assert rows[2]["calibration_kl"] < 1e-4 and rows[2]["needles"] == rows[0]["needles"]
    assert rows[2]["needle_information"] == pytest.approx(rows[0]["needle_information"], abs=1e-4)  # the teacher
    assert rows[1]["needle_information"] != rows[0]["needle_information"]
    assert rows[1]["calibration_kl"] > rows[2]["calibration_kl"]
    module.plot(rows, tmp_path / "needles.png")
    assert (tmp_path / "needles.png").stat().st_size > 0
