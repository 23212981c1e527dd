"""``xlstm-distill evaluate`` (teacher, students and baselines through lm-evaluation-harness) and ``merge``."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from xlstm_distill.cli.common import fail as _fail
from xlstm_distill.cli.common import parse_assignments, parse_sizes, split_commas as _split_commas, torch_dtype as _torch_dtype
from xlstm_distill.evaluation.harness import DEFAULT_TASKS
from xlstm_distill.teacher import DEFAULT_TEACHER


def evaluate(
    student: Annotated[
        list[str],
        typer.Option("--student", "-s", help="Student model folder (save_pretrained); NAME=PATH to name it. Repeatable."),
    ],
    teacher: Annotated[
        str, typer.Option("--teacher", help="Teacher: embedded name (smollm2-135m), .gguf file, folder or hub id.")
    ] = DEFAULT_TEACHER,
    tasks: Annotated[
        Optional[list[str]],
        typer.Option(
            "--tasks", "-t",
            help="Tasks (comma-separated or repeated): offline xd_* tasks or any lm-eval task/group "
            f"(needs the hub). Default: {','.join(DEFAULT_TASKS)}.",
        ),
    ] = None,
    limit: Annotated[
        Optional[float], typer.Option(help="Documents per task (or a fraction < 1); for smoke tests only.")
    ] = None,
    shots: Annotated[
        Optional[list[str]],
        typer.Option("--shots", help="Few-shot override TASK=N (repeatable), e.g. --shots arc_challenge=5."),
    ] = None,
    baseline: Annotated[
        Optional[list[str]],
        typer.Option(
            "--baseline", "-b",
            help="Baseline NAME=PATH (model folder, hub id or .gguf, evaluated like the student) or "
            "NAME=scores.json (published scores {task: score}). Repeatable.",
        ),
    ] = None,
    metric: Annotated[
        Optional[list[str]], typer.Option("--metric", help="Primary metric TASK=METRIC, e.g. xd_hellaswag=acc.")
    ] = None,
    batch_size: Annotated[str, typer.Option(help="lm-eval batch size (an integer or 'auto').")] = "8",
    max_length: Annotated[Optional[int], typer.Option(help="Context length for lm-eval.")] = None,
    max_gen_toks: Annotated[Optional[int], typer.Option(help="Generation budget of generative tasks.")] = None,
    chat_template: Annotated[
        bool, typer.Option("--chat-template/--no-chat-template", help="Apply the tokenizer's chat template.")
    ] = False,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the report goes.")] = Path("runs/eval"),
    cache_dir: Annotated[
        Optional[Path],
        typer.Option(help="Keep every model's answers here as they are computed, so that a rerun with the same "
                     "folder resumes an interrupted evaluation (lm-eval's request cache, one file per model version)."),
    ] = None,
    log_samples: Annotated[
        bool,
        typer.Option("--log-samples", help="Keep every document's score: the report adds paired differences to the "
                     "teacher and of each student to each baseline (and lm-eval's per-document outputs go to the "
                     "output folder)."),
    ] = False,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1, cpu (default: cuda if available).")] = None,
    dtype: Annotated[
        Optional[str], typer.Option(help="Weights dtype for every model (default bfloat16 on GPU, float32 on CPU).")
    ] = None,
    ruler: Annotated[
        Optional[list[str]],
        typer.Option("--ruler", help="Long context: RULER tasks built offline (niah_single_1, niah_multikey_2, "
                     "niah_multikey_3; comma-separated or repeated): accuracy by context length for every model. "
                     "Without --tasks, only these run."),
    ] = None,
    ruler_lengths: Annotated[str, typer.Option(help="Context lengths of the RULER tasks.")] = "1k,2k,4k,8k",
    ruler_samples: Annotated[int, typer.Option(help="RULER samples per task and length.")] = 50,
    ruler_file: Annotated[
        Optional[Path],
        typer.Option(help="A RULER set built by `xlstm-distill data ruler` (instead of --ruler, --ruler-lengths and "
                     "--ruler-samples; no lm-eval needed)."),
    ] = None,
    positions: Annotated[
        Optional[Path],
        typer.Option("--positions", help="Long context: an offline corpora folder or a data file whose held-out long "
                     "documents give KL to the teacher and perplexity by position, every student."),
    ] = None,
    position_length: Annotated[int, typer.Option(help="Tokens per long document.")] = 8192,
    position_documents: Annotated[int, typer.Option(help="Long documents to use.")] = 8,
    position_bucket: Annotated[int, typer.Option(help="Width of the position buckets (tokens).")] = 512,
) -> None:
    """Evaluate the teacher, the student(s) and baselines with identical lm-eval settings and write a report
    (results.json, report.md, win_and_tie.png): recovery rates, C_0, C_0.01, C_0.05 and alpha*."""
    import torch

    from xlstm_distill.evaluation.harness import evaluate_models
    from xlstm_distill.evaluation.report import write_report

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _torch_dtype(dtype, device)
    ruler_tasks = _split_commas(ruler)
    task_list = _split_commas(tasks) or ([] if ruler_tasks or ruler_file or positions else list(DEFAULT_TASKS))
    try:
        shot_overrides = {k: int(v) for k, v in parse_assignments(shots, "--shots").items()}
    except ValueError as err:
        raise typer.BadParameter(f"shot counts must be integers ({err})", param_hint="--shots") from None
    metrics = parse_assignments(metric, "--metric")
    bs: int | str = int(batch_size) if batch_size.isdigit() else batch_size
    lim: int | float | None = int(limit) if limit is not None and limit >= 1 and limit == int(limit) else limit

    models: dict = {}
    teacher_key = teacher

    @functools.cache  # loaded once for every part of the evaluation
    def teacher_loader():
        from xlstm_distill import load_teacher

        return load_teacher(teacher, dtype=torch_dtype, device=device)

    models[teacher_key] = teacher_loader
    for item in student:
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, Path(item).name or item
        models[_unique(name, models)] = _folder_loader(path, torch_dtype, device)

    external: dict[str, dict[str, float]] = {}
    baseline_names: list[str] = []
    for name, path in parse_assignments(baseline, "--baseline").items():
        if path.endswith(".json") and Path(path).is_file():
            scores = json.loads(Path(path).read_text())
            if not isinstance(scores, dict) or not all(isinstance(v, (int, float)) for v in scores.values()):
                raise _fail(f"{path} must hold a JSON object {{task: score}}.")
            external[name] = {k: float(v) for k, v in scores.items()}
        else:
            key = _unique(name, models)
            models[key] = _folder_loader(path, torch_dtype, device)
            baseline_names.append(key)

    try:
        if positions is not None:
            _positions(models, teacher_key, positions, position_length, position_documents, position_bucket,
                       output_dir)
        if ruler_tasks or ruler_file:
            _ruler(models, teacher_key, ruler_tasks, parse_sizes(ruler_lengths), ruler_samples, bs, device, output_dir,
                   ruler_file)
        if not task_list:
            return
        results = evaluate_models(
            models, task_list, num_fewshot=shot_overrides or None, limit=lim, batch_size=bs, max_length=max_length,
            apply_chat_template=chat_template, output_dir=output_dir, metrics=metrics or None,
            max_gen_toks=max_gen_toks, device=device, cache_dir=cache_dir, log_samples=log_samples,
        )
    except (ValueError, FileNotFoundError, OSError, ImportError) as err:
        raise _fail(str(err)) from None
    if external:
        results = {**results, "models": dict(results["models"])}
        for name, scores in external.items():
            key = _unique(name, results["models"])
            results["models"][key] = {"source": "given scores", "scores": scores, "stderr": {k: None for k in scores}}
            baseline_names.append(key)
    paths = write_report(results, teacher_key, output_dir, baselines=baseline_names or None)
    _print_summary(paths["json"])
    typer.echo(f"Report: {paths['markdown']}  plot: {paths['plot']}  data: {paths['json']}")


def _ruler(models: dict, teacher_key: str, tasks: list[str], lengths: list[int], samples: int, batch_size,
           device: str, output_dir: Path, ruler_file: Path | None = None) -> None:
    """RULER accuracy by context length for every model (long_context.json, .md, .png)."""
    from xlstm_distill.evaluation.long_context import ruler_scores, write_long_context

    teacher = models[teacher_key]()
    loaded = {name: teacher if name == teacher_key else spec for name, spec in models.items()}
    scores = ruler_scores(loaded, teacher[1], tasks, lengths, samples, batch_size if isinstance(batch_size, int) else 8,
                          device=device, ruler_file=ruler_file)
    files = write_long_context(scores, output_dir)
    typer.echo(files["markdown"].read_text())


def _positions(models: dict, teacher_key: str, data: Path, length: int, count: int, bucket: int,
               output_dir: Path) -> None:
    """KL to the teacher and perplexity by position on the held-out long documents of ``data`` (by_position.*); for
    students with an output gate, its mean per head and the memory's horizon (output_gates.*)."""
    import torch

    from xlstm_distill.data import Source, held_out_split, long_documents, offline_sources
    from xlstm_distill.evaluation.long_context import by_position, output_gates, write_by_position, write_output_gates

    sources = offline_sources(data) if (data / "manifest.json").exists() else [Source(data)]
    teacher, tokenizer = models[teacher_key]()
    documents = long_documents([held_out_split(s, held_out=True) for s in sources], tokenizer, length, count)
    if not documents:
        raise ValueError(f"No held-out document of {data} has {length} tokens: lower --position-length.")
    rows, gates, windows = {}, {}, set()
    for name, loader in models.items():
        if name != teacher_key:
            student = loader()[0]
            rows[name] = by_position(student, teacher, documents, bucket)
            if getattr(student.config, "uses_swa", False):
                windows.add(student.config.window_size)
                with torch.no_grad():
                    gates[name] = output_gates(student, documents, student.config.window_reach)
            del student
    files = write_by_position(rows, output_dir, len(documents), length, bucket, None)
    typer.echo(files["markdown"].read_text())
    for line in write_output_gates(gates, output_dir, min(windows, default=0)):
        typer.echo(line)


def _unique(name: str, taken) -> str:
    key, i = name, 2
    while key in taken:
        key, i = f"{name}-{i}", i + 1
    return key


def _folder_loader(path: str, dtype, device: str):
    def load():
        from xlstm_distill.evaluation.harness import load_model

        return load_model(path, device=device, dtype=dtype)

    return load


def _print_summary(results_json: Path) -> None:
    data = json.loads(results_json.read_text())
    comparison = data["comparison"]
    for name, row in comparison["models"].items():
        cs = ", ".join(f"C_{a}={v:.3f}" if v is not None else f"C_{a}=n/a" for a, v in row["win_and_tie"].items())
        a_star = row["critical_tolerance"]
        typer.echo(f"{name} ({row['role']}): {cs}, alpha*={a_star if a_star is None else round(a_star, 4)}")


def _sweep_default(name: str):
    """The default of one sweep setting (``SweepConfig``, the single place they live)."""
    from xlstm_distill.merging.config import SweepConfig

    return SweepConfig.__dataclass_fields__[name].default


def merge(
    experts: Annotated[list[Path], typer.Argument(help="Expert model folders (save_pretrained, safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the merged model.")],
    weights: Annotated[
        Optional[list[str]],
        typer.Option(
            "--weights", "-w",
            help="One non-negative weight per expert (comma-separated or repeated); normalized to sum 1. "
            "Default: uniform.",
        ),
    ] = None,
    sweep: Annotated[bool, typer.Option(
        "--sweep", help="Choose the weights on held-out text instead: minimize KL(teacher || merged) over the "
        "--sweep-data domains' sweep split (documents the report never measures, which a recipe with experts.sweep "
        "keeps out of training).")] = False,
    sweep_data: Annotated[Optional[list[str]], typer.Option(
        "--sweep-data", help="A domain for --sweep, repeated: NAME=PATH or PATH (a .jsonl/.txt/... file or folder, "
        "e.g. runs/corpora/math.jsonl); its sweep split is used.")] = None,
    teacher: Annotated[Optional[str], typer.Option(
        help="--sweep: the teacher the experts were distilled from (embedded name, .gguf, folder or hub id).")] = None,
    seq_len: Annotated[int, typer.Option(help="--sweep: tokens per packed sweep sequence.")] = 1024,
    objective: Annotated[str, typer.Option(
        help="--sweep: `mean` KL over the domains or the `worst` domain's.")] = _sweep_default("objective"),
    sequences: Annotated[int, typer.Option(help="--sweep: sequences per domain.")] = _sweep_default("sequences"),
    batch_size: Annotated[int, typer.Option(help="--sweep: batch size.")] = _sweep_default("batch_size"),
    grid: Annotated[int, typer.Option(
        help="--sweep: simplex grid of weights in multiples of 1/grid.")] = _sweep_default("grid"),
    refine: Annotated[int, typer.Option(
        help="--sweep: refinement rounds after the grid (step 1/(2 grid), halved each round).")] = _sweep_default("refine"),
    device: Annotated[Optional[str], typer.Option(help="--sweep: cuda, cpu (default: cuda if available).")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace the files of a non-empty output folder.")] = False,
) -> None:
    """Stage III: merge experts linearly, theta = sum_i lambda_i theta_i (tensor by tensor, low memory), with given
    weights or (--sweep) the weights that minimize the held-out KL to the teacher; merge_info.json records them."""
    from xlstm_distill.merging import MergeError
    from xlstm_distill.merging import merge as merge_experts

    parsed: list[float] | None = None
    if weights:
        try:
            parsed = [float(w) for w in _split_commas(weights)]
        except ValueError:
            raise typer.BadParameter(f"weights must be numbers, got {weights}", param_hint="--weights") from None
    if not sweep and (sweep_data or teacher):
        raise _fail("--sweep-data and --teacher are for --sweep: add --sweep to choose the weights on held-out text.")
    try:
        if sweep:
            folder = _merge_with_sweep(experts, out, parsed, sweep_data, teacher, seq_len, objective, sequences,
                                       batch_size, grid, refine, device, max_shard_size, overwrite)
        else:
            folder = merge_experts(experts, parsed, out, max_shard_size=max_shard_size, overwrite=overwrite)
    except (MergeError, ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    info = json.loads((folder / "merge_info.json").read_text())
    lambdas = ", ".join(f"{w:.4g}" for w in info["normalized_weights"])
    typer.echo(f"Merged {len(experts)} experts with weights [{lambdas}] into {folder}")


def _merge_with_sweep(experts, out, weights, sweep_data, teacher, seq_len, objective, sequences, batch_size, grid,
                      refine, device, max_shard_size, overwrite) -> Path:
    import torch

    from xlstm_distill.data import PackedDataset, Source, data_split
    from xlstm_distill.merging import SweepConfig, merge_with_sweep, sweep_batches
    from xlstm_distill.teacher import load_teacher

    if weights is not None:
        raise ValueError("--weights and --sweep both set the merge weights: give one of them.")
    if not sweep_data:
        raise ValueError("--sweep needs held-out text for each domain: pass --sweep-data NAME=PATH once per domain "
                         "(e.g. --sweep-data math=runs/corpora/math.jsonl).")
    if not teacher:
        raise ValueError("--sweep measures KL to the teacher: pass --teacher, the teacher the experts were distilled "
                         "from (e.g. --teacher smollm2-135m).")
    config = SweepConfig(objective=objective, sequences=sequences, batch_size=batch_size, grid=grid, refine=refine)
    paths = {}
    for item in sweep_data:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (Path(item).name.split(".")[0], item)
        if name in paths:
            raise ValueError(f"Two --sweep-data domains are named {name!r}: name them, NAME=PATH.")
        if not Path(path).exists():
            raise FileNotFoundError(f"--sweep-data {item}: {path} does not exist.")
        paths[name] = path
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_teacher(teacher, device=device)
    domains = {name: sweep_batches(PackedDataset(data_split(Source(path, name=name), "sweep"), tokenizer, seq_len),
                                   config, name) for name, path in paths.items()}
    data = {"teacher": teacher, "domains": {name: {"path": str(path), "seq_len": seq_len} for name, path in paths.items()}}
    return merge_with_sweep(experts, out, model.eval(), domains, config, data=data,
                            device=device, dtype=torch.bfloat16 if device.startswith("cuda") else None,
                            log=typer.echo, max_shard_size=max_shard_size, overwrite=overwrite)


def register(app: typer.Typer) -> None:
    app.command(help="Teacher vs student(s) on benchmarks (lm-evaluation-harness): recovery, Win-and-Tie, alpha*.")(evaluate)
    app.command(help="Stage III: linear weight merge of expert students (Eq. 14).")(merge)
