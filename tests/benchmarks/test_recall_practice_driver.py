"""benchmarks/recall_practice.py on a tiny recipe: Stage I with and without the recall source from one converted
student, a row each (and the converted one) with held-out KL and needle accuracy; the second run trains on the
recipe's sources plus recall, the measurements use the recipe's own held-out data."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from helpers import REAL_TEXT, tiny_recipe
from xlstm_distill.data.recallgen import recall_documents

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_stage_one_with_and_without_recall(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("recall_practice", BENCHMARKS / "recall_practice.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)

    words = REAL_TEXT.split()
    docs = [" ".join(words[i % 300:] + words[:i % 300]) for i in range(200)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prose = ({"text": " ".join(f"Line {i} of part {p} reads plainly." for i in range(30))} for p in range(2_000))
    recall = recall_documents(prose, min_chars=1_000, max_chars=2_000, min_gap=100, max_gap=800)
    (tmp_path / "recall.jsonl").write_text("".join(json.dumps(next(recall)) + "\n" for _ in range(200)))
    data = {"sources": [{"path": str(tmp_path / "long.jsonl"), "name": "long"},
                        {"path": str(tmp_path / "recall.jsonl"), "name": "recall"}],
            "weights": {"long": 1.0}, "seq_len": 96}
    recipe = tiny_recipe(tmp_path, "rp", data=data)
    trained_on = []
    real_align = module.align.run
    monkeypatch.setattr(module.align, "run", lambda ctx: trained_on.append(ctx.recipe.data.weights) or real_align(ctx))
    rows = module.run(recipe, tmp_path / "out", recall=1.0, probes=2, overrides=[], ruler_file=None)
    assert trained_on == [{"long": 1.0}, {"long": 1.0, "recall": 1.0}]
    assert [(r["student"], r["recall weight"], r["align steps"]) for r in rows] == [
        ("converted", 0.0, 0), ("Stage I, plain", 0.0, 2), ("Stage I, recall", 1.0, 2)]
    for row in rows:
        assert row["kl"] >= 0 and 0 <= row["needles"] <= 1 and 0 <= row["teacher needles"] <= 1
        assert row["needle information"] != row["teacher needle information"]
    assert rows[1]["kl"] != rows[2]["kl"]  # different training data, different students
    module.plot(rows, tmp_path / "out" / "plot.png")
    assert (tmp_path / "out" / "plot.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="recall corpus already"):
        module.run(recipe, tmp_path / "again", recall=1.0, probes=2, overrides=["data.weights={long: 1.0, recall: 1.0}"],
                   ruler_file=None)
