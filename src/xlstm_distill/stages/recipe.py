"""YAML recipes: one file describes an experiment, in typed sections whose defaults all live here.

    name: demo                 # the recipe's top-level keys: Recipe below
    out_dir: runs/demo
    student: {mixer: mlstm_swa, window_size: 512, kernels: {copy_sinks: rows}}   # HybridConfig's settings
    data: {offline_corpora: runs/corpora, seq_len: 1024}                         # DataSection
    select_heads: {budget: 0.05}                                                 # SelectHeadsSection (absent: none)
    align: {steps: 2000, lr: 1.0e-2}                                             # AlignSection (absent: no Stage I)
    targets: {k: 256, num_sequences: 8192}                                       # TargetsSection
    distill: {steps: 4000, lr: 1.0e-5}                                           # DistillSection (absent: no Stage II)
    evaluate: {tasks: [xd_piqa]}                                                 # EvaluateSection
    experts: {domains: {math: {math: 1.0}, code: {code: 1.0}}, sweep: {}}        # ExpertsSection (Stage III)

Unknown keys are refused at load time, naming the key and the valid keys of its section; ``--set section.key=value``
overrides go through the same check. ``docs/recipes.md`` is generated from these classes
(:func:`recipe_reference`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from xlstm_distill.kernels.options import KernelOptions
from xlstm_distill.merging.config import SweepConfig
from xlstm_distill.modeling.configuration import BACKENDS, MIXER_FIELDS, HybridConfig
from xlstm_distill.settings import from_mapping, setting, type_name
from xlstm_distill.stages.trainer import TrainConfig
from xlstm_distill.teacher import DEFAULT_TEACHER

TOPK_MODES = ("renormalize", "residual")
TRAIN_MODES = ("full", "mixer", "lora")
TARGET_MODES = ("offline", "online")
TARGET_TEXTS = ("corpus", "teacher")
TARGET_ENCODINGS = ("compact", "exact")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class DataSection:
    """Training text: the offline corpora or your own sources, and the packed sequence length."""

    offline_corpora: str | None = setting(None, "Folder of the offline corpora (chat, code, prose, math), built there "
                                                "on first use (`xlstm-distill data offline`). Either this or `sources`.")
    max_mb_per_domain: float = setting(32.0, "Size cap of each offline corpus when it is built (MB).")
    sources: list[dict[str, Any]] = setting([], "Your own sources: a list of `xlstm_distill.data.Source` arguments "
                                                "(`path`, `name`, `weight`, `field`, `messages_field`, `loss_on`, ...; "
                                                "docs/data.md).")
    weights: dict[str, float] | None = setting(None, "Mixture weights by source or corpus name; only the named ones "
                                                     "are used (default: all, weight 1).")
    loss_on: str = setting("all", "Offline chat corpus: train on `all` tokens or on `assistant` turns only.")
    seq_len: int = setting(512, "Tokens per packed training sequence (documents are kept apart inside it).")

    def __post_init__(self) -> None:
        if (self.offline_corpora is None) == (not self.sources):
            raise ValueError("data: give either offline_corpora (a folder) or sources (a list), not both or neither.")
        _check_choice("data.loss_on", self.loss_on, ("all", "assistant"))
        _check_positive("data.seq_len", self.seq_len)


@dataclass
class SelectHeadsSection:
    """Before Stage I: choose the KV heads that keep the teacher's full attention, by measurement on the converted
    student (``xlstm-distill select-heads``); the chosen heads go into the student's config."""

    budget: float = setting(0.05, "Fraction of all KV heads kept (rounded; at least one when above 0).")
    probe: str = setting("needles", "Calibration data: `needles` (key-value facts hidden in training text past "
                                      "the window, the asked value's digits scored), `retrieval` (a synthetic list "
                                      "of key-value lines, the answer scored) or `text` (training text, positions "
                                      "past the window scored).")
    method: str = setting("greedy", "`greedy`: one head at a time, the one that lowers the KL most given those "
                                    "chosen before (`pool` x (heads chosen) more head scorings than `single`); "
                                    "`single`: the heads whose restoring alone lowers it most.")
    pool: int = setting(3, "greedy: each round rescores the best `pool` x (heads to choose) heads of the single "
                           "scores.")
    samples: int = setting(16, "Calibration sequences.")
    length: int | None = setting(None, "Tokens per calibration sequence (default: data.seq_len).")
    batch_size: int = setting(4, "Sequences per forward.")

    def __post_init__(self) -> None:
        from xlstm_distill.evaluation.heads import PROBES

        if not isinstance(self.budget, (int, float)) or not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"select_heads.budget is a fraction of the KV heads in [0, 1], got {self.budget!r}.")
        _check_choice("select_heads.probe", self.probe, PROBES)
        _check_choice("select_heads.method", self.method, ("single", "greedy"))
        _check_positive("select_heads.pool", self.pool)
        _check_positive("select_heads.samples", self.samples)
        _check_positive("select_heads.batch_size", self.batch_size)
        if self.length is not None:
            _check_positive("select_heads.length", self.length)


@dataclass
class AlignSection(TrainConfig):
    """Stage I: layer-wise alignment of the student's mixers to the teacher's attention outputs."""

    lr: float = setting(3e-3, "Peak learning rate.")
    batch_size: int = setting(4, "Sequences per step (one process).")
    train_projections: bool = setting(False, "Also train the teacher's q/k/v/o projections (else only the new "
                                             "feature maps and gates).")
    beyond_window_weight: float = setting(1.0, "Weight of the positions past the window's reach in the MSE (1: "
                                               "plain MSE).")
    compile: bool = setting(False, "Run each layer's mixer and loss through torch.compile (one graph for all "
                                   "layers).")
    window_dropout: float = setting(0.0, "Scheduled window dropout: probability, falling linearly to 0 at the last "
                                         "step, that a batch is aligned with the window shortened to `dropout_window` "
                                         "(the memory must carry the rest).")
    dropout_window: int | None = setting(None, "The shortened window (default: a quarter of the student's).")
    attention_transfer: float = setting(0.0, "Weight of the attention transfer added to each layer's MSE: the "
                                             "cross-entropy from the teacher's attention weights on the keys beyond "
                                             "the window and sinks to the memory's weights on them, weighted by the "
                                             "teacher's attention mass there (0: off).")
    transfer_queries: int = setting(64, "Query positions per sequence the attention transfer is computed at "
                                        "(drawn among those that reach past the window).")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("align.batch_size", self.batch_size)
        _check_positive("align.transfer_queries", self.transfer_queries)
        if self.attention_transfer < 0:
            raise ValueError(f"align.attention_transfer is a loss weight >= 0, got {self.attention_transfer!r}.")
        if not 0.0 <= self.window_dropout <= 1.0:
            raise ValueError(f"align.window_dropout must be in [0, 1], got {self.window_dropout!r}.")


@dataclass
class TargetsSection:
    """The teacher's top-k next-token distribution for Stage II."""

    k: int = setting(256, "Teacher log-probabilities kept per position.")
    encoding: str = setting("compact", "Shard encoding: `compact` (ids as a coded set, the 8 largest log-probs in "
                                       "float16, the rest in 4 bits, the mass outside the top k kept: about 385 "
                                       "bytes per token at k = 256, KL to the exact top-k distribution about 6e-4 "
                                       "nats per token) or `exact` (int32 ids + float16 log-probs: 6k + 9 bytes per "
                                       "token). Stage II reads either; the manifest names it.")
    num_sequences: int = setting(64, "Packed sequences to compute targets for.")
    batch_size: int = setting(4, "Sequences per teacher forward.")
    mode: str = setting("offline", "`offline`: computed once into checksummed shards; `online`: the teacher runs "
                                   "alongside Stage II (no disk).")
    dir: str | None = setting(None, "Where the shards go (default `out_dir/targets`); recipes with the same data "
                                    "and teacher can share one folder.")
    text: str = setting("corpus", "What Stage II reads: `corpus` (the data's packed sequences) or `teacher` (the "
                                  "teacher's own continuations of each sequence's first `prompt_tokens` tokens).")
    prompt_tokens: int = setting(32, "`text: teacher`: tokens of each corpus sequence that prompt the teacher.")
    temperature: float = setting(1.0, "`text: teacher`: sampling temperature of the teacher's continuations.")

    def __post_init__(self) -> None:
        _check_choice("targets.mode", self.mode, TARGET_MODES)
        _check_choice("targets.text", self.text, TARGET_TEXTS)
        _check_choice("targets.encoding", self.encoding, TARGET_ENCODINGS)
        if self.text == "teacher" and self.mode == "online":
            raise ValueError("targets.text: teacher needs targets.mode: offline (the samples are made once).")
        for name in ("k", "num_sequences", "batch_size"):
            _check_positive(f"targets.{name}", getattr(self, name))


@dataclass
class DistillSection(TrainConfig):
    """Stage II: end-to-end distillation, gamma * CE + beta * KL(teacher top-k || student)."""

    schedule: str = setting("constant", "`cosine` (warm-up, cosine to min_lr) or `constant` (warm-up, then lr).")
    weight_decay: float = setting(0.1, "AdamW weight decay (not on biases and norms).")
    batch_size: int = setting(4, "Sequences per step and process (global batch: x processes x grad_accum).")
    gamma: float = setting(0.0, "Weight of the cross-entropy on the data (the paper: 0.9).")
    beta: float = setting(1.0, "Weight of the KL to the teacher's top-k distribution (the paper: 0.1).")
    topk_mode: str = setting("residual", "`renormalize`: both distributions restricted to the teacher's top k; "
                                            "`residual`: the rest of the mass as one extra bucket.")
    train: str = setting("full", "`full` fine-tuning, `mixer` (new parameters only) or `lora` (peft adapters on "
                                 "q/k/v/o + the new parameters).")
    lora_rank: int = setting(8, "LoRA rank for `train: lora`.")
    compile: bool = setting(False, "Run the student's forward through torch.compile as one graph.")
    activation_checkpointing: bool = setting(False, "Keep only each decoder layer's input for the backward pass and "
                                                    "recompute the layer there (about one extra forward of compute "
                                                    "for a fraction of the activations' memory).")
    loss_chunk_tokens: int | None = setting(None, "Compute the logits and the loss over pieces of this many tokens, "
                                                  "recomputing each piece's logits in the backward pass, so that the "
                                                  "(batch, seq_len, vocabulary) logits never exist at once (a 128K "
                                                  "vocabulary at 4K tokens: 2.1 GB a float32 copy per sequence); "
                                                  "none: all positions at once.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("distill.topk_mode", self.topk_mode, TOPK_MODES)
        if self.loss_chunk_tokens is not None:
            _check_positive("distill.loss_chunk_tokens", self.loss_chunk_tokens)
        _check_choice("distill.train", self.train, TRAIN_MODES)
        _check_positive("distill.batch_size", self.batch_size)


@dataclass
class EvaluateSection:
    """What the report measures: held-out next-token metrics, then benchmarks through lm-evaluation-harness."""

    held_out_sequences: int = setting(8, "Held-out sequences for perplexity and KL to the teacher.")
    batch_size: int = setting(2, "Batch size of the held-out forward and of lm-eval.")
    tasks: list[str] = setting([], "lm-eval tasks for teacher and final student (e.g. xd_piqa; `xlstm-distill "
                                   "evaluate --help`); empty: no benchmark step.")
    limit: int | float | None = setting(None, "Documents per task (or a fraction < 1); none: all.")
    shots: int | dict[str, int] | None = setting(None, "Few-shot examples: one number for all tasks or a mapping "
                                                       "task -> number (default: the paper's counts).")
    long_documents: int = setting(0, "Held-out documents of at least `long_length` tokens for KL and perplexity by "
                                     "position (0: none).")
    long_length: int = setting(8192, "Tokens of each long held-out document.")
    position_bucket: int | None = setting(None, "Width of the position buckets (default: the student's window).")
    ruler_tasks: list[str] = setting([], "RULER needle-in-a-haystack tasks for teacher and students (niah_single_1, "
                                         "niah_multikey_2, niah_multikey_3); empty: none.")
    ruler_lengths: list[int] = setting([1024, 2048, 4096, 8192], "Context lengths of the RULER tasks.")
    ruler_samples: int = setting(50, "RULER samples per task and length.")
    ruler_file: str | None = setting(None, "A RULER set built by `xlstm-distill data ruler` (its tasks, lengths and "
                                           "samples replace the three settings above; no lm-eval needed to score it).")

    def __post_init__(self) -> None:
        from xlstm_distill.evaluation.long_context import RULER_TASKS

        unknown = sorted(set(self.ruler_tasks) - set(RULER_TASKS))
        if unknown:
            raise ValueError(f"evaluate.ruler_tasks: {', '.join(unknown)} is not a RULER task that builds its data "
                             f"offline; choose from {', '.join(RULER_TASKS)}.")
        _check_positive("evaluate.ruler_samples", self.ruler_samples)
        _check_positive("evaluate.long_length", self.long_length)


@dataclass
class ExpertsSection:
    """Stage III: domain experts distilled from the same Stage I model, merged linearly."""

    domains: dict[str, dict[str, float]] = setting({}, "Expert name -> data weights (the `data.weights` it trains "
                                                       "on).")
    merge_weights: dict[str, float] | None = setting(None, "Expert name -> merge weight (normalized to sum 1; "
                                                           "default uniform).")
    sweep: SweepConfig | None = setting(None, "Choose the merge weights on each expert's domain, on the sweep split "
                                              "(`experts.sweep` below); absent: `merge_weights` or uniform.")
    uniform_reference: bool = setting(True, "With `merge_weights` or `sweep`, also write the uniform merge of the "
                                            "same experts (`out_dir/merged-uniform`), so the report compares both.")
    distill_steps: int | None = setting(None, "Stage II steps of each expert (default: `distill.steps`); the "
                                              "generalist keeps `distill.steps`, so it can get the experts' total.")
    num_sequences: int | None = setting(None, "Teacher target sequences of each expert (default: "
                                              "`targets.num_sequences`).")

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("experts.domains must name at least one expert: {name: {corpus: weight}}.")
        if self.merge_weights is not None and set(self.merge_weights) != set(self.domains):
            raise ValueError(f"experts.merge_weights must have one weight per expert ({', '.join(self.domains)}), "
                             f"got {', '.join(self.merge_weights)}.")
        if self.merge_weights is not None and self.sweep is not None:
            raise ValueError("experts.merge_weights and experts.sweep both choose the merge weights: give one of them.")
        for name in ("distill_steps", "num_sequences"):
            if getattr(self, name) is not None:
                _check_positive(f"experts.{name}", getattr(self, name))


@dataclass
class Recipe:
    """An experiment: the teacher, the student's settings, the data and every stage's settings."""

    name: str = setting(..., "Name shown in reports.")
    out_dir: str = setting(..., "Folder for every stage's output (each stage resumes from it).")
    teacher: str = setting(DEFAULT_TEACHER, "Embedded name, .gguf file, local folder or hub id.")
    seed: int = setting(0, "Seed of data order, initialization and the held-out split's shuffling.")
    precision: str = setting("auto", "`auto` (bf16 autocast on CUDA, float32 on CPU), `fp32` or `bf16`.")
    student: dict[str, Any] = setting({}, "The student's settings: HybridConfig's arguments (table below).")
    data: DataSection = setting(..., "Training text (DataSection).")
    select_heads: SelectHeadsSection | None = setting(None, "Choose full-attention heads before Stage I; absent: "
                                                            "the student keeps those `student` names (default none).")
    align: AlignSection | None = setting(None, "Stage I settings; absent: the converted student goes to Stage II.")
    targets: TargetsSection = setting(None, "Stage II's teacher targets (TargetsSection).")
    distill: DistillSection | None = setting(None, "Stage II settings; absent: no Stage II.")
    evaluate: EvaluateSection = setting(None, "The report's measurements (EvaluateSection).")
    experts: ExpertsSection | None = setting(None, "Stage III settings; absent: no experts.")

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        self.targets = self.targets or TargetsSection()
        self.evaluate = self.evaluate or EvaluateSection()
        unknown = sorted(set(self.student) - set(student_keys()))
        if unknown:
            raise ValueError(f"student: unknown key(s) {', '.join(unknown)}; valid keys of student: "
                             f"{', '.join(student_keys())}.")
        HybridConfig(**self.student)  # validates every value (kernels included) now, not at the first stage
        if self.select_heads is not None and (self.student.get("full_attention_heads")
                                              or self.student.get("full_attention_layers")):
            raise ValueError("student.full_attention_heads / full_attention_layers and select_heads both choose the "
                             "kept heads: give one of them.")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        """Read a recipe; ``overrides`` like ``distill.steps=200`` or ``student.kernels.copy_sinks=none`` replace
        single values (YAML syntax). Raises ValueError naming any unknown key and the valid keys of its section."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}.")
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"Override {item!r} must look like section.key=value.")
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
                if node is None or not isinstance(node, dict):
                    raise ValueError(f"Override {item!r}: {part} is not a section.")
            node[leaf] = yaml.safe_load(value)
        try:
            return from_mapping(cls, raw, "recipe")
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @property
    def out(self) -> Path:
        return Path(self.out_dir)

    def student_config(self) -> HybridConfig:
        return HybridConfig(**self.student)


SECTIONS = {"data": DataSection, "select_heads": SelectHeadsSection, "align": AlignSection, "targets": TargetsSection,
            "distill": DistillSection, "evaluate": EvaluateSection, "experts": ExpertsSection, "experts.sweep": SweepConfig}


def student_keys() -> tuple[str, ...]:
    """The keys of a recipe's ``student`` section: HybridConfig's settings (``backend`` a shorthand of ``kernels``)."""
    return (*MIXER_FIELDS, "backend")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(choices)}.")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


# -- the reference (docs/recipes.md) -----------------------------------------------------------------------------
def recipe_reference() -> str:
    """Markdown reference of every recipe key: its type, default and meaning (``docs/recipes.md``)."""
    lines = ["# Recipe reference", "",
             "A recipe is a YAML file with the sections below (`xlstm-distill run RECIPE.yaml`; any value can be "
             "overridden with `--set section.key=value`). Unknown keys are refused, naming the valid ones. This page "
             "is generated from the typed recipe classes in `xlstm_distill/stages/recipe.py` (`make docs`).", ""]
    lines += _table("Top level", Recipe)
    lines += _student_table()
    lines += _table("student.kernels", KernelOptions, "Kernel choices and switches (saved with the model; "
                    "`xlstm_distill.kernels.KernelOptions`). None of them changes what the student computes.")
    for key, cls in SECTIONS.items():
        lines += _table(key, cls, inspect.getdoc(cls).splitlines()[0])
    return "\n".join(lines).rstrip() + "\n"


def _table(title: str, cls: type, intro: str | None = None) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = [f"## `{title}`" if title != "Top level" else "## Top level", ""]
    if intro:
        lines += [intro, ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "required" if default is ... else f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}`"
        if f.name in SECTIONS and default is None and not typing.get_args(hints[f.name]):
            shown = "defaults"
        lines.append(f"| `{f.name}` | {type_name(hints[f.name])} | {shown} | {_cell(f.metadata.get('doc', ''))} |")
    return lines + [""]


def _student_table() -> list[str]:
    """HybridConfig's settings: defaults from its signature, meanings from its docstring's Args section."""
    params = inspect.signature(HybridConfig.__init__).parameters
    docs = _docstring_args(inspect.getdoc(HybridConfig))
    lines = ["## `student`", "", "The student's settings (`xlstm_distill.HybridConfig`).", "",
             "| key | default | meaning |", "|---|---|---|"]
    for name in student_keys():
        default = params[name].default
        shown = "see below" if name == "kernels" else f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}`"
        lines.append(f"| `{name}` | {shown} | {_cell(docs.get(name, ''))} |")
    return lines + ["", f"`backend` is one of {', '.join(f'`{b}`' for b in BACKENDS)}.", ""]


def _cell(text: str) -> str:
    """Text for a markdown table cell: Sphinx roles dropped, pipes escaped."""
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    return text.replace("|", "\\|")


def _docstring_args(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style Args section, continuation lines joined."""
    out, current = {}, None
    for line in doc.split("Args:", 1)[-1].splitlines():
        match = re.match(r"^\s{4}(\w+): (.*)$", line)
        if match:
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current and line.startswith(" " * 8):
            out[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return {k: v.replace("``", "`") for k, v in out.items()}

