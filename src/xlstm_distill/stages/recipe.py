"""YAML recipes: one file describes an experiment; each stage is one entry point that reads it.

    xlstm-distill run recipes/demo-cpu.yaml      # convert -> align -> targets -> distill -> evaluate
    xlstm-distill align | targets | distill | report RECIPE.yaml    # one stage at a time

Every stage writes under ``out_dir`` and is skipped when its output is complete, so re-running a recipe after an
interruption continues where it stopped (training stages resume from their last checkpoint).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from xlstm_distill.data import PackedDataset, Source, build_offline_corpora, offline_sources
from xlstm_distill.modeling import HybridConfig, HybridForCausalLM, convert
from xlstm_distill.stages.align import layer_mse, make_align_step, set_stage1_trainable
from xlstm_distill.stages.common import PackedBatches, autocast, compare_to_teacher
from xlstm_distill.stages.distill import OnlineTargets, make_distill_step, set_stage2_trainable
from xlstm_distill.stages.distributed import Distributed
from xlstm_distill.stages.targets import TargetShards, bytes_per_token, tokenizer_hash, write_targets
from xlstm_distill.stages.trainer import TrainConfig, Trainer, is_main_process
from xlstm_distill.teacher import load_teacher

console = Console(stderr=True)
HELD_OUT_EVERY = 50  # one document in 50 (by content hash) is held out from training


@dataclass
class Recipe:
    """An experiment: teacher, student mixer, data, and the settings of every stage (see recipes/*.yaml)."""

    name: str
    out_dir: str
    teacher: str = "smollm2-135m"
    student: dict[str, Any] = field(default_factory=dict)  # HybridConfig mixer fields
    data: dict[str, Any] = field(default_factory=dict)
    align: dict[str, Any] | None = None  # TrainConfig + batch_size, train_projections, beyond_window_weight, compile
    targets: dict[str, Any] = field(default_factory=dict)  # k, num_sequences, mode (offline|online), batch_size, dir
    distill: dict[str, Any] | None = None  # TrainConfig + batch_size, gamma, beta, topk_mode, train, lora_rank, compile
    evaluate: dict[str, Any] = field(default_factory=dict)  # held_out_sequences, batch_size; tasks, limit, shots
    experts: dict[str, Any] | None = None  # Stage III: {domains: {name: data weights}, merge_weights: {name: w}}
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        """Read a recipe; ``overrides`` like ``distill.steps=200`` or ``out_dir=runs/x`` replace single values."""
        raw = yaml.safe_load(Path(path).read_text())
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"Override {item!r} must look like section.key=value.")
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}; allowed: {sorted(known)}.")
        return cls(**raw)

    @property
    def out(self) -> Path:
        return Path(self.out_dir)


class Pipeline:
    """Runs the stages of one recipe, sharing the loaded teacher and data between them."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.dist = Distributed.from_env()
        self.device = self.dist.device
        self.autocast = torch.bfloat16 if recipe.precision == "bf16" or (
            recipe.precision == "auto" and self.device.type == "cuda") else None
        recipe.out.mkdir(parents=True, exist_ok=True)
        self._teacher = None

    # -- shared pieces -------------------------------------------------------------------------------------------
    @property
    def teacher(self):
        if self._teacher is None:
            with console.status(f"loading teacher {self.recipe.teacher}"):
                model, tokenizer = load_teacher(self.recipe.teacher, device=self.device)
            for p in model.parameters():
                p.requires_grad_(False)
            self._teacher = (model, tokenizer)
        return self._teacher

    def sources(self, held_out: bool) -> list[Source]:
        """Training (or held-out) sources: one document in HELD_OUT_EVERY, chosen by content hash, is held out."""
        data = self.recipe.data
        if "offline_corpora" in data:
            folder = Path(data["offline_corpora"])
            if not (folder / "manifest.json").exists() and is_main_process():
                build_offline_corpora(folder, max_bytes_per_domain=int(data.get("max_mb_per_domain", 32) * 1e6),
                                      seed=self.recipe.seed)
            self.dist.barrier()
            base = offline_sources(folder, data.get("weights"), loss_on=data.get("loss_on", "all"))
        else:
            base = [Source(**spec) for spec in data["sources"]]
            if data.get("weights"):  # keep (and reweight) the named sources only
                missing = set(data["weights"]) - {src.name for src in base}
                if missing:
                    raise ValueError(f"data.weights names unknown sources {sorted(missing)}; give sources a `name`.")
                base = [replace(src, weight=data["weights"][src.name]) for src in base if src.name in data["weights"]]
        return [_split(src, held_out) for src in base]

    def packed(self, held_out: bool = False, rank: int | None = None, world_size: int | None = None) -> PackedDataset:
        tokenizer = self.teacher[1]
        seed = self.recipe.seed + (1 if held_out else 0)
        return PackedDataset(self.sources(held_out), tokenizer, self.recipe.data.get("seq_len", 512), seed=seed,
                             rank=self.dist.rank if rank is None else rank,
                             world_size=self.dist.world_size if world_size is None else world_size)

    def held_out_batches(self) -> list[dict[str, torch.Tensor]]:
        cfg = self.recipe.evaluate
        n, bs = cfg.get("held_out_sequences", 8), cfg.get("batch_size", 2)
        batches = self.packed(held_out=True, rank=0, world_size=1).iter_batches(bs)
        return [next(batches) for _ in range(max(1, n // bs))]

    def student_config(self) -> HybridConfig:
        return HybridConfig(**self.recipe.student)

    def load_student(self, path: Path) -> HybridForCausalLM:
        return HybridForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device)

    def _save(self, model: torch.nn.Module, path: Path) -> None:
        """Save a (possibly sharded / peft-wrapped) student as a plain transformers folder + tokenizer."""
        state = self.dist.full_state_dict(model)
        if is_main_process():
            if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters into the weights
                model = model.merge_and_unload()
                state = None
            tmp = path.with_name(path.name + ".tmp")
            model.save_pretrained(tmp, state_dict=state)
            self.teacher[1].save_pretrained(tmp)
            os.replace(tmp, path)
        self.dist.barrier()

    # -- stages --------------------------------------------------------------------------------------------------
    def convert(self) -> Path:
        path = self.recipe.out / "student-init"
        if not (path / "config.json").exists() and is_main_process():
            teacher, tokenizer = self.teacher
            student = convert(teacher, self.student_config())
            student.save_pretrained(path)
            tokenizer.save_pretrained(path)
            console.print(f"[green]converted[/] {self.recipe.teacher} -> {path}")
        self.dist.barrier()
        return path

    def align(self) -> Path:
        init = self.convert()
        cfg = self.recipe.align
        path = self.recipe.out / "stage1" / "model"
        if cfg is None:
            return init
        if (path / "config.json").exists():
            return path
        if self.dist.world_size > 1:
            raise ValueError("Stage I runs on one device (it is cheap); launch `align` without torchrun.")
        cfg = dict(cfg)
        batch_size, train_projections = cfg.pop("batch_size", 4), cfg.pop("train_projections", False)
        beyond_window_weight, compiled = cfg.pop("beyond_window_weight", 1.0), cfg.pop("compile", False)
        student = self.load_student(init)
        set_stage1_trainable(student, train_projections)
        teacher = self.teacher[0]
        if any(p.requires_grad for p in student.parameters()):
            step = make_align_step(student, teacher, self.autocast, beyond_window_weight, compiled)
            Trainer(student, step, PackedBatches(self.packed(), batch_size), TrainConfig(seed=self.recipe.seed, **cfg),
                    path.parent, "stage1").fit()
        else:  # e.g. mixer=swa: no new parameters, the converted student is the Stage I model
            console.print(f"[yellow]Stage I skipped[/]: the {self.recipe.student.get('mixer')} student has no new "
                          "parameters to align")
        self._save(student, path)
        mse = layer_mse(student, teacher, self.held_out_batches()[:1])
        (path.parent / "held_out_layer_mse.json").write_text(json.dumps(mse))
        return path

    def target_meta(self) -> dict[str, Any]:
        return {"tokenizer_hash": tokenizer_hash(self.teacher[1]), "k": self.recipe.targets.get("k", 256),
                "seq_len": self.recipe.data.get("seq_len", 512), "data": _fingerprint(self.recipe.data, self.recipe.seed)}

    def targets(self) -> Path | None:
        cfg = self.recipe.targets
        if cfg.get("mode", "offline") == "online":
            return None
        path = Path(cfg["dir"]) if cfg.get("dir") else self.recipe.out / "targets"  # dir: shared by several recipes
        meta = self.target_meta()
        manifest = path / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["complete"]:
            return path
        if self.dist.world_size > 1:
            raise FileNotFoundError(f"Targets in {path} are missing or incomplete: run `xlstm-distill targets` "
                                    "(one process) before launching `distill` under torchrun.")
        n = cfg.get("num_sequences", 64)
        need = n * meta["seq_len"] * bytes_per_token(meta["k"])
        console.print(f"teacher top-{meta['k']} targets for {n} x {meta['seq_len']} tokens: {need / 1e6:.1f} MB on disk")
        batches = self.packed(rank=0, world_size=1).iter_batches(cfg.get("batch_size", 4))
        write_targets(self.teacher[0], batches, path, k=meta["k"], num_sequences=n, teacher_name=self.recipe.teacher,
                      tok_hash=meta["tokenizer_hash"], seq_len=meta["seq_len"], extra={"data": meta["data"]})
        return path

    def distill(self, stage1: Path | None = None) -> Path:
        """Stage II from ``stage1`` (default: this recipe's Stage I model, made first if missing)."""
        if stage1 is None:
            stage1 = self.align() if self.dist.world_size == 1 else self.recipe.out / "stage1" / "model"
        target_dir = self.targets()
        cfg = dict(self.recipe.distill or {})
        path = self.recipe.out / "stage2" / "model"
        if (path / "config.json").exists():
            return path
        batch_size, gamma, beta = cfg.pop("batch_size", 4), cfg.pop("gamma", 0.9), cfg.pop("beta", 0.1)
        topk_mode, mode, lora_rank = cfg.pop("topk_mode", "renormalize"), cfg.pop("train", "full"), cfg.pop("lora_rank", 8)
        compile_model = cfg.pop("compile", False)
        if not (stage1 / "config.json").exists():
            raise FileNotFoundError(f"{stage1} does not exist: run `xlstm-distill align` first.")
        model = set_stage2_trainable(self.load_student(stage1), mode, lora_rank)
        model = self.dist.shard(model)
        if target_dir is None:
            data = OnlineTargets(self.teacher[0], PackedBatches(self.packed(), batch_size), self.recipe.targets.get("k", 256))
        else:
            meta = self.target_meta()
            data = TargetShards(target_dir, batch_size, seed=self.recipe.seed, rank=self.dist.rank,
                                world_size=self.dist.world_size,
                                expect={k: meta[k] for k in ("tokenizer_hash", "k", "seq_len", "data")})
        train_cfg = TrainConfig(seed=self.recipe.seed, **{"schedule": "constant", "weight_decay": 0.1, **cfg})
        # compile: the student's forward as one graph (docs/decisions.md: 1.58-1.59x Stage II tokens/s on an H100
        # after about 190-210 s of compilation); one process: fullgraph, so that a graph break is an error, not a
        # silent slowdown
        forward = torch.compile(model, fullgraph=self.dist.world_size == 1) if compile_model else model
        Trainer(model, make_distill_step(forward, gamma, beta, topk_mode, self.autocast), data, train_cfg,
                path.parent, "stage2").fit()
        self._save(model, path)
        return path

    def report(self) -> dict[str, dict[str, float]]:
        """Held-out perplexity and KL(teacher || student) of every model the recipe produced, as a table."""
        if not is_main_process():
            return {}
        teacher = self.teacher[0]
        batches = self.held_out_batches()
        rows: dict[str, dict[str, float]] = {}
        for label, path in (("converted (untrained)", self.recipe.out / "student-init"),
                            ("after Stage I", self.recipe.out / "stage1" / "model"),
                            ("after Stage II", self.recipe.out / "stage2" / "model"),
                            ("merged experts (Stage III)", self.recipe.out / "merged")):
            if (path / "config.json").exists():
                with autocast(self.device, self.autocast):
                    rows[label] = compare_to_teacher(self.load_student(path).eval(), teacher, batches)
        if not rows:
            raise FileNotFoundError(f"No student under {self.recipe.out}: run the recipe's stages first.")
        first = next(iter(rows.values()))
        split = "kl_beyond_window" in first  # a windowed student: KL inside / beyond the window's reach
        table = Table(title=f"{self.recipe.name}: held-out next-token metrics ({int(first['tokens'])} tokens)")
        columns = ["model", "perplexity", "KL(teacher || model)"]
        columns += ["KL in window", f"KL beyond window ({int(first['tokens_beyond_window'])} tokens)"] if split else []
        for col in columns:
            table.add_column(col, justify="right" if col != "model" else "left")
        teacher_row = [f"teacher ({self.recipe.teacher})", f"{first['teacher_ppl']:.2f}", "0"]
        table.add_row(*teacher_row, *(["0", "0"] if split else []))
        for label, r in rows.items():
            parts = [f"{r['kl_in_window']:.4f}", f"{r['kl_beyond_window']:.4f}"] if split else []
            table.add_row(label, f"{r['student_ppl']:.2f}", f"{r['kl']:.4f}", *parts)
        Console().print(table)
        out = self.recipe.out / "report"
        out.mkdir(exist_ok=True)
        (out / "held_out.json").write_text(json.dumps({"teacher": self.recipe.teacher, "rows": rows}, indent=2))
        _plot_report(rows, out / "held_out.png")
        return rows

    def experts(self) -> Path | None:
        """Stage III: one Stage II expert per domain from the same Stage I model, then their linear merge (Eq. 14)."""
        cfg = self.recipe.experts
        if not cfg:
            return None
        from xlstm_distill.merging import merge

        stage1 = self.align()
        paths = []
        for name, weights in cfg["domains"].items():
            recipe = copy.deepcopy(self.recipe)
            recipe.out_dir = str(self.recipe.out / "experts" / name)
            recipe.data["weights"] = weights
            expert = Pipeline(recipe)
            expert._teacher = self._teacher
            paths.append(expert.distill(stage1=stage1))
            self._teacher = expert._teacher
        merge_weights = cfg.get("merge_weights")
        weights = [merge_weights[name] for name in cfg["domains"]] if merge_weights else None
        out = self.recipe.out / "merged"
        if not (out / "config.json").exists() and is_main_process():
            merge(paths, weights, out)
        self.dist.barrier()
        return out

    def benchmarks(self) -> Path | None:
        """Teacher vs the final student on real benchmarks (lm-evaluation-harness), if the recipe lists ``tasks``."""
        cfg = self.recipe.evaluate
        if not cfg.get("tasks") or not is_main_process():
            return None
        from xlstm_distill.evaluation import evaluate_models, write_report

        final = next(p for p in (self.recipe.out / "stage2" / "model", self.recipe.out / "stage1" / "model",
                                 self.recipe.out / "student-init") if (p / "config.json").exists())
        out = self.recipe.out / "report" / "benchmarks"
        models = {"teacher": self.teacher, "student": str(final)}
        if (self.recipe.out / "merged" / "config.json").exists():  # Stage III: merged experts vs the generalist
            models["merged"] = str(self.recipe.out / "merged")
        results = evaluate_models(models, tasks=cfg["tasks"], num_fewshot=cfg.get("shots"), limit=cfg.get("limit"),
                                  batch_size=cfg.get("batch_size", 4), output_dir=out)
        files = write_report(results, "teacher", out)
        Console().print(files["markdown"].read_text())
        return out

    def run(self) -> None:
        if self.dist.world_size > 1:
            raise ValueError("`run` chains all stages on one device; under torchrun launch `distill` alone.")
        self.align()
        if self.recipe.distill is not None:
            self.distill()
        self.experts()
        self.report()
        self.benchmarks()


def _split(source: Source, held_out: bool) -> Source:
    """A view of ``source`` holding only its held-out (or only its training) documents."""
    def records():
        for _, record in source.records(seed=0):
            digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).digest()
            if (int.from_bytes(digest[:4], "little") % HELD_OUT_EVERY == 0) == held_out:
                yield record
    records.__name__ = f"{source.name}:{'held_out' if held_out else 'train'}"
    return Source(records, weight=source.weight, name=records.__name__, field=source.field,
                  messages_field=source.messages_field, loss_on=source.loss_on)


def _fingerprint(data: dict[str, Any], seed: int) -> str:
    return hashlib.sha256(json.dumps([data, seed], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _plot_report(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(labels, [r["student_ppl"] for r in rows.values()], color="tab:blue")
    axes[0].axhline(next(iter(rows.values()))["teacher_ppl"], color="k", ls="--", label="teacher")
    axes[0].set_ylabel("held-out perplexity")
    axes[0].legend()
    axes[1].bar(labels, [r["kl"] for r in rows.values()], color="tab:orange")
    axes[1].set_ylabel("KL(teacher || student)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
