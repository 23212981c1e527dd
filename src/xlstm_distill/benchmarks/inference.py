"""`xlstm-distill bench`: teacher vs student inference speed and memory with identical model dimensions.

- Prefill: one forward over (B, C) prompt tokens that fills the cache and returns the last token's logits:
  time to first token (TTFT) and prefill tokens/s.
- Decode: one new token per row per step, time per step (latency per token) and tokens/s = B / step time.
  Teacher: transformers with a static KV cache of the context length, the step replayed as a CUDA graph (what
  ``torch.compile(mode="reduce-overhead")`` does, without its compile time); a static cache attends over its
  whole length, so the step time at cache length L is the cost of every token of a generation that ends at L.
  The cache values do not change the cost, so the teacher's cache is not filled by a prefill.
  Student: a real prefill of ``min(C, student_prefill)`` tokens (all C with ``student_prefill=0``; the state has its
  final size once the window is full, so its cost does not depend on C; a student with full-attention heads
  prefills all C, since those heads' keys and values grow with it), then
  :class:`~xlstm_distill.modeling.decode.StaticDecoder`; the row records the tokens prefilled (``prefilled``).
- Bandwidth floor of a decode step: the bytes a step must read (the weights, without the input embedding table when
  it is not the output head's: a lookup reads B rows; the student's whole cache, the teacher's static KV cache) over
  the device's memory bandwidth (``floor_ms``; ``of_floor`` = step time / floor; the bandwidth and where it came
  from in ``bandwidth_gbs`` / ``bandwidth_source``: ``--bandwidth``, NVIDIA's specification of the named GPU
  (:data:`BANDWIDTH_GBS`), or the memory clock and bus width the device reports). Writes are not counted.
- Memory: peak allocated GPU memory of each point; ``flat_steps`` decodes that many student tokens and records the
  allocated memory along the way (it must not grow).
Out-of-memory points are recorded with status ``oom`` and skip the larger contexts of that batch size.
Random weights (``--shape``) give the same speed as trained ones; ``--model`` benchmarks a real checkpoint.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, StaticCache
from tqdm import tqdm

from xlstm_distill.benchmarks.report import first_line, sync, time_call
from xlstm_distill.modeling import HybridConfig
from xlstm_distill.modeling.cache import CACHE_FIELD, cache_of
from xlstm_distill.modeling.decode import GraphedStep, StaticDecoder
from xlstm_distill.modeling.student import HybridForCausalLM

_LONG = dict(max_position_embeddings=131072)
SHAPES: dict[str, dict] = {
    "llama3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, **_LONG,
                        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                        **_LONG, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, **_LONG),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         **_LONG, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}


def shape_config(name: str) -> PreTrainedConfig:
    """Teacher config of a named model shape (random weights are built from it)."""
    if name not in SHAPES:
        raise ValueError(f"Unknown shape {name!r}; choose one of {', '.join(SHAPES)} (or pass --model for a checkpoint).")
    fields = dict(SHAPES[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def spread_full_heads(num_layers: int, num_kv_heads: int, fraction: float) -> list[list[int]]:
    """``round(fraction x layers x KV heads)`` full-attention heads spread evenly over the layers (for speed and
    memory any heads cost the same): ``[[layer, kv_head], ...]``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the fraction of KV heads must be in [0, 1], got {fraction}")
    total = num_layers * num_kv_heads
    count = 0 if fraction == 0 else max(1, round(fraction * total))
    return sorted([i * total // count // num_kv_heads, i * total // count % num_kv_heads] for i in range(count))


# Peak memory bandwidth in GB/s (1e9 bytes) of GPUs, NVIDIA's specifications, by a part of the device name
BANDWIDTH_GBS = {"GH200": 4000.0, "H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                 "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0}


def device_bandwidth(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """The memory bandwidth (GB/s) the decode floor is computed with, and where it came from: ``override``, the
    specification of the named GPU, or 2 x memory clock x bus width as the device reports them (None on a CPU)."""
    if override:
        return override, "--bandwidth"
    if device.type != "cuda":
        return None, "none (not a GPU)"
    props = torch.cuda.get_device_properties(device)
    for part, gbs in BANDWIDTH_GBS.items():  # the more specific names first
        if part in props.name:
            return gbs, f"specification of {part}"
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, f"{props.name}: 2 x memory clock x bus width"
    return None, f"unknown for {props.name} (pass --bandwidth)"


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter, except an input embedding table that is not also
    the output head (the step reads B of its rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is not None and (head is None or head.weight is not embedding.weight):
        total -= embedding.weight.numel() * embedding.weight.element_size()
    return total


STUDENT_PREFILL = 4096  # default prompt tokens of the student's decode points (its state is full-size by then)


@dataclass
class BenchSettings:
    contexts: list[int]  # prompt lengths C of the prefill points
    batches: list[int]
    decode_contexts: list[int]  # cache lengths L of the decode points
    decode_batches: list[int]
    decode_steps: int = 32  # timed steps per decode point
    student_prefill: int = STUDENT_PREFILL  # prompt tokens the student really prefills before decode points (0 = the context)
    flat_steps: int = 0  # student tokens decoded while recording memory (0 = skip)
    repeats: int = 2
    max_prefill_tokens: int = 1 << 18  # prefill points with batch x context above this are left out
    use_graph: bool | None = None  # None: on CUDA
    compile_decode: bool = False  # both models' decode steps through torch.compile (the student's once per batch)
    bandwidth_gbs: float | None = None  # memory bandwidth of the decode floor (None: the device's, BANDWIDTH_GBS)
    student: HybridConfig = field(default_factory=HybridConfig)


@contextmanager
def built_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (no float32 copy on the CPU first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def random_models(config: PreTrainedConfig, student: HybridConfig, device: torch.device,
                  dtype: torch.dtype) -> dict[str, Callable[[], torch.nn.Module]]:
    """Factories of the teacher (SDPA) and the student with random weights, built one at a time."""
    def teacher() -> torch.nn.Module:
        with built_on(device, dtype):
            return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()

    def hybrid() -> torch.nn.Module:
        fields = student.mixer_fields()
        with built_on(device, dtype):
            return HybridForCausalLM(HybridConfig(**fields, teacher_config=config.to_dict())).eval()

    return {"teacher": teacher, "student": hybrid}


class TeacherDecoder:
    """Decode steps of a transformers model over a static cache of ``cache_len`` tokens, from position ``start``."""

    def __init__(self, model: torch.nn.Module, batch: int, cache_len: int, start: int, use_graph: bool,
                 compile: bool = False) -> None:
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        for layer in self.cache.layers:  # transformers >= 5.24 counts positions in the cache, not by cache_position
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length.fill_(start)
        device = next(model.parameters()).device
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.tensor([start], device=device)
        self._run = GraphedStep(self._step, [self.position], use_graph, compile=compile)

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        out = self.model(input_ids=self.input_ids, **{CACHE_FIELD: self.cache}, cache_position=self.position,
                         position_ids=self.position.expand(self.input_ids.shape[0], 1), use_cache=True)
        self.position.add_(1)
        return out.logits[:, -1]

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(input_ids)
        return self._run()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))


def _reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


@torch.no_grad()
def prefill_point(model: torch.nn.Module, batch: int, context: int, repeats: int) -> dict:
    device = next(model.parameters()).device
    ids = torch.randint(model.config.vocab_size, (batch, context), device=device)
    _reset_memory()
    seconds = time_call(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), repeats=repeats, warmup=1)
    return {"ttft_ms": 1e3 * seconds, "prefill_tok_s": batch * context / seconds, "peak_gb": _peak_gb()}


def decode_point(model: torch.nn.Module, name: str, batch: int, context: int, settings: BenchSettings) -> dict:
    """Decode speed with a CUDA graph where possible; if capture fails, the eager step is timed and the error kept."""
    device = next(model.parameters()).device
    use_graph = device.type == "cuda" if settings.use_graph is None else settings.use_graph
    try:
        return _decode_point(model, name, batch, context, settings, use_graph)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        if not use_graph:
            raise
        row = _decode_point(model, name, batch, context, settings, False)
        return {**row, "graph_error": first_line(err, 200)}


@torch.no_grad()
def _decode_point(model: torch.nn.Module, name: str, batch: int, context: int, settings: BenchSettings,
                  use_graph: bool) -> dict:
    device = next(model.parameters()).device
    _reset_memory()
    if name == "teacher":
        decoder = TeacherDecoder(model, batch, context + settings.decode_steps + 4, context, use_graph,
                                 settings.compile_decode)
    else:
        prefilled = min(context, settings.student_prefill or context)
        if model.config.keeps_full_attention:  # its full-attention heads read every token: fill them all
            prefilled = context
        prompt = torch.randint(model.config.vocab_size, (batch, prefilled), device=device)
        cache = cache_of(model(input_ids=prompt, use_cache=True, logits_to_keep=1))
        decoder = StaticDecoder(model, cache, use_graph, settings.compile_decode,
                                max_new_tokens=settings.decode_steps + 1)
    token = torch.randint(model.config.vocab_size, (batch, 1), device=device)
    decoder.step(token)
    sync()
    start = time.perf_counter()
    for _ in range(settings.decode_steps):
        decoder.step(token)
    sync()
    step = (time.perf_counter() - start) / settings.decode_steps
    cache_bytes = decoder.nbytes() if name == "teacher" else decoder.cache.nbytes()
    read_bytes = weight_bytes_per_step(model) + cache_bytes
    bandwidth, source = device_bandwidth(device, settings.bandwidth_gbs)
    floor_ms = None if bandwidth is None else 1e3 * read_bytes / (bandwidth * 1e9)
    row = {"ms_per_token": 1e3 * step, "decode_tok_s": batch / step, "peak_gb": _peak_gb(),
           "cache_gb": cache_bytes / 2**30, "read_gb": read_bytes / 2**30, "floor_ms": floor_ms,
           "of_floor": None if floor_ms is None else 1e3 * step / floor_ms, "bandwidth_gbs": bandwidth,
           "bandwidth_source": source, "cuda_graph": use_graph, "compiled": settings.compile_decode}
    return row if name == "teacher" else {**row, "prefilled": prefilled}


@torch.no_grad()
def flat_memory(model: torch.nn.Module, batch: int, steps: int, settings: BenchSettings, rows: list[dict],
                on_row: Callable[[list[dict]], None] | None = None) -> None:
    """Allocated memory while the student decodes ``steps`` tokens (8 readings) after a prompt of
    ``student_prefill`` tokens (``STUDENT_PREFILL`` if 0), with the decode points' step (graphed, compiled if they
    are). Each reading goes into ``rows`` and to ``on_row`` when it is taken: a run cut short keeps its readings."""
    device = next(model.parameters()).device
    prompt = torch.randint(model.config.vocab_size, (batch, settings.student_prefill or STUDENT_PREFILL),
                           device=device)
    decoder = StaticDecoder(model, cache_of(model(input_ids=prompt, use_cache=True, logits_to_keep=1)),
                            settings.use_graph, settings.compile_decode, max_new_tokens=steps)
    token = prompt[:, -1:]
    every = max(steps // 8, 1)
    for i in tqdm(range(1, steps + 1), desc="student decode (memory)", unit="tok"):
        token = decoder.step(token).argmax(-1, keepdim=True)
        if i % every == 0:
            sync()
            allocated = torch.cuda.memory_allocated() if device.type == "cuda" else decoder.cache.nbytes()
            rows.append({"model": "student", "measure": "memory", "batch": batch, "generated": i,
                         "allocated_gb": allocated / 2**30})
            if on_row is not None:
                on_row(rows)


def _points(sizes: list[int], batches: list[int], max_tokens: int | None = None) -> list[tuple[int, int]]:
    return [(b, c) for b in batches for c in sorted(sizes) if max_tokens is None or b * c <= max_tokens]


def planned_points(settings: BenchSettings) -> list[tuple[str, list[tuple[int, int]]]]:
    """(measure, [(batch, context), ...]) in the order they are timed: decode first (its points are the cheaper
    ones, so a run cut by a time limit still has both measures)."""
    return [("decode", _points(settings.decode_contexts, settings.decode_batches)),
            ("prefill", _points(settings.contexts, settings.batches, settings.max_prefill_tokens))]


def run_bench(models: dict[str, Callable[[], torch.nn.Module]], settings: BenchSettings,
              on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every point for every model (one model in memory at a time). Points that run out of memory or fail with
    another RuntimeError (e.g. a refused kernel launch) are recorded with the error's first line, not raised.
    ``on_row`` sees the rows so far after every point (the command rewrites its result files)."""
    rows: list[dict] = []
    planned = planned_points(settings)
    for name, factory in models.items():
        if not any(points for _, points in planned) and not (name == "student" and settings.flat_steps):
            continue  # nothing to measure for this model (e.g. the teacher of a memory-only run): not even built
        model = factory()
        for measure, points in planned:
            failed_batches: set[int] = set()
            for batch, context in tqdm(points, desc=f"{name} {measure}", unit="point"):
                row = {"model": name, "measure": measure, "batch": batch, "context": context}
                if batch in failed_batches:
                    rows.append({**row, "status": "skipped (a smaller context failed)"})
                    continue
                try:
                    if measure == "prefill":
                        row.update(prefill_point(model, batch, context, settings.repeats))
                    else:
                        row.update(decode_point(model, name, batch, context, settings))
                    row["status"] = "ok"
                except torch.OutOfMemoryError:
                    row["status"] = "oom"
                    failed_batches.add(batch)
                except RuntimeError as err:  # e.g. a kernel launch refused: recorded, larger contexts skipped
                    row["status"] = f"failed: {first_line(err)}"
                    failed_batches.add(batch)
                rows.append(row)
                _reset_memory()
                if on_row is not None:
                    on_row(rows)
            if measure == "decode" and name == "student" and settings.flat_steps:
                batch = max(settings.decode_batches)
                try:
                    flat_memory(model, batch, settings.flat_steps, settings, rows, on_row)
                except (RuntimeError, torch.OutOfMemoryError) as err:  # recorded like a failed point
                    rows.append({"model": name, "measure": "memory", "batch": batch,
                                 "status": f"failed: {first_line(err)}"})
                    if on_row is not None:
                        on_row(rows)
        del model
        _reset_memory()
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    """Student / teacher ratios of prefill and decode throughput where both ran."""
    index = {(r["model"], r["measure"], r["batch"], r.get("context")): r for r in rows if r.get("status") == "ok"}
    out = []
    for (model, measure, batch, context), student in index.items():
        teacher = index.get(("teacher", measure, batch, context))
        if model != "student" or teacher is None:
            continue
        key = "prefill_tok_s" if measure == "prefill" else "decode_tok_s"
        out.append({"measure": measure, "batch": batch, "context": context, "teacher_tok_s": teacher[key],
                    "student_tok_s": student[key], "speedup": student[key] / teacher[key],
                    "teacher_peak_gb": teacher["peak_gb"], "student_peak_gb": student["peak_gb"]})
    return sorted(out, key=lambda r: (r["measure"], r["batch"], r["context"]))


def plot_inference(rows: list[dict], path) -> None:
    """Prefill and decode tokens/s and peak memory against context, teacher dashed, student solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("prefill", "prefill_tok_s", "prefill tokens/s"), ("decode", "decode_tok_s", "decode tokens/s"),
              ("prefill", "peak_gb", "prefill peak memory (GiB)"), ("decode", "peak_gb", "decode peak memory (GiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    batches = sorted({r["batch"] for r in rows})
    for ax, (measure, key, title) in zip(axes, panels):
        for (model, batch) in sorted({(r["model"], r["batch"]) for r in rows if r["measure"] == measure}):
            pts = [(r["context"], r[key]) for r in rows if (r["model"], r["measure"], r["batch"]) == (model, measure, batch)
                   and r.get("status") == "ok" and r.get(key) is not None]
            if pts:  # colour = batch size, solid = student, dashed = teacher
                ax.plot(*zip(*pts), "-o" if model == "student" else "--s", color=f"C{batches.index(batch)}",
                        label=f"{model} B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
