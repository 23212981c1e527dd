"""benchmarks/compare_runs.py: the final student of each run in one table and one figure each (RULER by length, KL by
position), the teacher's RULER from the first run, the budget plot only when the runs keep different heads, and a
clear refusal when a run has no RULER scores."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def module(monkeypatch):
    spec = importlib.util.spec_from_file_location("compare_runs", BENCHMARKS / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _row(kl: float) -> dict:
    sums = {"sum": [kl * 10, kl * 30], "tokens": [10, 10]}  # two held-out sequences, per-sequence KL kl and 3 kl
    return {"student_ppl": 9.0 + kl, "kl": 2 * kl, "kl_in_window": kl / 10, "kl_beyond_window": 2 * kl,
            "per_sequence": {"kl": sums, "kl_beyond_window": sums}}


def _run(folder: Path, kl: float, accuracy: float, heads: list[list[int]], ruler: bool = True) -> Path:
    (folder / "report").mkdir(parents=True)
    (folder / "stage2" / "model").mkdir(parents=True)
    (folder / "report" / "held_out.json").write_text(json.dumps(
        {"rows": {"converted (untrained)": _row(1.0), "after Stage II": _row(kl)}}))
    positions = {"start": [0, 4], "kl": [0.0, kl], "student_ce": [1.0, 2.0], "teacher_ce": [1.0, 1.5], "tokens": [4, 4]}
    (folder / "report" / "by_position.json").write_text(json.dumps(
        {"documents": 1, "length": 8, "bucket": 4, "window": 4,
         "rows": {"converted (untrained)": positions, "after Stage II": positions}}))
    (folder / "stage2" / "model" / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 2, "num_key_value_heads": 2, "full_attention_heads": heads, "mixer": "mlstm_swa"}))
    if ruler:
        (folder / "ruler").mkdir()
        (folder / "ruler" / "long_context.json").write_text(json.dumps(
            {"settings": {"tasks": ["niah_single_1"], "lengths": [1024, 2048], "samples": 4},
             "models": {"teacher.gguf": {"niah_single_1": {"1024": 1.0, "2048": 0.75}},
                        "student": {"niah_single_1": {"1024": accuracy, "2048": accuracy / 2}}},
             "within_window": {"4": {"niah_single_1": {"1024": 0.5, "2048": 0.25}}},
             "beyond_window": {"4": {name: {"niah_single_1": {"1024": {"accuracy": acc, "requests": 2}}}
                                     for name, acc in (("teacher.gguf", 1.0), ("student", accuracy / 2))}}}))
    return folder


def test_runs_side_by_side(module, tmp_path):
    none = _run(tmp_path / "none", 0.5, 0.5, [])
    kept = _run(tmp_path / "kept", 0.25, 1.0, [[0, 1]])
    out = tmp_path / "out"
    module.main(["--out", str(out), "--run", f"no heads={none}", "--run", f"one head={kept}"])
    data = json.loads((out / "compare.json").read_text())
    assert [(r["run"], r["mixer"], r["kept heads"], r["kept share"], r["kl"], r["kl_beyond_window"])
            for r in data["rows"]] == [("no heads", "mlstm_swa", 0, 0.0, 1.0, 1.0), ("one head", "mlstm_swa", 1, 0.25, 0.5, 0.5)]
    # paired with the first run: (0.25 - 0.5) x (10 + 30) / 20 tokens = -0.5, the same on both sequences' scale
    assert data["rows"][0]["kl - first run"] is None
    paired = data["rows"][1]["kl - first run"]
    assert paired["difference"] == pytest.approx(-0.5) and paired["sequences"] == 2
    assert paired["stderr"] == pytest.approx(0.25)  # d_i - D n_i = -2.5 + 5 = 2.5 and -7.5 + 5 = -2.5
    assert data["rows"][1]["ruler niah_single_1 2048"] == 0.5
    assert data["teacher"] == {"ruler niah_single_1 1024": 1.0, "ruler niah_single_1 2048": 0.75}
    ruler = json.loads((out / "long_context.json").read_text())
    assert list(ruler["models"]) == ["teacher", "no heads", "one head"]
    assert ruler["within_window"] == {"4": {"niah_single_1": {"1024": 0.5, "2048": 0.25}}}
    assert "| niah_single_1 | _needle in the last 4 tokens_ | 0.500 | 0.250 |" in (out / "long_context.md").read_text()
    assert list(ruler["beyond_window"]["4"]) == ["teacher", "no heads", "one head"]
    assert ruler["beyond_window"]["4"]["one head"]["niah_single_1"]["1024"] == {"accuracy": 0.5, "requests": 2}
    assert "| niah_single_1 | one head | 0.500 (2) |" in (out / "long_context.md").read_text()
    assert list(json.loads((out / "by_position.json").read_text())["rows"]) == ["no heads", "one head"]
    table = (out / "compare.md").read_text()
    assert "| one head | mlstm_swa | 1 | 0.25 |" in table and "| teacher |" in table
    assert "-0.5000 ± 0.5000" in table
    for name in ("budget.png", "long_context.png", "by_position.png"):
        assert (out / name).stat().st_size > 0


def test_same_heads_no_budget_plot_and_missing_ruler_refused(module, tmp_path):
    a = _run(tmp_path / "a", 0.5, 0.5, [])
    b = _run(tmp_path / "b", 0.4, 0.5, [])
    module.main(["--out", str(tmp_path / "out"), "--run", f"a={a}", "--run", f"b={b}"])
    assert not (tmp_path / "out" / "budget.png").exists()
    c = _run(tmp_path / "c", 0.4, 0.5, [], ruler=False)
    with pytest.raises(SystemExit, match="no long_context.json"):
        module.main(["--out", str(tmp_path / "out2"), "--run", f"c={c}"])
    # held-out data of another mixture (another fingerprint): no pairing
    for folder, data in ((a, "aaaa"), (b, "bbbb")):
        held = json.loads((folder / "report" / "held_out.json").read_text())
        (folder / "report" / "held_out.json").write_text(json.dumps({**held, "data": data}))
    module.main(["--out", str(tmp_path / "out4"), "--run", f"a={a}", "--run", f"b={b}"])
    assert json.loads((tmp_path / "out4" / "compare.json").read_text())["rows"][1]["kl - first run"] is None
    with pytest.raises(SystemExit, match="LABEL=DIR"):
        module.main(["--out", str(tmp_path / "out3"), "--run", str(a)])
