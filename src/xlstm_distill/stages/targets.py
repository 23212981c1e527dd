"""Teacher top-k targets for Stage II: computed once, stored in checksummed shards with a manifest.

Every shard (safetensors) holds the packed training data itself plus the teacher's top-k next-token
log-probabilities for every position, so Stage II reads one self-contained, verifiable stream. Two encodings, named
in the manifest (``encoding``; manifests without one are ``exact``), read back as the same batches:

- ``compact`` (default): ids as a coded set, the largest log-probabilities in float16, the rest quantized, the mass
  outside the top k kept (:mod:`xlstm_distill.stages.target_codec`); about 385 B/token at k = 256.
- ``exact``: one tensor per field, 6 k + 9 bytes per token (k = 256: 1,545 B/token)::

    input_ids     (N, T) int32        document_ids (N, T) int32      loss_mask (N, T) bool
    topk_ids      (N, T, k) int32     topk_logprobs (N, T, k) float16

The manifest records the measured ``bytes_per_token`` of the shards written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from xlstm_distill.checksums import sha256
from xlstm_distill.stages.common import teacher_forward
from xlstm_distill.stages.recipe import TARGET_ENCODINGS
from xlstm_distill.stages.target_codec import CompactCodec

if TYPE_CHECKING:
    from xlstm_distill.stages.context import RunContext

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 1: exact shards, no `encoding` key; 2: `encoding` and `bytes_per_token` in the manifest


def run(ctx: RunContext) -> Path | None:
    """The teacher's top-k targets for Stage II in ``targets.dir`` (default ``out_dir/targets``), made once and
    resumed at a shard; None with ``targets.mode: online`` (the teacher then runs alongside Stage II)."""
    from xlstm_distill.stages.context import console

    cfg = ctx.recipe.targets
    if cfg.mode == "online":
        return None
    path = ctx.targets_dir
    manifest = path / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text())["complete"]:
        return path
    if ctx.dist.world_size > 1:
        raise FileNotFoundError(f"Targets in {path} are missing or incomplete: run `xlstm-distill targets` "
                                "(one process) before launching `distill` under torchrun.")
    meta = ctx.target_meta()
    need = cfg.num_sequences * meta["seq_len"] * bytes_per_token(meta["k"], cfg.encoding)
    console.print(f"teacher top-{meta['k']} targets for {cfg.num_sequences} x {meta['seq_len']} tokens "
                  f"({cfg.encoding}): about {need / 1e6:.1f} MB on disk")
    batches = ctx.packed(rank=0, world_size=1).iter_batches(cfg.batch_size)
    if cfg.text == "teacher":
        batches = teacher_text(ctx.teacher, batches, cfg.prompt_tokens, cfg.temperature, ctx.recipe.seed)
    write_targets(ctx.teacher, batches, path, k=meta["k"], num_sequences=cfg.num_sequences,
                  teacher_name=ctx.recipe.teacher, tok_hash=meta["tokenizer_hash"], seq_len=meta["seq_len"],
                  encoding=cfg.encoding, extra={"data": meta["data"], "text": meta["text"]})
    return path


@torch.no_grad()
def teacher_text(teacher: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], prompt_tokens: int,
                 temperature: float, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of the teacher's own text: each row of ``batches`` (B, T) is replaced by the teacher's sampled
    continuation of its first ``prompt_tokens`` tokens to T tokens (one document per row, every token a target).
    Distillation data whose distribution is the teacher's."""
    device = next(teacher.parameters()).device
    torch.manual_seed(seed)
    pad = teacher.generation_config.pad_token_id or teacher.generation_config.eos_token_id or 0
    if isinstance(pad, list):
        pad = pad[0]
    for batch in batches:
        ids = batch["input_ids"].to(device)  # (B, T)
        B, T = ids.shape
        new = T - prompt_tokens
        out = teacher.generate(ids[:, :prompt_tokens], attention_mask=torch.ones_like(ids[:, :prompt_tokens]),
                               max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=temperature,
                               top_k=0, top_p=1.0, pad_token_id=pad)
        yield {"input_ids": out.cpu(), "document_ids": torch.zeros(B, T, dtype=torch.long),
               "loss_mask": torch.ones(B, T, dtype=torch.bool)}


def bytes_per_token(k: int, encoding: str = "exact") -> float:
    """Disk bytes per stored token. ``exact``: ids int32 + log-probs float16 per top-k entry, plus the data itself;
    ``compact``: an estimate (about 7.2 bits per id at a 49K vocabulary, measured: docs/decisions.md)."""
    if encoding == "exact":
        return 6 * k + 4 + 4 + 1
    codec = CompactCodec()
    head = min(codec.exact_head, k)
    return k * 7.2 / 8 + (k - head) * codec.value_bits / 8 + head * 3 + 6 + 3


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (ids int32, log-probs float16) of the next-token distribution. logits (B, T, V)."""
    ids, values, _ = teacher_topk(logits, k)
    return ids, values.to(torch.float16)


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids (B, T, k) int32, their log-probs (B, T, k) float32 (largest first) and the log of the probability
    mass outside them (B, T) float32, computed from the logits outside the top k. logits (B, T, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    log_rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids.to(torch.int32), values, log_rest


@torch.no_grad()
def write_targets(
    teacher: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    out_dir: Path,
    *,
    k: int,
    num_sequences: int,
    teacher_name: str,
    tok_hash: str,
    seq_len: int,
    sequences_per_shard: int = 256,
    encoding: str = "compact",
    codec: CompactCodec | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the teacher over ``num_sequences`` packed sequences and write shards + manifest (resumes at a shard).
    ``encoding``: ``compact`` or ``exact`` (module docstring); ``codec``: the compact encoding's settings."""
    if encoding not in TARGET_ENCODINGS:
        raise ValueError(f"Target encoding {encoding!r}: choose one of {', '.join(TARGET_ENCODINGS)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(teacher.parameters()).device
    manifest_path = out_dir / MANIFEST
    codec = codec or CompactCodec()
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {
        "format": FORMAT_VERSION, "encoding": encoding, "teacher": teacher_name, "tokenizer_hash": tok_hash, "k": k,
        "seq_len": seq_len, "num_sequences": num_sequences, "complete": False, "shards": [],
        **({"codec": codec.settings()} if encoding == "compact" else {}), **(extra or {})}
    if manifest_encoding(manifest, out_dir) != encoding:
        raise TargetMismatchError(
            f"Targets in {out_dir} are being written as {manifest_encoding(manifest, out_dir)}, this run asks for "
            f"{encoding}: set targets.encoding: {manifest_encoding(manifest, out_dir)} to finish them, or delete the "
            "folder.")
    if encoding == "compact":  # a resumed folder keeps the settings it was started with
        codec = CompactCodec(**manifest["codec"])
    done = sum(s["num_sequences"] for s in manifest["shards"])
    buffer: dict[str, list[torch.Tensor]] = {}
    seen = 0
    bar = tqdm(total=num_sequences, initial=done, desc="targets", unit="seq", dynamic_ncols=True)
    for batch in batches:
        if seen + len(batch["input_ids"]) <= done:  # already written in an earlier run: skip the teacher work
            seen += len(batch["input_ids"])
            continue
        batch = {key: v.to(device) for key, v in batch.items()}
        logits = teacher_forward(teacher, batch)
        vocab_size = logits.shape[-1]
        ids, logprobs, log_rest = teacher_topk(logits, k)
        part = {"input_ids": batch["input_ids"].int(), "document_ids": batch["document_ids"].int(),
                "loss_mask": batch["loss_mask"].bool(), "topk_ids": ids}
        part |= {"topk_logprobs": logprobs.half()} if encoding == "exact" else {"topk_logprobs": logprobs,
                                                                                 "log_rest": log_rest}
        for key, value in part.items():
            buffer.setdefault(key, []).append(value.cpu())
        seen += len(batch["input_ids"])
        bar.update(len(batch["input_ids"]))
        pending = seen - done
        if pending >= sequences_per_shard or seen >= num_sequences:
            keep = min(pending, num_sequences - done)
            tensors = {key: torch.cat(v)[:keep].contiguous() for key, v in buffer.items()}
            if encoding == "compact":
                tensors = codec.encode(tensors, tensors["topk_ids"], tensors["topk_logprobs"], tensors["log_rest"],
                                       vocab_size)
            name = f"shard_{len(manifest['shards']):05d}.safetensors"
            save_file(tensors, str(out_dir / f".{name}.tmp"))
            os.replace(out_dir / f".{name}.tmp", out_dir / name)
            manifest["shards"].append({"file": name, "num_sequences": keep, "sha256": sha256(out_dir / name)})
            done += keep
            size = sum((out_dir / s["file"]).stat().st_size for s in manifest["shards"])
            manifest["bytes_per_token"] = round(size / (done * seq_len), 2)
            buffer = {}
            _write_json(manifest_path, manifest)
        if done >= num_sequences:
            break
    bar.close()
    if done < num_sequences:
        raise RuntimeError(f"The data ran out after {done} of {num_sequences} sequences: add data or lower num_sequences.")
    manifest["complete"] = True
    _write_json(manifest_path, manifest)
    return manifest


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class TargetMismatchError(ValueError):
    """Stored targets do not belong to this run (teacher, tokenizer, k, length) or are damaged."""


def manifest_encoding(manifest: dict[str, Any], path: Path) -> str:
    """The encoding of a targets folder's shards: ``exact`` for format 1 (no ``encoding`` key)."""
    if manifest.get("format") not in (1, FORMAT_VERSION):
        raise TargetMismatchError(
            f"Targets in {path} have format {manifest.get('format')!r}; this xlstm-distill reads formats 1 and "
            f"{FORMAT_VERSION}: upgrade xlstm-distill, or regenerate them with `xlstm-distill targets`.")
    encoding = manifest.get("encoding", "exact")
    if encoding not in TARGET_ENCODINGS:
        raise TargetMismatchError(f"Targets in {path} have the unknown encoding {encoding!r}: regenerate them with "
                                  "`xlstm-distill targets`.")
    return encoding


@dataclass
class TargetShards:
    """Reader: verifies the manifest against the run, checksums shards, yields shuffled batches, resumes exactly."""

    path: Path
    batch_size: int
    seed: int = 0
    expect: dict[str, Any] | None = None  # e.g. {"tokenizer_hash": ..., "k": 256, "seq_len": 1024}
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"No {MANIFEST} in {self.path}: run `xlstm-distill targets` first.")
        self.manifest = json.loads(manifest_path.read_text())
        if not self.manifest.get("complete"):
            raise TargetMismatchError(f"Targets in {self.path} are incomplete: re-run `xlstm-distill targets` to finish them.")
        for key, want in (self.expect or {}).items():
            if self.manifest.get(key) != want:
                raise TargetMismatchError(
                    f"Targets in {self.path} were made with {key}={self.manifest.get(key)!r}, this run needs {want!r}. "
                    "Regenerate them for this teacher/tokenizer/settings (or point to the right folder).")
        self.encoding = manifest_encoding(self.manifest, self.path)
        self.codec = CompactCodec(**self.manifest["codec"]) if self.encoding == "compact" else None
        self.offsets = np.cumsum([0] + [s["num_sequences"] for s in self.manifest["shards"]])
        self.num_sequences = int(self.offsets[-1])
        self.epoch, self.position = 0, 0
        self._verified: set[str] = set()
        self._cache: tuple[int, dict[str, torch.Tensor], np.ndarray | None] | None = None

    def _shard(self, index: int) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
        """A verified shard's tensors and, for compact shards, its vocabulary order (decoded once)."""
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1:]
        info = self.manifest["shards"][index]
        file = self.path / info["file"]
        if not file.is_file():
            raise TargetMismatchError(f"Target shard {file} is missing.")
        if info["file"] not in self._verified:
            if sha256(file) != info["sha256"]:
                raise TargetMismatchError(f"Target shard {file} is corrupt (checksum mismatch): delete it and regenerate.")
            self._verified.add(info["file"])
        try:
            tensors = load_file(str(file))
        except SafetensorError as err:
            raise TargetMismatchError(f"Target shard {file} cannot be read ({err}): delete it and regenerate.") from err
        self._cache = (index, tensors, self.codec.vocab_order(tensors) if self.codec else None)
        return self._cache[1:]

    def _order(self) -> np.ndarray:
        """This rank's sequence order for the current epoch (shuffled within shards, shards in random order)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.concatenate([self.offsets[s] + rng.permutation(self.offsets[s + 1] - self.offsets[s])
                                for s in rng.permutation(len(self.offsets) - 1)])
        global_batch = self.batch_size * self.world_size  # whole global steps only: every rank ends the epoch together
        return order[:len(order) - len(order) % global_batch][self.rank::self.world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = self._order()
            while self.position + self.batch_size <= len(order):
                rows = order[self.position:self.position + self.batch_size]
                self.position += self.batch_size
                yield self.read(rows)
            self.epoch, self.position = self.epoch + 1, 0

    def read(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of sequences ``rows`` (indices into the whole set, in shard order)."""
        parts = []
        for row in rows:
            shard = int(np.searchsorted(self.offsets, row, side="right") - 1)
            tensors, order = self._shard(shard)
            index = int(row - self.offsets[shard])
            parts.append(self.codec.decode(tensors, index, order) if self.codec
                         else {key: v[index] for key, v in tensors.items()})
        batch = {key: torch.stack([p[key] for p in parts]) for key in parts[0]}
        batch["input_ids"], batch["document_ids"] = batch["input_ids"].long(), batch["document_ids"].long()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Global position: the ranks together have consumed the first ``consumed`` sequences of the epoch's order
        (rank r reads order[r::world_size]), so any world size with the same global batch can continue it."""
        return {"epoch": self.epoch, "consumed": self.position * self.world_size, "seed": self.seed,
                "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "consumed" not in state:
            raise ValueError("This Stage II checkpoint was written by an older xlstm-distill (per-rank target "
                             "position): restart Stage II from Stage I, or resume it with that version.")
        if state["seed"] != self.seed:
            raise ValueError(f"Target reader state was saved with seed {state['seed']}, this run has {self.seed}.")
        global_batch = self.batch_size * self.world_size
        if state["global_batch"] != global_batch:
            raise ValueError(
                f"Target reader state was saved with a global batch of {state['global_batch']} sequences; this run has "
                f"{self.batch_size} x {self.world_size} ranks = {global_batch}. Resume with the same global batch "
                "(set batch_size = global batch / number of processes).")
        self.epoch, self.position = state["epoch"], state["consumed"] // self.world_size
