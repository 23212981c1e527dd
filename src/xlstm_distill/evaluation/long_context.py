"""Long-context evaluation: lm-evaluation-harness's RULER needle-in-a-haystack tasks at several context lengths,
and held-out KL / perplexity to the teacher by position on long documents.

RULER: the tasks that build their haystack locally (``niah_single_1``: a repeated-sentence haystack with one
needle; ``niah_multikey_2`` / ``niah_multikey_3``: haystacks of needle-like lines), sized by the tokenizer of the
model under test to each length in ``lengths`` (lm-eval's ``max_seq_lengths`` metadata). Fully offline: the tasks'
import-time download of nltk's sentence-splitter data is answered by a small copy shipped with this package (the
tasks above never split sentences). A task makes 500 samples per length; the first ``samples`` of each length are
evaluated, the same documents for every model.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")
RULER_LENGTHS = (1024, 2048, 4096, 8192)
NLTK_DATA = Path(__file__).with_name("nltk_data")


@contextlib.contextmanager
def offline_ruler() -> Iterator[None]:
    """nltk finds the shipped punkt_tab (no download at import), and the datasets library stays offline."""
    saved = {k: os.environ.get(k) for k in ("NLTK_DATA", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(NLTK_DATA=str(NLTK_DATA), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    try:
        import nltk

        if str(NLTK_DATA) not in nltk.data.path:
            nltk.data.path.insert(0, str(NLTK_DATA))
    except ImportError:
        pass
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _missing_dependencies() -> list[str]:
    import importlib.util

    return [name for name in ("wonderwords", "nltk") if importlib.util.find_spec(name) is None]


class RulerTasks:
    """RULER tasks built by lm-evaluation-harness for a tokenizer and a set of lengths (the same documents for every
    model): the first ``samples`` documents of each length, as the requests lm-eval would send a model."""

    def __init__(self, tokenizer: Any, tasks: Sequence[str] = RULER_TASKS, lengths: Sequence[int] = RULER_LENGTHS,
                 samples: int = 50) -> None:
        missing = _missing_dependencies()
        if missing:
            raise ImportError(f"The RULER tasks need {', '.join(missing)}: pip install wonderwords nltk "
                              "(or pip install 'lm-eval[ruler]'); or score a RULER set built elsewhere "
                              "(`xlstm-distill data ruler`, evaluate.ruler_file).")
        unknown = sorted(set(tasks) - set(RULER_TASKS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a RULER task that builds its data offline; "
                             f"choose from {', '.join(RULER_TASKS)}.")
        if samples < 1 or any(int(n) < 256 for n in lengths):
            raise ValueError(f"RULER needs samples >= 1 and lengths >= 256, got {samples} and {list(lengths)}.")
        from lm_eval.tasks import TaskManager

        self.lengths, self.samples = [int(n) for n in lengths], samples
        self.tokenizer = tokenizer
        self._dir = tempfile.TemporaryDirectory()
        tokenizer.save_pretrained(self._dir.name)  # the tasks load the tokenizer by name
        with offline_ruler():
            manager = TaskManager(metadata={"max_seq_lengths": self.lengths, "tokenizer": self._dir.name})
            self.tasks = manager.load(list(tasks))["tasks"]
        self.names = list(tasks)
        # the first `samples` documents of each length, by index in each task's test set
        self.indices: dict[str, list[int]] = {}
        for name in self.names:
            docs = list(self.tasks[name].test_docs())
            by_length: dict[int, list[int]] = {n: [] for n in self.lengths}
            for index, doc in enumerate(docs):
                if len(by_length[doc["max_length"]]) < samples:
                    by_length[doc["max_length"]].append(index)
            self.indices[name] = [i for n in self.lengths for i in by_length[n]]

    def ruler_set(self) -> RulerSet:
        """The chosen documents as lm-eval's requests: the prompt exactly as lm-eval builds it (template and answer
        prefix), its generation settings and the needle values that score it."""
        from xlstm_distill.teacher import tokenizer_hash

        requests = []
        for name in self.names:
            task = self.tasks[name]
            with offline_ruler():
                task.build_all_requests(samples=self.indices[name], rank=0, world_size=1)
            for instance in task.instances:
                context, gen_kwargs = instance.args
                until = gen_kwargs.get("until") or []
                requests.append({"task": name, "length": int(instance.doc["max_length"]),
                                 "index": int(instance.doc_id), "context": context,
                                 "max_gen_toks": int(gen_kwargs.get("max_gen_toks", 256)),
                                 "until": [until] if isinstance(until, str) else list(until),
                                 "outputs": list(instance.doc["outputs"])})
        return RulerSet(self.names, self.lengths, self.samples, requests, tokenizer_hash(self.tokenizer))


class RulerSet:
    """RULER requests ready to score without lm-eval: built by :class:`RulerTasks` (or ``xlstm-distill data
    ruler``), saved as JSON and scored on any machine with the tokenizer that built them. Scoring is lm-eval's: every
    prompt greedy-decoded as lm-eval's HF model does (prompts sorted longest first, batched with left padding, cut at
    the stop strings and the end-of-sequence token), then RULER's string match (the share of the needle values in the
    answer, case-insensitive)."""

    FORMAT = "xlstm-distill-ruler/1"

    def __init__(self, names: Sequence[str], lengths: Sequence[int], samples: int, requests: list[dict],
                 fingerprint: str) -> None:
        self.names, self.lengths, self.samples = list(names), [int(n) for n in lengths], samples
        self.requests, self.fingerprint = requests, fingerprint

    def save(self, path: str | os.PathLike) -> Path:
        """Written atomically (a temporary file renamed into place)."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"format": self.FORMAT, "tasks": self.names, "lengths": self.lengths,
                                   "samples": self.samples, "tokenizer": self.fingerprint, "requests": self.requests}))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer: Any) -> RulerSet:
        """The set in ``path``, refused when it was built with another tokenizer than ``tokenizer``."""
        import json

        from xlstm_distill.teacher import tokenizer_hash

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"RULER set {path} not found: build it with `xlstm-distill data ruler --out {path}`.")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ValueError(f"{path} is not a RULER set (format {cls.FORMAT}): build it with `xlstm-distill data "
                             "ruler`.")
        if data["tokenizer"] != tokenizer_hash(tokenizer):
            raise ValueError(f"{path} was built with another tokenizer (its haystacks are sized in that tokenizer's "
                             "tokens): build it again with the tokenizer of the models under test.")
        return cls(data["tasks"], data["lengths"], data["samples"], data["requests"], data["tokenizer"])

    def answers(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 8) -> list[str]:
        """The model's answer to every request (in the order of ``requests``)."""
        return generate_answers(model, tokenizer, self.requests, max(self.lengths), batch_size)

    def needle_distances(self, tokenizer: Any) -> list[list[int | None]]:
        """Per request, for each needle value: the prompt tokens from where the value begins (its last copy) to the
        prompt's end, as the model gets the prompt (cut to the longest length less the answer's tokens); None for a
        value the prompt does not hold."""
        keep = max(self.lengths)
        distances = []
        for request in self.requests:
            context = request["context"]
            total = min(len(tokenizer(context).input_ids), keep - request["max_gen_toks"])
            found = [context.rfind(value) for value in request["outputs"]]
            distances.append([total - len(tokenizer(context[:at]).input_ids) if at >= 0 else None for at in found])
        return distances

    def within_window(self, tokenizer: Any, window: int,
                      distances: list[list[int | None]] | None = None) -> dict[str, dict[int, float]]:
        """{task: {length: share}}: the score of a model that reads only the last ``window`` tokens of each prompt
        and answers every needle it sees there: the share of needle values that begin within ``window`` tokens of
        the prompt's end. A student whose RULER accuracy equals this retrieves nothing from beyond its window."""
        distances = self.needle_distances(tokenizer) if distances is None else distances
        return self.by_length([sum(d is not None and d <= window for d in row) / len(row) for row in distances])

    def beyond_window(self, scores: Sequence[float], window: int,
                      distances: list[list[int | None]]) -> dict[str, dict[int, dict[str, float]]]:
        """{task: {length: {"accuracy", "requests"}}}: a model's mean score (``scores``, one per request, from
        :meth:`score_requests`) on the requests whose every needle value begins more than ``window`` tokens before
        the prompt's end: what it retrieves from beyond a window of that size (its memory or full-attention heads)."""
        chosen: dict[str, dict[int, list[float]]] = {name: {} for name in self.names}
        for score, request, row in zip(scores, self.requests, distances):
            if all(d is not None and d > window for d in row):
                chosen[request["task"]].setdefault(request["length"], []).append(score)
        return {name: {n: {"accuracy": sum(v) / len(v), "requests": len(v)} for n in self.lengths if (v := by.get(n))}
                for name, by in chosen.items()}

    def by_length(self, values: Sequence[float]) -> dict[str, dict[int, float]]:
        """{task: {length: mean}} of one value per request."""
        per_length: dict[str, dict[int, list[float]]] = {name: {n: [] for n in self.lengths} for name in self.names}
        for request, value in zip(self.requests, values):
            per_length[request["task"]][request["length"]].append(value)
        return {name: {n: sum(v) / len(v) for n, v in lengths.items() if v} for name, lengths in per_length.items()}

    def score_requests(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 8) -> list[float]:
        """RULER's string match of the model's answer to every request (in the order of ``requests``)."""
        answers = self.answers(model, tokenizer, batch_size)
        return [string_match_all(answer, request["outputs"]) for request, answer in zip(self.requests, answers)]

    def score(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 8) -> dict[str, dict[int, float]]:
        """{task: {length: accuracy}} (RULER's string match of the needle values in the answer)."""
        return self.by_length(self.score_requests(model, tokenizer, batch_size))


def string_match_all(answer: str, needles: Sequence[str]) -> float:
    """RULER's score of one answer: the share of ``needles`` found in it, case-insensitive, after its clean-up
    (surrounding space stripped, control characters made line breaks)."""
    import re

    answer = re.sub(r"[\x00-\x1f]", "\n", answer.strip()).strip().lower()
    return sum(needle.lower() in answer for needle in needles) / len(needles)


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, requests: Sequence[Mapping[str, Any]], max_length: int,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers as lm-eval's HF model gives them: requests grouped by generation settings, longest prompt
    first, batches left-padded, each prompt left-truncated to ``max_length - max_gen_toks`` tokens, generation stopped
    at the end-of-sequence token and cut at the first stop string."""
    device = next(model.parameters()).device
    eos = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # what generate() stops at
    stop_ids = sorted({tokenizer.eos_token_id, *([] if stop_ids is None else torch.tensor(stop_ids).view(-1).tolist())})
    lengths = [len(tokenizer(r["context"]).input_ids) for r in requests]
    groups: dict[tuple, list[int]] = {}  # by generation settings, each longest prompt first
    for i, r in enumerate(requests):
        groups.setdefault((tuple(r["until"]), r["max_gen_toks"]), []).append(i)
    batches = [order[k:k + batch_size] for order in (sorted(g, key=lambda i: (-lengths[i], requests[i]["context"]))
                                                     for g in groups.values()) for k in range(0, len(order), batch_size)]
    answers: list[str] = [""] * len(requests)
    side = tokenizer.padding_side
    progress = tqdm(total=len(requests), desc="RULER", unit="prompt", disable=not requests)
    for batch in batches:
        until, max_new = requests[batch[0]]["until"], requests[batch[0]]["max_gen_toks"]
        tokenizer.padding_side = "left"
        try:
            enc = tokenizer([requests[i]["context"] for i in batch], padding="longest", return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        keep = max_length - max_new
        ids, mask = enc.input_ids[:, -keep:].to(device), enc.attention_mask[:, -keep:].to(device)  # (B, T)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad, eos_token_id=stop_ids, use_cache=True)
        for i, row in zip(batch, out[:, ids.shape[1]:].tolist()):
            text = tokenizer.decode(row, skip_special_tokens=True)
            for stop in [*until, eos]:
                if stop:
                    text = text.split(stop)[0]
            answers[i] = text
        progress.update(len(batch))
    progress.close()
    return answers


def ruler_scores(models: Mapping[str, Any], tokenizer: Any, tasks: Sequence[str] = RULER_TASKS,
                 lengths: Sequence[int] = RULER_LENGTHS, samples: int = 50, batch_size: int = 8,
                 device: str | None = None, ruler_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """RULER accuracy of every model by task and length. ``models``: ``{name: spec}`` as for
    :func:`xlstm_distill.evaluation.evaluate_models` (a loaded ``(model, tokenizer)``, a reference or a loader);
    loaded from references one at a time. ``tokenizer`` sizes the haystacks (the teacher's: students share it).
    ``ruler_file``: a saved :class:`RulerSet` (its tasks, lengths and samples replace the arguments; no lm-eval
    needed). Returns ``{"settings", "models": {name: {task: {length: accuracy}}}, "seconds": {name: s},
    "per_request": {name: [score of each request]}, "needle_distance": [[tokens from each needle value to the
    prompt's end] per request], "within_window": {window: {task: {length: share}}}, "beyond_window": {window: {name:
    {task: {length: {"accuracy", "requests"}}}}}}``, the last two for each window of the students scored
    (:meth:`RulerSet.within_window`: what the window alone can answer; :meth:`RulerSet.beyond_window`: each model's
    accuracy on the needles outside it)."""
    from xlstm_distill.evaluation.harness import load_model

    if ruler_file is not None:
        built = RulerSet.load(ruler_file, tokenizer)
    else:
        built = RulerTasks(tokenizer, tasks, lengths, samples).ruler_set()
    out: dict[str, Any] = {"settings": {"tasks": built.names, "lengths": built.lengths, "samples": built.samples,
                                        "batch_size": batch_size}, "models": {}, "seconds": {}, "per_request": {},
                           "needle_distance": built.needle_distances(tokenizer), "within_window": {}, "beyond_window": {}}
    for name, spec in models.items():
        start = time.perf_counter()
        loaded_here = not isinstance(spec, tuple)
        if callable(spec):
            model, tok = spec()
        elif loaded_here:
            model, tok = load_model(spec, device=device)
        else:
            model, tok = spec
        log.info("RULER: %s", name)
        out["per_request"][name] = built.score_requests(model, tok, batch_size)
        out["models"][name] = built.by_length(out["per_request"][name])
        out["seconds"][name] = round(time.perf_counter() - start, 1)
        window = getattr(model.config, "window_size", None) if getattr(model.config, "uses_swa", False) else None
        if window is not None and str(window) not in out["within_window"]:
            out["within_window"][str(window)] = built.within_window(tokenizer, window, out["needle_distance"])
        if loaded_here:
            del model, tok
            gc.collect()
    for window in out["within_window"]:
        out["beyond_window"][window] = {name: built.beyond_window(scores, int(window), out["needle_distance"])
                                        for name, scores in out["per_request"].items()}
    return out


def write_long_context(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """``long_context.json``, ``long_context.md`` (accuracy per task and length, every model, and the share of needles
    inside each student window; then each model's accuracy on the needles beyond that window) and
    ``long_context.png`` (accuracy against length) in ``out_dir``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = results["settings"]
    lengths = settings["lengths"]
    lines = [f"RULER accuracy ({settings['samples']} samples per task and length; lm-evaluation-harness tasks built "
             "offline, string match of the needle values). _Needle in the last W tokens_: the share of needles that a "
             "model reading only its window of W tokens can see.", "",
             "| task | model | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for task in settings["tasks"]:
        for name, scores in results["models"].items():
            lines.append(f"| {task} | {name} | " + " | ".join(_cells(scores[task], lengths)) + " |")
        for window, scores in results.get("within_window", {}).items():
            lines.append(f"| {task} | _needle in the last {window} tokens_ | " + " | ".join(_cells(scores[task], lengths))
                         + " |")
    for window, models in results.get("beyond_window", {}).items():
        lines += ["", f"Accuracy on the needles that begin more than {window} tokens before the prompt's end (beyond the "
                  "window: what the memory or full-attention heads retrieve), with the number of such requests.", "",
                  "| task | model | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
        for task in settings["tasks"]:
            for name, scores in models.items():
                cells = _cells(scores[task], lengths, lambda c: f"{c['accuracy']:.3f} ({c['requests']})")
                lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    paths = {"json": out / "long_context.json", "markdown": out / "long_context.md", "plot": out / "long_context.png"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["markdown"].write_text("\n".join(lines) + "\n")
    plot_ruler(results, paths["plot"])
    return paths


def _cells(by_length: Mapping[Any, Any], lengths: Sequence[int], fmt: Any = "{:.3f}".format) -> list[str]:
    """Table cells of one row {length: value}, the lengths as numbers or (read back from JSON) as strings."""
    values = [by_length.get(n, by_length.get(str(n))) for n in lengths]
    return ["" if v is None else fmt(v) for v in values]


# ------------------------------------------------------------------------------------- KL and perplexity by position


@torch.no_grad()
def by_position(student: torch.nn.Module, teacher: torch.nn.Module, documents: Sequence[torch.Tensor],
                bucket: int) -> dict[str, list[float]]:
    """Next-token KL(teacher || student) and both models' cross-entropy, averaged per position bucket of ``bucket``
    tokens over ``documents`` (1-D token tensors, one forward each, positions from the document's start).
    Returns ``{"start": [...], "kl": [...], "student_ce": [...], "teacher_ce": [...], "tokens": [...]}``."""
    device = next(student.parameters()).device
    length = max(len(d) for d in documents)
    n = -(-(length - 1) // bucket)
    sums = {key: torch.zeros(n, dtype=torch.float64) for key in ("kl", "student_ce", "teacher_ce", "tokens")}
    for doc in documents:
        ids = doc.to(device)[None]  # (1, T)
        logp_t = F.log_softmax(teacher(ids, use_cache=False).logits[0, :-1].float(), -1)  # (T-1, V)
        logp_s = F.log_softmax(student(ids).logits[0, :-1].float(), -1)
        target = ids[0, 1:, None]
        values = {"kl": (logp_t.exp() * (logp_t - logp_s)).sum(-1), "student_ce": -logp_s.gather(-1, target)[:, 0],
                  "teacher_ce": -logp_t.gather(-1, target)[:, 0], "tokens": torch.ones(len(target), device=device)}
        index = torch.arange(len(target), device=device) // bucket
        for key, value in values.items():
            sums[key].index_add_(0, index.cpu(), value.double().cpu())
    tokens = sums["tokens"].clamp(min=1)
    return {"start": [i * bucket for i in range(n)], "kl": (sums["kl"] / tokens).tolist(),
            "student_ce": (sums["student_ce"] / tokens).tolist(),
            "teacher_ce": (sums["teacher_ce"] / tokens).tolist(), "tokens": sums["tokens"].tolist()}


@torch.no_grad()
def output_gates(student: torch.nn.Module, documents: Sequence[torch.Tensor], reach: int) -> dict[str, list]:
    """How much each head uses its memory, and how far back the memory reaches.

    ``inside`` / ``beyond``: the output gate o (the memory's share of the mix) of every layer and head as the mixer
    applies it (0 within the window's reach of a student with ``exact_within_window``), averaged over the tokens of
    ``documents`` inside the window's reach (positions < ``reach``) and beyond it. ``horizon``: the memory's horizon
    in tokens, 1 / mean(-log f) over all tokens: the distance over which the forget gates f multiply a stored
    token's weight by 1/e (a token must lie within a few horizons to be read back); only for mixers with a forget gate.
    Returns ``{"inside": [[...] per head] per layer, "beyond": ..., "horizon": ..., "tokens": ...}`` (NaN for heads
    that keep full attention and for layers without the gate); empty for a mixer without an output gate."""
    from xlstm_distill.modeling.attention import window_only_within_reach

    layers = [layer.self_attn for layer in student.model.layers]
    gated = [i for i, mixer in enumerate(layers) if hasattr(mixer, "gate_proj") and mixer.gate_proj.output_gate]
    if not gated:
        return {}
    forgets = [i for i in gated if layers[i].gate_proj.memory_gates]
    device = next(student.parameters()).device
    shape = (len(layers), layers[0].num_heads)
    sums = {part: torch.zeros(shape, dtype=torch.float64) for part in ("inside", "beyond", "forget")}
    counts = {"inside": 0, "beyond": 0}
    captured: dict[int, torch.Tensor] = {}
    hooks = [layers[i].gate_proj.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, out))
             for i in gated]
    try:
        for doc in documents:
            captured.clear()
            student(doc.to(device)[None])
            position = torch.arange(len(doc), device=device)[None]  # (1, T)
            inside = position[0] < reach  # (T,)
            for index, gates in captured.items():
                mixer, gates = layers[index], gates.transpose(1, 2)  # (1, G*NH, T)
                NH = mixer.num_heads
                if mixer.gate_proj.memory_gates:  # [input, forget, output]: -log f = softplus(-pre-activation)
                    sums["forget"][index] += F.softplus(-gates[0, NH:2 * NH].float()).sum(-1).double().cpu()
                if mixer.exact_reach is not None:  # as the mixer applies it: the window branch alone within the reach
                    gates = window_only_within_reach(gates, position, mixer.exact_reach, NH)
                o = torch.sigmoid(gates[0, -NH:].float()).T  # (T, NH)
                for part, where in (("inside", inside), ("beyond", ~inside)):
                    sums[part][index] += o[where].sum(0).double().cpu()
            counts["inside"] += int(inside.sum())
            counts["beyond"] += int((~inside).sum())
    finally:
        for hook in hooks:
            hook.remove()
    horizon = (counts["inside"] + counts["beyond"]) / sums.pop("forget")
    for index, mixer in enumerate(layers):  # heads that keep full attention and layers without the gate: NaN
        for a, b, kept in mixer.q_runs:
            for part, values in (*sums.items(), ("horizon", horizon)):
                if kept or index not in (forgets if part == "horizon" else gated):
                    values[index, a:b] = float("nan")
    result = {part: (sums[part] / max(counts[part], 1)).tolist() for part in sums} | {"tokens": counts}
    return result | ({"horizon": horizon.tolist()} if forgets else {})


def plot_output_gates(gates: Mapping[str, Mapping[str, list]], path: Path) -> None:
    """Heat maps (layers x heads), one column per model: the mean output gate beyond the window and, for mixers with
    a forget gate, the memory's horizon (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    rows = 2 if any("horizon" in values for values in gates.values()) else 1
    fig, axes = plt.subplots(rows, len(gates), figsize=(3.2 * len(gates) + 0.8, 4.4 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.45, wspace=0.35)
    for ax, (name, values) in zip(axes[0], gates.items()):
        image = ax.imshow(values["beyond"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{name}\nmean output gate beyond the window", fontsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="o (memory's share)")
    if rows == 2:
        for ax, (name, values) in zip(axes[1], gates.items()):
            if "horizon" not in values:
                ax.axis("off")
                continue
            horizon = torch.tensor(values["horizon"], dtype=torch.float64).numpy()
            image = ax.imshow(horizon, norm=LogNorm(vmin=10, vmax=1e5), cmap="magma", aspect="auto")
            ax.set_title(f"{name}\nmemory horizon 1 / mean(-log f)", fontsize=8)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
        fig.colorbar(image, ax=axes[1].tolist(), label="tokens")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def output_gate_lines(gates: Mapping[str, Mapping[str, list]], window: int) -> list[str]:
    """One line per model of :func:`output_gates`: the memory's mean share beyond and inside the window, the heads
    that give it more than half, and (with a forget gate) the memory's horizon against the window."""
    lines = []
    for label, values in gates.items():
        beyond = torch.tensor(values["beyond"])
        lines.append(f"{label}: mean output gate beyond the window {beyond.nanmean():.3f} (inside "
                     f"{torch.tensor(values['inside']).nanmean():.3f}); heads above 0.5: "
                     f"{int((beyond > 0.5).sum())} of {int(beyond.isfinite().sum())} mixer heads")
        if "horizon" in values:  # can the memory reach past the window at all?
            horizon = torch.tensor(values["horizon"])
            horizon = horizon[horizon.isfinite()]
            lines.append(f"{label}: memory horizon median {horizon.median():.0f} tokens, max {horizon.max():.0f}; "
                         f"heads beyond the window ({window}): {int((horizon > window).sum())} of {horizon.numel()}")
    return lines


def write_output_gates(gates: Mapping[str, Mapping[str, list]], out_dir: str | os.PathLike, window: int) -> list[str]:
    """``output_gates.json`` and ``.png`` in ``out_dir`` for the models with an output gate; returns the summary
    lines (:func:`output_gate_lines`)."""
    import json

    gates = {label: values for label, values in gates.items() if values}
    if not gates:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "output_gates.json").write_text(json.dumps(gates, indent=2))
    plot_output_gates(gates, out / "output_gates.png")
    return output_gate_lines(gates, window)


def perplexity(ce: Sequence[float]) -> list[float]:
    return [math.exp(x) for x in ce]


def write_by_position(rows: Mapping[str, Mapping[str, list[float]]], out_dir: str | os.PathLike, documents: int,
                      length: int, bucket: int, window: int | None) -> dict[str, Path]:
    """``by_position.json``, ``by_position.md`` (KL and perplexity per bucket, every model; the teacher's perplexity)
    and ``by_position.png`` in ``out_dir``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(rows)
    first = rows[labels[0]]
    lines = [f"KL(teacher || model) and perplexity by position: {documents} held-out documents of {length} tokens, "
             f"buckets of {bucket}" + (f", window {window}" if window else "") + ".", "",
             "| positions | teacher ppl | " + " | ".join(f"{label} KL | {label} ppl" for label in labels) + " |",
             "|---|---|" + "---|---|" * len(labels)]
    for i, start in enumerate(first["start"]):
        cells = [f"{rows[label]['kl'][i]:.4f} | {perplexity(rows[label]['student_ce'])[i]:.2f}" for label in labels]
        lines.append(f"| {start}-{start + bucket - 1} | {perplexity(first['teacher_ce'])[i]:.2f} | "
                     + " | ".join(cells) + " |")
    paths = {"json": out / "by_position.json", "markdown": out / "by_position.md", "plot": out / "by_position.png"}
    paths["json"].write_text(json.dumps({"documents": documents, "length": length, "bucket": bucket,
                                         "window": window, "rows": rows}, indent=2))
    paths["markdown"].write_text("\n".join(lines) + "\n")
    plot_by_position(rows, paths["plot"], window)
    return paths


# ------------------------------------------------------------------------------------------------------------ plots


def plot_ruler(results: Mapping[str, Any], path: Path) -> None:
    """Accuracy against context length, one panel per task, teacher and every student in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["settings"]["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, scores in results["models"].items():
            points = sorted((int(n), acc) for n, acc in scores[task].items())
            ax.plot(*zip(*points), "--o" if name == "teacher" else "-o", label=name, markersize=4)
        for window, scores in results.get("within_window", {}).items():
            points = sorted((int(n), share) for n, share in scores[task].items())
            ax.plot(*zip(*points), ":", color="0.4", label=f"needle in the last {window} tokens")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"accuracy ({results['settings']['samples']} samples per length)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_by_position(rows: Mapping[str, Mapping[str, list[float]]], path: Path, window: int | None = None) -> None:
    """KL to the teacher (left) and perplexity (right) against position, every model in one figure; the teacher's
    perplexity dashed; the window's reach as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    first = next(iter(rows.values()))
    for name, row in rows.items():
        mid = [s + (row["start"][1] - row["start"][0]) / 2 if len(row["start"]) > 1 else s for s in row["start"]]
        left.plot(mid, row["kl"], "-o", label=name, markersize=3)
        right.plot(mid, perplexity(row["student_ce"]), "-o", label=name, markersize=3)
    mid = [s + (first["start"][1] - first["start"][0]) / 2 if len(first["start"]) > 1 else s for s in first["start"]]
    right.plot(mid, perplexity(first["teacher_ce"]), "k--", label="teacher")
    for ax, label in ((left, "KL(teacher || model)"), (right, "perplexity")):
        if window:
            ax.axvline(window, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("position in the document (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
