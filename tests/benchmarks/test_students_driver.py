"""benchmarks/smollm2_students.py: the scheduling arithmetic of the three-student run (no training here)."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "smollm2_students.py"
LONG_DEFAULTS = dict(ruler_samples=20, long_corpora="runs/corpora", long_length=8192, benchmarks=True)


@pytest.fixture()
def driver(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("smollm2_students", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    (tmp_path / "eval").mkdir()
    return module


def _stage2(root, mixer, steps, seconds_per_step):
    path = root / mixer / "stage2" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    rate = 16 * 1024 / seconds_per_step
    path.write_text("".join(json.dumps({"step": s, "tokens_per_s": rate, "loss": 1.0}) + "\n" for s in range(1, steps + 1)))


def test_auto_steps_gives_the_three_students_one_count_that_fits(driver, tmp_path):
    _stage2(tmp_path, "mlstm_swa", 10, 2.0)
    _stage2(tmp_path, "linear_swa", 30, 2.0)  # swa has not started Stage II
    (tmp_path / "eval" / "teacher.json").write_text(json.dumps({"models": {"teacher": {"eval_seconds": 100}}}))
    assert driver.eval_estimate() == 100 + driver.STARTUP_MARGIN  # an older file: the evaluation alone, plus a margin
    (tmp_path / "eval" / "teacher.json").write_text(
        json.dumps({"models": {"teacher": {"eval_seconds": 80}}, "job_seconds": 100}))
    assert driver.eval_estimate() == 100  # the whole job, recorded
    # 100 s of training left after the three evaluations (two at a time: 2 x 100 s) and the margin (60 s):
    # 50 steps at 2 s, from step 0
    steps = driver.auto_steps(time.time() + 360.5)
    assert steps == 40  # rounded down to a checkpoint (every 20 steps), and not below a step already reached (30)
    assert driver.auto_steps(time.time() + 10) == 30


def test_jobs_wait_for_their_inputs(driver, tmp_path):
    jobs = {j.name: j for j in driver.jobs("teacher.gguf", 60)}
    distill = jobs["distill-swa"]
    assert "distill.steps=60" in distill.cmd and not distill.ready()
    (tmp_path / "swa" / "stage1" / "model").mkdir(parents=True)
    (tmp_path / "swa" / "stage1" / "model" / "config.json").write_text("{}")
    assert not distill.ready()  # the shared targets are not complete yet
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "complete").write_text("")
    assert distill.ready() and not jobs["eval-swa"].ready()


def test_subset_keeps_only_the_named_models_and_tasks(driver):
    results = {"settings": {"tasks": ["a", "b"], "limit": {"a": 1, "b": 2}, "batch_size": 8},
               "models": {"t": {"scores": {"a": 0.5, "b": 0.6}, "source": "x"}, "s": {"scores": {"a": 0.4, "b": 0.1}}}}
    sub = driver._subset(results, ["t"], ["a"])
    assert sub["settings"] == {"tasks": ["a"], "limit": {"a": 1}, "batch_size": 8}
    assert sub["models"] == {"t": {"scores": {"a": 0.5}, "source": "x"}}


def test_a_failed_job_drops_everything_downstream(driver):
    jobs = {j.name: j for j in driver.jobs("teacher.gguf", 60)}
    pending = [j for j in jobs.values() if j.name != "align-swa"]
    left = {j.name for j in driver._runnable(pending, jobs["align-swa"])}
    assert not {"distill-swa", "eval-swa", "report-swa"} & left  # eval and report needed distill's output
    assert {"distill-mlstm_swa", "eval-mlstm_swa", "eval-teacher", "targets"} <= left
    left = {j.name for j in driver._runnable(pending, jobs["targets"])}
    assert not any(n.startswith(("distill-", "report-")) or n in ("eval-swa", "eval-mlstm_swa") for n in left)
    assert {"eval-teacher", "eval-mlstm_swa-stage1", "align-mlstm_swa"} <= left


def test_untrained_models_reuse_earlier_evaluations(driver, tmp_path, monkeypatch):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("teacher", "mlstm_swa-converted", "swa"):
        (earlier / f"{name}.json").write_text(json.dumps({"models": {name: {"eval_seconds": 1}}}))
    started = []
    monkeypatch.setattr(driver, "_start", lambda job: started.append(job.name))
    settings = dict(teacher="t.gguf", deadline=0.0, distill_steps="60", overrides=[], eval_limit=None,
                    reuse_evals=earlier, max_evals=2, **LONG_DEFAULTS)
    driver.run(**settings, mixers="mlstm_swa,linear_swa,swa")
    assert sorted(p.name for p in (tmp_path / "eval").glob("*.json")) == ["mlstm_swa-converted.json", "teacher.json"]
    assert started == []  # deadline 0: nothing starts
    driver.run(**settings, mixers="mlstm_swa")  # the students not trained now: their earlier evaluations
    assert sorted(p.name for p in (tmp_path / "eval").glob("*.json")) == [
        "mlstm_swa-converted.json", "swa.json", "teacher.json"]


def test_marker_jobs_are_marked_done_only_on_success(driver, tmp_path, monkeypatch):
    ok, bad = tmp_path / "ok.done", tmp_path / "bad.done"
    monkeypatch.setattr(driver, "jobs", lambda teacher, steps: [
        driver.Job("ok", [sys.executable, "-c", "pass"], ok, marker=True),
        driver.Job("bad", [sys.executable, "-c", "raise SystemExit(3)"], bad, marker=True)])
    driver.run(teacher="t.gguf", deadline=60.0, distill_steps="60", overrides=[], eval_limit=None, reuse_evals=None,
               max_evals=2, mixers="swa", **LONG_DEFAULTS)
    assert ok.exists() and not bad.exists()


def test_report_evaluations_go_first_and_evaluations_respect_slots_and_deadline(driver, tmp_path):
    """Intermediate models (Stage I) wait until the report's evaluations have started, so that the final students'
    evaluations are never the ones a deadline cuts off; at most MAX_EVALS run and none starts that the deadline would
    cut off."""
    (tmp_path / "eval" / "teacher.json").write_text(
        json.dumps({"models": {"teacher": {"eval_seconds": 80}}, "job_seconds": 100}))
    jobs = {j.name: j for j in driver.jobs("teacher.gguf", 60)}
    stage1 = tmp_path / "mlstm_swa" / "stage1" / "model"
    stage1.mkdir(parents=True)
    (stage1 / "config.json").write_text("{}")
    for m in ("linear_swa", "swa"):
        (tmp_path / m / "stage2" / "model").mkdir(parents=True)
        (tmp_path / m / "stage2" / "model" / "config.json").write_text("{}")
    evals = [j for j in jobs.values() if j.name.startswith("eval-") and j.name != "eval-teacher"]
    names = lambda js: {j.name for j in js}  # noqa: E731
    driver.MAX_EVALS[0] = 3
    # mlstm_swa is still in Stage II: its Stage I model is ready but must not take the third slot
    assert names(driver.to_start(evals, [], 500)) == {"eval-linear_swa", "eval-swa"}
    driver.MAX_EVALS[0] = 4  # a slot beyond the reserved one: the Stage I model may have it
    assert names(driver.to_start(evals, [], 500)) == {"eval-linear_swa", "eval-swa", "eval-mlstm_swa-stage1"}
    driver.MAX_EVALS[0] = 2
    (tmp_path / "mlstm_swa" / "stage2" / "model").mkdir(parents=True)
    (tmp_path / "mlstm_swa" / "stage2" / "model" / "config.json").write_text("{}")
    assert names(driver.to_start(evals, [], 500)) == {"eval-mlstm_swa", "eval-linear_swa"}  # two slots (default)
    rest = [j for j in evals if j.name not in driver.REPORT_EVALS]
    assert names(driver.to_start(rest, [], 500)) == {"eval-mlstm_swa-stage1"}  # the report's evaluations started
    assert driver.to_start(evals, [], 50) == []  # 100 s per evaluation, 50 s left
    assert driver.to_start(evals, [jobs["eval-swa"], jobs["eval-linear_swa"]], 500) == []  # both slots taken


def test_mixers_subset_trains_only_those_students(driver, monkeypatch):
    monkeypatch.setattr(driver, "TRAINED", ["mlstm_swa"])
    names = {j.name for j in driver.jobs("teacher.gguf", 60)}
    assert names == {"targets", "eval-teacher", "align-mlstm_swa", "distill-mlstm_swa", "eval-mlstm_swa",
                     "report-mlstm_swa", "eval-mlstm_swa-converted", "eval-mlstm_swa-stage1", "long"}
    monkeypatch.setattr(driver, "TRAINED", ["swa"])
    assert not any("mlstm_swa" in j.name for j in driver.jobs("teacher.gguf", 60))


def test_long_context_job_evaluates_every_student_with_the_teacher(driver, monkeypatch):
    """One `xlstm-distill evaluate` for the teacher and all trained students (RULER and KL by position in one figure
    each), after every Stage II; --no-benchmarks leaves the lm-eval evaluations out."""
    long = next(j for j in driver.jobs("teacher.gguf", 60) if j.name == "long")
    command = " ".join(long.cmd)
    assert "evaluate --teacher teacher.gguf" in command and "--ruler niah_single_1" in command
    assert all(f"--student {m}=" in command for m in driver.MIXERS) and "--positions runs/corpora" in command
    assert len(long.needs) == 3 and long.done.name == "long_context.json"
    monkeypatch.setattr(driver, "BENCHMARKS", [False])
    assert not any(j.name.startswith("eval-") for j in driver.jobs("teacher.gguf", 60))


def test_unknown_mixer_is_refused():
    from typer.testing import CliRunner

    spec = importlib.util.spec_from_file_location("students_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        result = CliRunner().invoke(module.app, ["run", "--teacher", "t.gguf", "--mixers", "mlstm_swa,mamba"])
    finally:
        del sys.modules[spec.name]
    assert result.exit_code != 0 and "--mixers" in result.output


def test_held_out_plot_skips_missing_students_and_tolerates_unsplit_files(driver, tmp_path, monkeypatch):
    """The students' held-out comparison: one bar group per stage; a student without a file is left out, one
    whose file predates the window split gets NaN bars for the split (nothing raises)."""
    bars = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, x, h, **kw: bars.append((kw["label"], list(h))) or original(self, x, h, **kw))
    split = {"kl": 0.3, "kl_in_window": 0.01, "kl_beyond_window": 0.4}
    (tmp_path / "a.json").write_text(json.dumps({"rows": {"converted": split, "after Stage I": split}}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": {"converted": {"kl": 0.2}, "after Stage I": {"kl": 0.1}}}))
    out = tmp_path / "held_out_students.png"
    driver.plot_held_out({"mlstm_swa": tmp_path / "a.json", "swa": tmp_path / "b.json",
                          "linear_swa": tmp_path / "missing.json"}, out)
    assert out.stat().st_size > 0
    assert [label for label, _ in bars] == ["mlstm_swa", "swa"] * 3  # three panels, the missing student left out
    assert bars[0][1] == [0.3, 0.3] and bars[1][1] == [0.2, 0.1]
    assert bars[4][1] == [0.4, 0.4] and all(v != v for v in bars[5][1])  # beyond the window: swa has NaN


def test_eval_command_records_the_whole_job_time(driver, tmp_path, monkeypatch):
    """The eval command writes evaluate_models' result plus its whole wall time, which eval_estimate then uses."""
    import xlstm_distill.evaluation as evaluation

    calls = []
    monkeypatch.setattr(evaluation, "evaluate_models", lambda models, tasks, **kw: calls.append(
        (list(models), tasks, kw["cache_dir"])) or {"models": {"m": {"eval_seconds": 1.0}}})
    monkeypatch.setattr(driver, "STARTED", time.time() - 50)  # the process started 50 s ago
    out = tmp_path / "eval" / "m.json"
    driver.eval("m", "some/model", out)
    assert calls == [(["m"], driver.TASKS, tmp_path / "eval-cache")]
    result = json.loads(out.read_text())
    assert result["models"] == {"m": {"eval_seconds": 1.0}} and 50 <= result["job_seconds"] < 60
    assert driver.eval_estimate() == result["job_seconds"]


def _run_folder(root, name, stage1, stage2, kl, paired, extra=False):
    """A result folder as `report` leaves it: budget, comparison (mlstm_swa paired against both baselines), held-out."""
    run = root / name
    run.mkdir()
    budget = {f"{m}/stage2": {"tokens": stage2} for m in ("mlstm_swa", "linear_swa", "swa")}
    budget.update({f"{m}/stage1": {"tokens": stage1} for m in ("mlstm_swa", "linear_swa")})
    (run / "budget.json").write_text(json.dumps(budget))

    def entry(alpha, recovery, **more):
        return {"critical_tolerance": alpha, "mean_recovery": recovery, "win_and_tie": {"0": 0.5}, **more}

    per_task = {t: {"difference": d, "stderr": 0.01, "documents": 100} for t, d in (("a", paired), ("b", paired + 0.02))}
    models = {"mlstm_swa": entry(0.0, 1.01, paired_vs_baselines={"linear_swa": per_task, "swa": per_task}),
              "linear_swa": entry(0.0, 1.0), "swa": entry(0.01, 0.98)}
    (run / "results.json").write_text(json.dumps({"comparison": {"models": models}}))
    if extra:
        (run / "learning-curve").mkdir()
        (run / "learning-curve" / "results.json").write_text(json.dumps(
            {"comparison": {"models": {"mlstm_swa-converted": entry(0.02, 0.95), "mlstm_swa-stage1": entry(0.0, 0.99)}}}))
    for m, value in kl.items():
        (run / f"held_out_{m}.json").write_text(json.dumps(
            {"rows": {"after Stage II": {"kl": value, "kl_beyond_window": value + 0.1}}}))
    return run


def test_curve_puts_every_run_and_student_on_one_token_axis(driver, tmp_path):
    """`curve`: one row per student and run at its own tokens (swa: Stage II only), the intermediate mlstm_swa models
    where a run has them, and mlstm_swa's differences to each baseline (paired scores, held-out KL)."""
    short = _run_folder(tmp_path, "short", 100, 50, {"mlstm_swa": 0.40, "linear_swa": 0.42, "swa": 0.50}, 0.01)
    long = _run_folder(tmp_path, "long", 300, 150, {"mlstm_swa": 0.30, "linear_swa": 0.29, "swa": 0.45}, -0.01,
                       extra=True)
    driver.curve([short, long], out=tmp_path / "curves")
    rows = json.loads((tmp_path / "curves" / "learning_curves.json").read_text())
    assert [(r["run"], r["model"], r["tokens"]) for r in rows] == [
        ("short", "mlstm_swa", 150), ("short", "linear_swa", 150), ("short", "swa", 50),
        ("long", "mlstm_swa", 450), ("long", "linear_swa", 450), ("long", "swa", 150),
        ("long", "mlstm_swa-converted", 0), ("long", "mlstm_swa-stage1", 300)]
    mine = rows[3]
    assert mine["paired_vs_linear_swa"]["difference"] == pytest.approx(0.0)  # (-0.01 + 0.01) / 2
    assert mine["paired_vs_swa"]["stderr"] == pytest.approx((2 * 0.01 ** 2) ** 0.5 / 2)
    assert mine["kl_vs_linear_swa"] == {"difference": pytest.approx(0.01), "stderr": None}  # no per-sequence rows
    assert mine["kl_beyond_window_vs_swa"]["difference"] == pytest.approx(-0.15)
    assert rows[6]["alpha_star"] == 0.02 and "kl" not in rows[6]
    assert (tmp_path / "curves" / "learning_curves.png").stat().st_size > 0
    assert (tmp_path / "curves" / "learning_curves.md").read_text().count("\n") == 2 + len(rows)
