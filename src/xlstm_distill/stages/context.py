"""What the stages of one recipe share: the recipe, the process group and device, the loaded teacher, the data and
the folders every stage writes. Each stage module takes a :class:`RunContext` and nothing else."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from xlstm_distill.data import (DOMAINS, SPLIT_RULE, SPLITS, PackedDataset, Source, build_offline_corpora, data_split,
                                long_documents, offline_sources)
from xlstm_distill.modeling import HybridConfig, HybridForCausalLM
from xlstm_distill.stages.distributed import Distributed
from xlstm_distill.stages.recipe import Recipe
from xlstm_distill.stages.trainer import is_main_process
from xlstm_distill.teacher import load_teacher, tokenizer_hash

console = Console(stderr=True)


class RunContext:
    """One recipe's run: shared objects, built on first use."""

    def __init__(self, recipe: Recipe, dist: Distributed | None = None,
                 teacher: tuple[torch.nn.Module, Any] | None = None) -> None:
        """``teacher``: an already loaded (model, tokenizer) of the recipe's teacher, shared with another run."""
        self.recipe = recipe
        self.dist = dist or Distributed.from_env()
        self.device = self.dist.device
        self.autocast = torch.bfloat16 if recipe.precision == "bf16" or (
            recipe.precision == "auto" and self.device.type == "cuda") else None
        recipe.out.mkdir(parents=True, exist_ok=True)
        self._teacher: tuple[Any, Any] | None = teacher

    # -- folders -------------------------------------------------------------------------------------------------
    @property
    def out(self) -> Path:
        return self.recipe.out

    @property
    def converted_dir(self) -> Path:
        return self.out / "student-init"

    @property
    def stage1_dir(self) -> Path:
        return self.out / "stage1" / "model"

    @property
    def stage2_dir(self) -> Path:
        return self.out / "stage2" / "model"

    @property
    def merged_dir(self) -> Path:
        return self.out / "merged"

    @property
    def uniform_merged_dir(self) -> Path:
        """The uniform merge written beside a swept or weighted one (``experts.uniform_reference``)."""
        return self.out / "merged-uniform"

    @property
    def targets_dir(self) -> Path:
        return Path(self.recipe.targets.dir) if self.recipe.targets.dir else self.out / "targets"

    @property
    def report_dir(self) -> Path:
        return self.out / "report"

    def students(self) -> dict[str, Path]:
        """Every student the recipe has produced so far, by label, in pipeline order."""
        found = {"converted (untrained)": self.converted_dir, "after Stage I": self.stage1_dir,
                 "after Stage II": self.stage2_dir, "merged experts (Stage III)": self.merged_dir,
                 "merged experts, uniform (Stage III)": self.uniform_merged_dir}
        return {label: path for label, path in found.items() if (path / "config.json").exists()}

    # -- teacher ---------------------------------------------------------------------------------------------------
    @property
    def teacher(self) -> torch.nn.Module:
        return self.teacher_and_tokenizer()[0]

    @property
    def tokenizer(self):
        return self.teacher_and_tokenizer()[1]

    def teacher_and_tokenizer(self) -> tuple[Any, Any]:
        """The recipe's teacher (frozen, on the run's device) and its tokenizer, loaded on first use."""
        if self._teacher is None:
            with console.status(f"loading teacher {self.recipe.teacher}"):
                model, tokenizer = load_teacher(self.recipe.teacher, device=self.device)
            for p in model.parameters():
                p.requires_grad_(False)
            self._teacher = (model, tokenizer)
        return self._teacher

    # -- data --------------------------------------------------------------------------------------------------------
    def sources(self, split: str = "train") -> list[Source]:
        """The sources' documents of one split (``train``, ``held_out`` for the report, ``sweep`` for Stage III's
        merge weights; ``xlstm_distill.data.split``); the offline corpora are built on first use."""
        data = self.recipe.data
        if data.offline_corpora is not None:
            folder = Path(data.offline_corpora)
            manifest = folder / "manifest.json"
            built = set(json.loads(manifest.read_text())["domains"]) if manifest.exists() else set()
            wanted = set(data.weights or DOMAINS) & set(DOMAINS)
            if (not built or wanted - built) and is_main_process():  # first use, or a domain added to the weights
                build_offline_corpora(folder, max_bytes_per_domain=int(data.max_mb_per_domain * 1e6),
                                      seed=self.recipe.seed, domains=sorted(wanted - built))
            self.dist.barrier()
            base = offline_sources(folder, data.weights, loss_on=data.loss_on)
        else:
            base = [Source(**spec) for spec in data.sources]
            if data.weights:  # keep (and reweight) the named sources only
                missing = set(data.weights) - {src.name for src in base}
                if missing:
                    raise ValueError(f"data.weights names unknown sources {sorted(missing)}; give sources a `name`.")
                base = [dataclasses.replace(src, weight=data.weights[src.name]) for src in base
                        if src.name in data.weights]
        return [data_split(src, split, self.sweep_split) for src in base]

    @property
    def sweep_split(self) -> bool:
        """Whether the sweep split is held out of training: only for a recipe that chooses merge weights on it."""
        return self.recipe.experts is not None and self.recipe.experts.sweep is not None

    def packed(self, split: str = "train", rank: int | None = None, world_size: int | None = None) -> PackedDataset:
        seed = self.recipe.seed + SPLITS.index(split)  # train: seed, held_out: seed + 1, sweep: seed + 2
        return PackedDataset(self.sources(split), self.tokenizer, self.recipe.data.seq_len, seed=seed,
                             rank=self.dist.rank if rank is None else rank,
                             world_size=self.dist.world_size if world_size is None else world_size)

    def held_out_batches(self) -> list[dict[str, torch.Tensor]]:
        cfg = self.recipe.evaluate
        batches = self.packed("held_out", rank=0, world_size=1).iter_batches(cfg.batch_size)
        return [next(batches) for _ in range(max(1, cfg.held_out_sequences // cfg.batch_size))]

    def long_held_out_documents(self) -> list[torch.Tensor]:
        """``evaluate.long_documents`` held-out documents of ``evaluate.long_length`` tokens (1-D tensors)."""
        cfg = self.recipe.evaluate
        return long_documents(self.sources("held_out"), self.tokenizer, cfg.long_length, cfg.long_documents)

    def target_meta(self) -> dict[str, Any]:
        """What Stage II's targets must have been made with (their manifest is checked against it)."""
        data = dataclasses.asdict(self.recipe.data)
        rule = [SPLIT_RULE] if self.sweep_split else []  # the training text changes only with a sweep split
        fingerprint = hashlib.sha256(json.dumps([data, self.recipe.seed, *rule], sort_keys=True, default=str).encode())
        cfg = self.recipe.targets
        text = cfg.text if cfg.text == "corpus" else f"teacher:{cfg.prompt_tokens}:{cfg.temperature}"
        return {"tokenizer_hash": tokenizer_hash(self.tokenizer), "k": cfg.k, "seq_len": self.recipe.data.seq_len,
                "data": fingerprint.hexdigest()[:16], "text": text}

    # -- students ----------------------------------------------------------------------------------------------------
    def student_config(self) -> HybridConfig:
        return self.recipe.student_config()

    def load_student(self, path: Path, dtype: torch.dtype = torch.float32) -> HybridForCausalLM:
        """The student saved in ``path``, in ``dtype``, on the run's device."""
        return HybridForCausalLM.from_pretrained(path, dtype=dtype).to(self.device)

    def save_student(self, model: torch.nn.Module, path: Path) -> None:
        """Save a (possibly sharded / peft-wrapped) student as a plain transformers folder + tokenizer, published by
        renaming a finished temporary folder (a kill leaves no half-written model)."""
        state = self.dist.full_state_dict(model)
        if is_main_process():
            if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters into the weights
                model = model.merge_and_unload()
                state = None
            tmp = path.with_name(path.name + ".tmp")
            model.save_pretrained(tmp, state_dict=state)
            self.tokenizer.save_pretrained(tmp)
            os.replace(tmp, path)
        self.dist.barrier()

    def for_expert(self, name: str, weights: dict[str, float]) -> RunContext:
        """The context of one Stage III expert: this recipe with the expert's data weights (and
        ``experts.distill_steps`` / ``experts.num_sequences`` where given), under ``out_dir/experts/NAME``, sharing
        the loaded teacher."""
        recipe = copy.deepcopy(self.recipe)
        recipe.out_dir = str(self.out / "experts" / name)
        recipe.data.weights = dict(weights)
        recipe.targets.dir = None  # each expert's own targets
        if recipe.experts is not None and recipe.experts.distill_steps is not None and recipe.distill is not None:
            recipe.distill.steps = recipe.experts.distill_steps
        if recipe.experts is not None and recipe.experts.num_sequences is not None:
            recipe.targets.num_sequences = recipe.experts.num_sequences
        return RunContext(recipe, self.dist, teacher=self.teacher_and_tokenizer())
