"""On one GPU: distill SmolLM2-135M-Instruct into three students side by side, then evaluate them.

Every stage is an ``xlstm-distill`` command on recipes/smollm2-135m-students.yaml (one run per mixer; the teacher
targets are shared); this script only schedules them on one GPU within a wall-clock deadline. Run it again to
continue: checkpoints, targets and finished evaluations under runs/smollm2-135m/ are kept and reused.

    python benchmarks/smollm2_students.py run --teacher T.gguf --deadline 540 --distill-steps 100000
    python benchmarks/smollm2_students.py run --teacher T.gguf --deadline 560 --distill-steps auto

``--distill-steps auto`` gives the three students the same Stage II step count, the largest that lets them finish
and be evaluated before the deadline (measured step rate and teacher evaluation time of the earlier run).
``report`` writes runs/smollm2-135m/report/ (lm-eval report of teacher + students, learning curve, budget).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

ROOT = Path("runs/smollm2-135m")
RECIPE = "recipes/smollm2-135m-students.yaml"
MIXERS = ("mlstm_swa", "linear_swa", "swa")
TASKS = ["xd_piqa", "xd_arc_easy", "xd_arc_challenge", "xd_hellaswag", "xd_winogrande", "xd_mmlu", "xd_lambada"]
# documents per task (MMLU: per subject, 57 subjects); the paper's shot counts
LIMITS = {"xd_piqa": 500, "xd_arc_easy": 500, "xd_arc_challenge": 300, "xd_hellaswag": 300, "xd_winogrande": 500,
          "xd_mmlu": 10, "xd_lambada": 500}
TOKENS_PER_STEP = 4 * 4096  # both stages: 4 sequences of 4,096 tokens per optimizer step (the recipe)
MAX_EVALS = [2]  # evaluations at a time, --max-evals (each holds batch x length x vocabulary float32 logits)
# an evaluation's eval_seconds leave out the process start, imports and lm-eval's task building: files written before
# the whole job's time was recorded (job_seconds) get this margin (an evaluation started with about 420 s left
# against a 393-s estimate did not finish in time)
STARTUP_MARGIN = 60.0
STARTED = time.time()  # this process's start (the eval command records its whole time)
app = typer.Typer(add_completion=False)


@dataclass
class Job:
    name: str
    cmd: list[str]
    done: Path  # exists when the job has finished
    needs: list[Path] = field(default_factory=list)  # files that must exist before it starts
    marker: bool = False  # ``done`` is a marker the driver writes when the command succeeds
    proc: subprocess.Popen | None = None

    def ready(self) -> bool:
        return all(p.exists() for p in self.needs)


TRAINED = list(MIXERS)  # --mixers: the students trained (and evaluated) by this run; the others' evaluations reused
OVERRIDES: list[str] = []  # --set values for every stage (smoke tests: tiny steps and sequences)
EVAL_LIMIT: list[str] = []  # --limit for every evaluation (smoke tests)
BENCHMARKS = [True]  # --no-benchmarks: no lm-eval evaluations (training, held-out reports and long context only)
# long context, once every student is trained: RULER by length and KL by position, teacher and students together
LONG = {"ruler": "niah_single_1,niah_multikey_2,niah_multikey_3", "ruler_lengths": "1k,2k,4k,8k", "ruler_samples": "20",
        "corpora": "runs/corpora", "position_length": "8192", "position_documents": "8", "position_bucket": "512"}


def _cli(stage: str, mixer: str, teacher: str, *extra: str) -> list[str]:
    sets = [x for o in OVERRIDES for x in ("--set", o)]
    return [sys.executable, "-m", "xlstm_distill.cli", stage, RECIPE, "--set", f"teacher={teacher}",
            "--set", f"student.mixer={mixer}", "--set", f"out_dir={ROOT / mixer}", *sets, *extra]


def _eval_job(name: str, model: str, needs: list[Path]) -> Job:
    out = ROOT / "eval" / f"{name}.json"
    limit = ["--limit", EVAL_LIMIT[0]] if EVAL_LIMIT else []
    return Job(f"eval-{name}", [sys.executable, __file__, "eval", name, model, str(out), *limit], out, needs)


def _long_job(teacher: str) -> Job:
    """RULER accuracy by context length and KL / perplexity by position for the teacher and every trained student in
    one process (one figure each): ``xlstm-distill evaluate --ruler ... --positions ...`` into ROOT/long/."""
    stage2 = {m: ROOT / m / "stage2" / "model" for m in TRAINED}
    students = [arg for m, path in stage2.items() for arg in ("--student", f"{m}={path}")]
    options = [arg for key, value in LONG.items() if value
               for arg in (f"--{key.replace('_', '-')}" if key != "corpora" else "--positions", value)]
    return Job("long", [sys.executable, "-m", "xlstm_distill.cli", "evaluate", "--teacher", teacher, *students,
                        *options, "--output-dir", str(ROOT / "long")],
               ROOT / "long" / ("long_context.json" if LONG["ruler"] else "by_position.json"),
               [p / "config.json" for p in stage2.values()])


def _targets_done() -> Path:
    return ROOT / "targets" / "complete"


def jobs(teacher: str, distill_steps: int) -> list[Job]:
    """Every job of a run; without benchmarks (``--no-benchmarks``) the lm-eval evaluations are left out."""
    out = _jobs(teacher, distill_steps)
    return out if BENCHMARKS[0] else [j for j in out if not j.name.startswith("eval-")]


def _jobs(teacher: str, distill_steps: int) -> list[Job]:
    stage1 = {m: ROOT / m / "stage1" / "model" / "config.json" for m in TRAINED}
    stage2 = {m: ROOT / m / "stage2" / "model" / "config.json" for m in TRAINED}
    out = [
        Job("targets", _cli("targets", "mlstm_swa", teacher), _targets_done(), marker=True),
        _eval_job("teacher", teacher, []),
    ]
    for m in TRAINED:
        out.append(Job(f"align-{m}", _cli("align", m, teacher), stage1[m]))
        out.append(Job(f"distill-{m}", _cli("distill", m, teacher, "--set", f"distill.steps={distill_steps}"), stage2[m],
                       [stage1[m], _targets_done()]))
        out.append(_eval_job(m, str(stage2[m].parent), [stage2[m]]))
        out.append(Job(f"report-{m}", _cli("report", m, teacher), ROOT / m / "report" / "held_out.json", [stage2[m]]))
    if LONG["ruler"] or LONG["corpora"]:
        out.append(_long_job(teacher))
    if "mlstm_swa" in TRAINED:
        init, mid = ROOT / "mlstm_swa" / "student-init", ROOT / "mlstm_swa" / "stage1" / "model"
        out.append(_eval_job("mlstm_swa-converted", str(init), [init / "tokenizer_config.json"]))  # saved last
        out.append(_eval_job("mlstm_swa-stage1", str(mid), [mid / "config.json"]))
    return out


REPORT_EVALS = {f"eval-{n}" for n in ("teacher", *MIXERS)}  # the report needs these; converted/Stage I come last


def to_start(pending: list[Job], running: list[Job], seconds_left: float) -> list[Job]:
    """The ready jobs to start now: training jobs always; evaluations at most MAX_EVALS at a time and none that the
    deadline would cut off. Intermediate models (converted, Stage I) take only slots that the report's evaluations
    not started yet leave free (a late Stage II student must not find its slot taken)."""
    evals = sum(j.name.startswith("eval-") for j in running)
    fits = seconds_left >= eval_estimate()
    reserved = sum(j.name in REPORT_EVALS for j in pending)
    out = []
    for job in (j for j in pending if j.ready()):
        if job.name.startswith("eval-"):
            report = job.name in REPORT_EVALS
            if not fits or evals + (0 if report else reserved) >= MAX_EVALS[0]:
                continue
            evals += 1
            reserved -= report
        out.append(job)
    return out


def _start(job: Job) -> None:
    log = open(ROOT / "logs" / f"{job.name}.log", "a")
    job.proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"[{time.strftime('%H:%M:%S')}] start {job.name}", flush=True)


def _stop(job: Job) -> None:
    if job.proc is not None and job.proc.poll() is None:
        os.killpg(job.proc.pid, signal.SIGTERM)
        try:
            job.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(job.proc.pid, signal.SIGKILL)


def auto_steps(deadline: float) -> int:
    """Largest common Stage II step count that finishes (and is evaluated) before ``deadline`` (time.time())."""
    reached, rates = [], []
    for m in TRAINED:
        rows = _metrics(ROOT / m / "stage2" / "metrics.jsonl")
        reached.append(rows[-1]["step"] if rows else 0)
        rates += [TOKENS_PER_STEP / r["tokens_per_s"] for r in rows[-20:]]
    if not rates:
        print("auto: no Stage II metrics yet, 100 steps")
        return 100
    seconds_per_step = sorted(rates)[len(rates) // 2]
    eval_seconds = eval_estimate() * -(-len(TRAINED) // MAX_EVALS[0])  # the students' evaluations, MAX_EVALS at a time
    budget = deadline - time.time() - eval_seconds - 60  # 60 s: saving, loading, the last checkpoint
    steps = min(reached) + int(budget / seconds_per_step)
    steps = max(steps - steps % 20, max(reached))
    print(f"auto: {seconds_per_step:.2f} s/step, evaluation ~{eval_seconds:.0f} s, reached {reached} -> {steps} steps")
    return steps


def _runnable(pending: list[Job], failed: Job) -> list[Job]:
    """``pending`` without the jobs that need ``failed``'s output, directly or through other dropped jobs."""
    lost = {failed.done}
    while True:
        keep = [j for j in pending if not lost & set(j.needs)]
        if len(keep) == len(pending):
            return keep
        lost |= {j.done for j in pending if j not in keep}
        pending = keep


def eval_estimate() -> float:
    """Seconds one evaluation job takes: the slowest finished one (default 300), its whole job where recorded."""
    def job(result: dict) -> float:
        if "job_seconds" in result:
            return result["job_seconds"]
        return max(m["eval_seconds"] for m in result["models"].values()) + STARTUP_MARGIN

    return max((job(json.loads(f.read_text())) for f in (ROOT / "eval").glob("*.json")), default=300.0)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@app.command()
def run(teacher: str = typer.Option(...), deadline: float = typer.Option(540.0, help="Seconds from now."),
        distill_steps: str = typer.Option("auto"), overrides: list[str] = typer.Option([], "--set"),
        eval_limit: str | None = typer.Option(None), max_evals: int = typer.Option(2, help="Evaluations at a time."),
        mixers: str = typer.Option(",".join(MIXERS), help="Students to train now (comma-separated); with "
                                   "--reuse-evals the others' evaluations are taken from the earlier run."),
        reuse_evals: Path | None = typer.Option(None, help="Folder of earlier evaluations with the same settings: "
                                                "the teacher's and the converted student's (no training: the "
                                                "same models) are taken from it instead of being re-run, and those "
                                                "of the students not in --mixers."),
        ruler_samples: int = typer.Option(20, help="RULER samples per task and length (0: no RULER)."),
        long_corpora: str = typer.Option("runs/corpora", help="Offline corpora whose held-out long documents give "
                                         "KL by position ('': none)."),
        long_length: int = typer.Option(8192, help="Tokens of each long document (KL by position)."),
        benchmarks: bool = typer.Option(True, help="Evaluate teacher and students on the understanding tasks.")) -> None:
    """Run / continue all stages and evaluations until done or the deadline; then write the report if complete."""
    OVERRIDES.extend(overrides)
    BENCHMARKS[0] = benchmarks
    LONG.update(ruler="" if ruler_samples < 1 else LONG["ruler"], ruler_samples=str(ruler_samples),
                corpora=long_corpora, position_length=str(long_length))
    MAX_EVALS[0] = max_evals
    if max_evals < 1:
        raise typer.BadParameter(f"--max-evals must be at least 1, got {max_evals}")
    TRAINED[:] = [m.strip() for m in mixers.split(",") if m.strip()]
    if not TRAINED or set(TRAINED) - set(MIXERS):
        raise typer.BadParameter(f"--mixers takes a comma-separated subset of {', '.join(MIXERS)}; got {mixers!r}")
    EVAL_LIMIT.extend([eval_limit] if eval_limit else [])
    start = time.time()
    end = start + deadline
    (ROOT / "logs").mkdir(parents=True, exist_ok=True)
    (ROOT / "eval").mkdir(exist_ok=True)
    untrained = [m for m in MIXERS if m not in TRAINED]  # their Stage II (and Stage I) models: an earlier run's
    intermediate = ["mlstm_swa-stage1"] if "mlstm_swa" in untrained else []
    for name in ("teacher", "mlstm_swa-converted", *untrained, *intermediate):
        earlier, here = (reuse_evals / f"{name}.json") if reuse_evals else None, ROOT / "eval" / f"{name}.json"
        if earlier is not None and earlier.exists() and not here.exists():
            here.write_text(earlier.read_text())
    steps = auto_steps(end) if distill_steps == "auto" else int(distill_steps)
    pending = [j for j in jobs(teacher, steps) if not j.done.exists()]
    running: list[Job] = []
    while (pending or running) and time.time() < end:
        for job in to_start(pending, running, end - time.time()):
            _start(job)
            pending.remove(job)
            running.append(job)
        for job in list(running):
            if job.proc.poll() is not None:
                running.remove(job)
                if job.marker and job.proc.returncode == 0:
                    job.done.touch()
                ok = job.done.exists()
                print(f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'} {job.name} "
                      f"(exit {job.proc.returncode})", flush=True)
                if not ok:  # jobs waiting for its output, directly or not, cannot run
                    pending = _runnable(pending, job)
        time.sleep(2)
    for job in running:
        print(f"deadline: stopping {job.name}", flush=True)
        _stop(job)
    with open(ROOT / "timing.jsonl", "a") as fh:
        fh.write(json.dumps({"start": start, "seconds": time.time() - start, "distill_steps": steps}) + "\n")
    if all((ROOT / "eval" / f"{m}.json").exists() for m in ("teacher", *MIXERS)):
        report()


@app.command()
def eval(name: str, model: str, out: Path, limit: float | None = None) -> None:  # noqa: A001 (command name)
    """Evaluate one model on the issue's tasks and limits; write evaluate_models' result to ``out``."""
    import torch

    from xlstm_distill.evaluation import evaluate_models
    from xlstm_distill.evaluation.harness import load_model

    results = evaluate_models({name: lambda: load_model(model, dtype=torch.float32)}, TASKS,
                              limit=LIMITS if limit is None else (int(limit) if limit >= 1 else limit), batch_size=8,
                              log_samples=True,  # per-document scores: the report's paired differences
                              # an evaluation a deadline stopped resumes in the next call (lm-eval's cache needs sqlitedict)
                              cache_dir=ROOT / "eval-cache" if importlib.util.find_spec("sqlitedict") else None)
    results["job_seconds"] = round(time.time() - STARTED, 2)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)


@app.command()
def report() -> None:
    """Combine the evaluations into reports (teacher vs students), plus the learning curve and the budget."""
    from xlstm_distill.evaluation import combine_results, write_report

    names = ["teacher", *MIXERS, "mlstm_swa-converted", "mlstm_swa-stage1"]
    results = combine_results([ROOT / "eval" / f"{n}.json" for n in names if (ROOT / "eval" / f"{n}.json").exists()])
    out = ROOT / "report"
    students = [n for n in MIXERS if n in results["models"]]  # all three once every evaluation has run
    baselines = [n for n in ("linear_swa", "swa") if n in students]
    understanding = _subset(results, ["teacher", *students], TASKS[:-1])  # the six tasks of the target
    paths = write_report(understanding, "teacher", out, baselines=baselines)
    write_report(_subset(results, ["teacher", *students], TASKS), "teacher", out / "with-lambada", baselines=baselines)
    curve = write_report(_subset(results, list(results["models"]), TASKS[:-1]), "teacher", out / "learning-curve",
                         baselines=baselines)
    budget = _budget()
    (out / "budget.json").write_text(json.dumps(budget, indent=2))
    _plot_curve(json.loads(curve["json"].read_text()), budget, out / "learning_curve.png")
    plot_held_out({m: ROOT / m / "report" / "held_out.json" for m in MIXERS}, out / "held_out_students.png")
    print(paths["markdown"].read_text())


def plot_held_out(files: dict[str, Path], path: Path) -> None:
    """Held-out KL(teacher || student) of the students after each stage: all tokens, tokens the window + sinks
    cover, tokens beyond them (bars side by side; students whose file is missing are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {m: json.loads(f.read_text())["rows"] for m, f in files.items() if f.exists()}
    stages = list(dict.fromkeys(stage for r in rows.values() for stage in r))  # every student's, in order
    parts = (("kl", "all tokens"), ("kl_in_window", "inside the window"), ("kl_beyond_window", "beyond the window"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    width = 0.8 / len(rows)
    for ax, (key, title) in zip(axes, parts):
        for n, (mixer, by_stage) in enumerate(rows.items()):
            values = [by_stage.get(stage, {}).get(key, float("nan")) for stage in stages]
            xs = [x + (n - (len(rows) - 1) / 2) * width for x in range(len(stages))]
            ax.bar(xs, values, width=width, label=mixer)
        ax.set_xticks(range(len(stages)), stages, fontsize=8)
        ax.set_title(f"held-out KL, {title}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("KL(teacher || student), nats / token")
    axes[1].legend(fontsize=8, loc="upper left")  # the inside-window panel is low on its left
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _subset(results: dict, models: list[str], tasks: list[str]) -> dict:
    """The results of some models on some tasks (every per-task dictionary filtered)."""
    def keep(value):
        return {k: v for k, v in value.items() if k in tasks} if isinstance(value, dict) else value

    settings = {k: keep(v) for k, v in results["settings"].items()}
    settings["tasks"] = [t for t in results["settings"]["tasks"] if t in tasks]
    entries = {n: {k: keep(v) for k, v in results["models"][n].items()} for n in models if n in results["models"]}
    return {**results, "settings": settings, "models": entries}


def _budget() -> dict:
    """Tokens and throughput of every stage (from the training logs) and the wall time of the runs."""
    out: dict = {"runs": _metrics(ROOT / "timing.jsonl")}  # one line per invocation: start, seconds, steps
    for m in MIXERS:
        for stage in ("stage1", "stage2"):
            rows = _metrics(ROOT / m / stage / "metrics.jsonl")
            if rows:
                rates = sorted(r["tokens_per_s"] for r in rows)
                out[f"{m}/{stage}"] = {"steps": rows[-1]["step"], "tokens": rows[-1]["step"] * TOKENS_PER_STEP,
                                       "median_tokens_per_s": rates[len(rates) // 2],
                                       "final_loss": rows[-1]["loss"]}
    manifest = ROOT / "targets" / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        out["targets"] = {k: m.get(k) for k in ("k", "seq_len", "num_sequences", "complete")}
    return out


def _plot_curve(report: dict, budget: dict, path: Path) -> None:
    """alpha* and average recovery of the mlstm_swa student against training tokens (converted, Stage I, II)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s1 = budget.get("mlstm_swa/stage1", {}).get("tokens", 0)
    s2 = s1 + budget.get("mlstm_swa/stage2", {}).get("tokens", 0)
    points = [("mlstm_swa-converted", 0), ("mlstm_swa-stage1", s1), ("mlstm_swa", s2)]
    comp = report["comparison"]["models"]
    pts = [(t / 1e6, comp[n]["critical_tolerance"] if comp[n]["critical_tolerance"] is not None else float("nan"), sum(comp[n]["recovery"].values()) / len(comp[n]["recovery"]))
           for n, t in points if n in comp]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "-o")
    axes[0].set_ylabel("alpha* (lower is better)")
    axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "-o")
    axes[1].set_ylabel("average recovery (student / teacher)")
    for ax in axes:
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
    fig.suptitle("mlstm_swa student of SmolLM2-135M-Instruct: converted, after Stage I, after Stage II")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@app.command()
def curve(runs: list[Path] = typer.Argument(..., help="Result folders of runs of the recipe with different budgets "
                                             "(results.json, budget.json, held_out_<mixer>.json; learning-curve/ "
                                             "adds the converted and Stage I mlstm_swa student)."),
          out: Path = typer.Option(..., help="Folder for learning_curves.png / .json / .md.")) -> None:
    """The three students' learning curves across runs: alpha*, mean recovery, mlstm_swa's paired score difference to
    each baseline and its held-out KL difference to each baseline, against training tokens (Stage I + II)."""
    from xlstm_distill.metrics import mean_paired_difference

    rows = []
    for run in runs:
        budget = json.loads((run / "budget.json").read_text())
        tokens = {m: sum(budget.get(f"{m}/{s}", {}).get("tokens", 0) for s in ("stage1", "stage2")) for m in MIXERS}
        stage1 = budget.get("mlstm_swa/stage1", {}).get("tokens", 0)
        models = json.loads((run / "results.json").read_text())["comparison"]["models"]
        curve_file = run / "learning-curve" / "results.json"  # + the converted and Stage I student, where evaluated
        intermediate = json.loads(curve_file.read_text())["comparison"]["models"] if curve_file.exists() else {}
        held = {m: json.loads((run / f"held_out_{m}.json").read_text())["rows"]["after Stage II"] for m in MIXERS}
        points = [(m, models[m], tokens[m]) for m in MIXERS]
        for name, tok in (("mlstm_swa-converted", 0), ("mlstm_swa-stage1", stage1)):
            points += [(name, intermediate[name], tok)] if name in intermediate else []
        for name, entry, tok in points:
            row = {"run": run.name, "model": name, "tokens": tok, "alpha_star": entry["critical_tolerance"],
                   "mean_recovery": entry["mean_recovery"], "c0": entry["win_and_tie"]["0"]}
            if name in MIXERS:
                row.update(kl=held[name]["kl"], kl_beyond_window=held[name]["kl_beyond_window"])
            if name == "mlstm_swa":
                for b in ("linear_swa", "swa"):
                    row[f"paired_vs_{b}"] = mean_paired_difference(entry["paired_vs_baselines"][b])
                    for key in ("kl", "kl_beyond_window"):
                        row[f"{key}_vs_{b}"] = _kl_difference(held[name], held[b], key)
            rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning_curves.json").write_text(json.dumps(rows, indent=1))
    lines = ["| run | model | tokens (M) | C_0 | alpha* | mean recovery | held-out KL (beyond window) |",
             "|---" * 7 + "|"]
    for r in rows:
        kl = f"{r['kl']:.4f} ({r['kl_beyond_window']:.4f})" if "kl" in r else ""
        alpha = "-" if r["alpha_star"] is None else f"{r['alpha_star']:.3f}"  # None: no benchmark scored
        lines.append(f"| {r['run']} | {r['model']} | {r['tokens'] / 1e6:.2f} | {r['c0']:.3f} | {alpha} | "
                     f"{r['mean_recovery']:.3f} | {kl} |")
    (out / "learning_curves.md").write_text("\n".join(lines) + "\n")
    _plot_curves(rows, out / "learning_curves.png")
    print("\n".join(lines))


def _kl_difference(a: dict, b: dict, key: str) -> dict:
    """Held-out KL of student ``a`` minus student ``b`` (one report row each), paired over the held-out sequences with
    its standard error where the reports kept them (``per_sequence``), else the plain difference (stderr None)."""
    from xlstm_distill.metrics import paired_kl_difference

    if "per_sequence" in a and "per_sequence" in b:
        paired = paired_kl_difference(a["per_sequence"][key], b["per_sequence"][key])
        if paired is not None:
            return paired
    return {"difference": a[key] - b[key], "stderr": None}


def _plot_curves(rows: list[dict], path: Path) -> None:
    """Four panels against training tokens: alpha* and mean recovery of every student; mlstm_swa minus each baseline
    in paired score (+- 2 standard errors) and in held-out KL after Stage II."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for mixer in MIXERS:
        pts = sorted((r["tokens"] / 1e6, r) for r in rows if r["model"].split("-")[0] == mixer)
        for ax, key in ((axes[0, 0], "alpha_star"), (axes[0, 1], "mean_recovery")):
            values = [float("nan") if r[key] is None else r[key] for _, r in pts]
            ax.plot([t for t, _ in pts], values, "-o", label=mixer)
    mine = sorted((r["tokens"] / 1e6, r) for r in rows if r["model"] == "mlstm_swa")
    for n, baseline in enumerate(("linear_swa", "swa")):
        xs = [t + (n - 0.5) * 0.08 for t, _ in mine]  # side by side
        diffs = [r[f"paired_vs_{baseline}"] for _, r in mine]
        color = f"C{MIXERS.index(baseline)}"  # the baseline's colour in the panels above
        axes[1, 0].errorbar(xs, [d["difference"] for d in diffs], yerr=[2 * d["stderr"] for d in diffs], fmt="-o",
                            capsize=3, color=color, label=f"mlstm_swa - {baseline}")
        for key, style in (("kl", "-o"), ("kl_beyond_window", "--s")):
            diffs = [r[f"{key}_vs_{baseline}"] for _, r in mine]
            axes[1, 1].errorbar(xs, [d["difference"] for d in diffs], fmt=style, capsize=3, color=color,
                                yerr=[2 * (d["stderr"] or 0.0) for d in diffs],
                                label=f"{'all tokens' if key == 'kl' else 'beyond the window'}, - {baseline}")
    titles = (("alpha* (lower is better; 0 = lossless)", "alpha*"),
              ("mean recovery on the six tasks", "student / teacher score"),
              ("paired score difference, six tasks (+- 2 se)", "mlstm_swa - baseline"),
              ("held-out KL after Stage II (+- 2 paired se; below 0: mlstm_swa closer)",
               "mlstm_swa - baseline, nats / token"))
    for ax, (title, ylabel) in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("training tokens of the student, Stage I + II (M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.axhline(0, color="black", lw=0.8)
    fig.suptitle("Three students of SmolLM2-135M-Instruct (window 64) at two budgets", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    app()
