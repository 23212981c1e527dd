"""One small training loop for every stage: optimizer, schedule, accumulation, clipping, atomic checkpoints, exact
resume, progress bar, JSONL + TensorBoard metrics, and FSDP2 when launched with torchrun.

Memory settings for large students (docs/decisions.md, "Stage II full fine-tuning at 8B on one GPU"):
``param_dtype: bfloat16`` holds the trained model (and so its gradients) in bf16, ``optimizer: adamw8bit`` keeps
AdamW's two moments in 8 bits (torchao) and rounds bf16 updates stochastically; :func:`prepare_model` applies the
dtype and :func:`checkpoint_layers` recomputes each decoder layer in the backward pass.

A stage supplies a ``step_fn(batch, scale, step) -> metrics`` that runs forward and ``backward`` on ``loss * scale``
(``step``: the optimizer step it contributes to, for schedules)
(Stage I back-propagates layer by layer, so the loop does not own the backward call), and a data object with
``__next__``-able batches plus ``state_dict`` / ``load_state_dict`` (its resume position).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.utils.checkpoint
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm.auto import tqdm

from xlstm_distill.settings import setting


class ResumableData(Protocol):
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Prefetched:
    """``data`` read ``depth`` batches ahead in a background thread, so that reading (decoding compact Stage II
    targets, say) overlaps the training step instead of adding to it. Its state is that of the batches handed out,
    not of those read ahead: a checkpoint resumes right after the last batch the loop took. An error of the reader
    is raised in the loop, at the batch it failed on."""

    _END = object()

    def __init__(self, data: ResumableData, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"Prefetched needs depth >= 1, got {depth}.")
        self.data, self.depth = data, depth
        self._state = copy.deepcopy(data.state_dict())
        self._reading = False

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._reading:
            raise RuntimeError("Prefetched.load_state_dict while an iteration is reading ahead: close it first.")
        self.data.load_state_dict(state)
        self._state = copy.deepcopy(self.data.state_dict())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._reading:
            raise RuntimeError("Prefetched is read by one iteration at a time: close the other one first.")
        self._reading = True
        self.data.load_state_dict(copy.deepcopy(self._state))  # forget what an earlier iteration read ahead
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:  # False once the loop has stopped listening
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for batch in self.data:
                    if not put((batch, copy.deepcopy(self.data.state_dict()))):
                        return
                put(self._END)
            except BaseException as err:  # handed to the loop, raised there
                put(err)

        reader = threading.Thread(target=read, name="prefetch", daemon=True)
        reader.start()
        try:
            while True:
                item = ready.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, self._state = item
                yield batch
        finally:  # the loop is done (or closed this iterator): stop the reader and wait for it, so that no thread
            stop.set()  # is left inside torch when the interpreter shuts down (that aborts the process)
            reader.join()
            self._reading = False


@dataclass
class TrainConfig:
    """Optimization settings shared by the stages (a recipe's ``align`` and ``distill`` sections extend these)."""

    steps: int = setting(100, "Optimizer steps.")
    lr: float = setting(1e-3, "Peak learning rate.")
    min_lr: float = setting(1e-5, "Final learning rate of the cosine schedule.")
    warmup_steps: int = setting(10, "Steps of linear warm-up from 0 to lr.")
    schedule: str = setting("cosine", "`cosine` (warm-up, cosine to min_lr) or `constant` (warm-up, then lr).")
    weight_decay: float = setting(0.0, "AdamW weight decay (not on biases and norms).")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas.")
    grad_clip: float = setting(1.0, "Largest gradient norm (clipped above).")
    grad_accum: int = setting(1, "Batches accumulated into one optimizer step.")
    log_every: int = setting(1, "Steps between rows of metrics.jsonl / TensorBoard.")
    checkpoint_every: int = setting(50, "Steps between checkpoints (and one at the end); 0: no checkpoints at all "
                                        "(a run that is never resumed, e.g. a benchmark).")
    keep_checkpoints: int = setting(2, "Checkpoints kept (older ones are deleted).")
    optimizer: str = setting("adamw", "`adamw`: torch's AdamW, both moments in the parameters' dtype (8 bytes a "
                                      "float32 parameter); `adamw8bit`: torchao's AdamW8bit, both moments in 8 bits "
                                      "with a scale per 256 values (about 2 bytes a parameter) and, for bfloat16 "
                                      "parameters, stochastic rounding of the update (`pip install torchao`).")
    param_dtype: str = setting("float32", "dtype of the trained model's parameters and gradients: `float32` or "
                                          "`bfloat16` (half the memory; needs `optimizer: adamw8bit`, whose "
                                          "stochastic rounding keeps updates below bf16's resolution).")

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}.")
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError("steps and grad_accum must be >= 1.")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: no checkpoints), got {self.checkpoint_every}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}.")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype={self.param_dtype!r}: choose one of {', '.join(PARAM_DTYPES)}.")
        if self.param_dtype == "bfloat16" and self.optimizer == "adamw":
            raise ValueError("param_dtype: bfloat16 needs optimizer: adamw8bit. torch's AdamW rounds each bf16 "
                             "update to the nearest representable weight, which drops updates smaller than half a "
                             "bf16 step (at lr 1e-5 nearly all of them); AdamW8bit rounds stochastically.")
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):  # YAML reads "1e-5" as a string
            setattr(self, name, float(getattr(self, name)))


OPTIMIZERS = ("adamw", "adamw8bit")
PARAM_DTYPES = ("float32", "bfloat16")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def param_dtype(cfg: TrainConfig) -> torch.dtype:
    """The torch dtype of ``cfg.param_dtype``."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.param_dtype]


def prepare_model(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """The model in ``cfg.param_dtype`` (in place; call before sharding it). Returns the model."""
    return model.to(param_dtype(cfg))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``params`` (weight decay on matrices only) as ``cfg.optimizer`` asks."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=False)
    try:
        from torchao.optim import AdamW8bit
    except ImportError as err:
        raise ImportError("optimizer: adamw8bit needs torchao: pip install 'xlstm-distill[scale]' (or pip install "
                          "torchao, a 3.4 MB wheel; use optimizer: adamw with param_dtype: float32 without it).") from err
    # torchao (as bitsandbytes) quantizes tensors of 4096 values or more; smaller ones (norms, gates) keep their
    # moments unquantized, in the parameter's dtype
    return AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, bf16_stochastic_round=True)


def checkpoint_layers(model: torch.nn.Module) -> int:
    """Activation checkpointing per decoder layer: each layer keeps only its input for the backward pass and runs its
    forward again there (the switch of transformers' ``GradientCheckpointingLayer``, with non-reentrant
    ``torch.utils.checkpoint``; transformers 5 wraps the layer's ``forward``, so its hooks, FSDP2's included, stay
    outside the recomputation). Returns the number of layers switched on."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"activation_checkpointing: {type(model).__name__} has no transformers decoder layer "
                         "(GradientCheckpointingLayer) to checkpoint; turn the setting off for this model.")
    recompute = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = recompute
    return len(layers)


class Trainer:
    """Runs ``cfg.steps`` optimizer steps of ``step_fn`` over ``data``, checkpointing into ``out_dir/checkpoints``."""

    def __init__(
        self,
        model: torch.nn.Module,
        step_fn: Callable[[dict[str, torch.Tensor], float, int], dict[str, float]],
        data: ResumableData,
        cfg: TrainConfig,
        out_dir: Path,
        name: str = "train",
        seed: int = 0,
    ) -> None:
        self.model, self.step_fn, self.data, self.cfg, self.seed = model, step_fn, data, cfg, seed
        self.out_dir, self.name = Path(out_dir), name
        self.ckpt_dir = self.out_dir / "checkpoints"
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("Nothing to train: no parameter requires grad.")
        wrong = sorted({str(p.dtype) for p in params} - {str(param_dtype(cfg))})
        if cfg.param_dtype != "float32" and wrong:
            raise ValueError(f"param_dtype is {cfg.param_dtype} but trainable parameters are {', '.join(wrong)}: "
                             "the stage must call trainer.prepare_model(model, cfg) before sharding.")
        self.optimizer = make_optimizer(params, cfg)
        self.step = 0
        self._iter: Iterator | None = None

    # -- checkpoints -----------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.exists():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save_checkpoint(self) -> Path:
        """Write model + optimizer (torch.distributed.checkpoint, resharding-safe), data position and RNG states.

        Written to a temporary folder, then renamed and published via the ``latest`` pointer: a kill at any
        moment leaves the previous checkpoint intact.
        """
        final = self.ckpt_dir / f"step_{self.step:08d}"
        tmp = self.ckpt_dir / f".tmp_step_{self.step:08d}"
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save({"data": self.data.state_dict(), "rng": _rng_state()}, tmp / f"local_{rank}.pt")
        _barrier()
        if is_main_process():
            (tmp / "trainer.json").write_text(json.dumps({"step": self.step, "seed": self.seed, "config": asdict(self.cfg)}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = self.ckpt_dir / ".latest.tmp"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, self.ckpt_dir / "latest")
            for old in sorted(self.ckpt_dir.glob("step_*"))[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load_checkpoint(self, path: Path) -> None:
        with self._optimizer_stance():  # a fresh optimizer's states are made by one zero step first
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rank = dist.get_rank() if dist.is_initialized() else 0
        local_file = path / f"local_{rank}.pt"
        if not local_file.exists():  # saved by fewer processes: data readers with a global position (TargetShards)
            local_file = path / "local_0.pt"  # continue from it (per-rank readers refuse in load_state_dict); the
            # extra ranks also take rank 0's RNG state, which only matters for dropout (the students have none)
        local = torch.load(local_file, weights_only=False)
        self.data.load_state_dict(local["data"])
        _set_rng_state(local["rng"])
        self.step = json.loads((path / "trainer.json").read_text())["step"]

    def _optimizer_stance(self):
        """torchao's AdamW8bit compiles its update per parameter shape; on a CPU (tests) Inductor's C++ compile costs
        seconds per shape, so there it runs the same update eagerly."""
        if self.cfg.optimizer == "adamw" or any(p.is_cuda for p in self.model.parameters()):
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")

    # -- loop ------------------------------------------------------------------------------------------------
    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self.data)
        try:
            return next(self._iter)
        except StopIteration:
            raise RuntimeError("The training data ran out before the last step: add data or lower the steps.") from None

    def fit(self) -> list[dict[str, float]]:
        """Train to ``cfg.steps`` (resuming from the latest checkpoint if there is one); returns the logged rows."""
        cfg = self.cfg
        if (ckpt := self.latest_checkpoint()) is not None:
            self.load_checkpoint(ckpt)
        else:
            torch.manual_seed(self.seed)
        main = is_main_process()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "metrics.jsonl"
        if main and log_path.exists():  # a resumed run repeats the steps after its checkpoint: drop their old rows
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            tmp = log_path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, log_path)
        writer = _tensorboard(self.out_dir / "tensorboard") if main else None
        rows = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, disable=not main, dynamic_ncols=True)
        self.model.train()
        try:
            self._train_steps(log_path, writer, bar, rows)
        finally:
            if self._iter is not None and hasattr(self._iter, "close"):  # ends a read-ahead thread (Prefetched)
                self._iter.close()
            self._iter = None
            bar.close()
            if writer is not None:
                writer.close()
        self.model.eval()
        return rows

    def _train_steps(self, log_path: Path, writer, bar, rows: list[dict[str, float]]) -> None:
        cfg, main = self.cfg, is_main_process()
        while self.step < cfg.steps:
            start = time.perf_counter()
            lr = lr_at(self.step, cfg)
            for group in self.optimizer.param_groups:
                if isinstance(group["lr"], torch.Tensor):  # torchao keeps it as a tensor (its compiled step reads it)
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            sums: dict[str, float] = {}
            tokens = 0
            for _ in range(cfg.grad_accum):
                batch = self._next_batch()
                tokens += batch["input_ids"].numel()
                for key, value in self.step_fn(batch, 1.0 / cfg.grad_accum, self.step).items():
                    sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
            with self._optimizer_stance():
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if dist.is_initialized():
                tokens *= dist.get_world_size()
                sums = _all_reduce_mean(sums)
            row = {"step": self.step, "lr": lr, "grad_norm": float(grad_norm), **sums,
                   "tokens_per_s": tokens / (time.perf_counter() - start)}
            if torch.cuda.is_available():
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            if main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                if writer is not None:
                    for key, value in row.items():
                        if key != "step":
                            writer.add_scalar(f"{self.name}/{key}", value, self.step)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "tokens_per_s") or k.endswith("_loss")})
            bar.update(1)
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self.save_checkpoint()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.jsonl always has everything
        return None
    return SummaryWriter(str(path))
