"""Stage II target encodings on real teacher targets: bytes per token, fidelity, reader and writer speed.

    python benchmarks/target_formats.py --recipe recipes/demo-cpu.yaml --sequences 192 \\
        --out benchmarks/results/target-formats

1. The recipe's teacher computes its top-k (float32 log-probabilities and the log of the mass outside the top k)
   for ``--sequences`` packed sequences of the recipe's data (k = ``--k``).
2. Each encoding writes them through ``write_targets`` (a replay module stands in for the teacher: its logits have
   the stored top k and the stored rest mass spread evenly over the other ids, so log-softmax and top-k give the
   teacher's targets back) and ``TargetShards`` reads them: bytes per token (shard files / tokens), writer and
   reader tokens/s, and KL(exact top-k distribution || stored) per token over the k ids plus the rest bucket, the
   rest as Stage II's residual loss sees it (1 - the stored mass).
   Every compact ``--heads`` x ``--bits`` setting is also measured through the codec alone (one shard of all
   sequences): bytes, encode and decode tokens/s, KL.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from safetensors.torch import save

from xlstm_distill.benchmarks.report import write_results
from xlstm_distill.stages.common import teacher_forward
from xlstm_distill.stages.context import RunContext
from xlstm_distill.stages.recipe import Recipe
from xlstm_distill.stages.target_codec import CompactCodec
from xlstm_distill.stages.targets import TargetShards, teacher_topk, write_targets


def teacher_targets(recipe: Recipe, sequences: int, k: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """The teacher's exact top-k for ``sequences`` packed sequences of the recipe's data."""
    ctx = RunContext(recipe)
    parts: dict[str, list[torch.Tensor]] = {}
    start, done = time.perf_counter(), 0
    with torch.no_grad():
        for batch in ctx.packed(rank=0, world_size=1).iter_batches(batch_size):
            ids, logp, log_rest = teacher_topk(teacher_forward(ctx.teacher, batch), k)
            for key, value in {**batch, "topk_ids": ids, "topk_logprobs": logp, "log_rest": log_rest}.items():
                parts.setdefault(key, []).append(value)
            done += len(ids)
            print(f"teacher: {done} sequences, {time.perf_counter() - start:.0f} s", file=sys.stderr)
            if done >= sequences:
                break
    out = {key: torch.cat(v)[:sequences] for key, v in parts.items()}
    out["vocab_size"] = torch.tensor(ctx.teacher.config.vocab_size)
    out["teacher_tok_s"] = torch.tensor(out["input_ids"].numel() / (time.perf_counter() - start))
    return out


class ReplayTeacher(torch.nn.Module):
    """Logits whose log-softmax has the stored top k and the stored rest mass spread over the other ids."""

    def __init__(self, targets: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.targets, self.vocab_size, self.next = targets, int(targets["vocab_size"]), 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives write_targets a device

    def forward(self, input_ids: torch.Tensor, **_) -> object:
        rows = slice(self.next, self.next + len(input_ids))
        self.next += len(input_ids)
        ids, logp, log_rest = (self.targets[key][rows] for key in ("topk_ids", "topk_logprobs", "log_rest"))
        k = ids.shape[-1]
        logits = torch.empty(*ids.shape[:2], self.vocab_size)
        logits.copy_((log_rest - math.log(self.vocab_size - k)).unsqueeze(-1)).scatter_(-1, ids.long(), logp)
        return type("Output", (), {"logits": logits})()


class Batches:
    """The stored data in batches, as the targets stage feeds write_targets."""

    def __init__(self, targets: dict[str, torch.Tensor], batch_size: int) -> None:
        self.targets, self.batch_size = targets, batch_size

    def __iter__(self):
        n = len(self.targets["input_ids"])
        for start in range(0, n, self.batch_size):
            yield {key: self.targets[key][start:start + self.batch_size]
                   for key in ("input_ids", "document_ids", "loss_mask")}


def kl_per_token(targets: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(exact || stored) (N * T,) over the top-k ids (matched by id) and the rest bucket, in float64."""
    exact_ids, order = targets["topk_ids"].long().sort(-1)
    p = targets["topk_logprobs"].double().gather(-1, order)
    stored_ids, stored_order = stored["topk_ids"].long().sort(-1)
    if not torch.equal(exact_ids, stored_ids):
        raise AssertionError("stored ids differ from the teacher's top-k ids")
    q = stored["topk_logprobs"].double().gather(-1, stored_order)
    p_rest = targets["log_rest"].double()
    q_rest = torch.log((1 - q.exp().sum(-1)).clamp(min=1e-12))
    return ((p.exp() * (p - q)).sum(-1) + p_rest.exp() * (p_rest - q_rest)).reshape(-1)


def measure_codec(targets: dict[str, torch.Tensor], codec: CompactCodec) -> tuple[dict, torch.Tensor]:
    """One compact setting through the codec alone: bytes of one shard, encode / decode tokens/s, KL."""
    n, seq_len = targets["input_ids"].shape
    data = {key: targets[key] for key in ("input_ids", "document_ids", "loss_mask")}
    start = time.perf_counter()
    shard = codec.encode(data, targets["topk_ids"], targets["topk_logprobs"], targets["log_rest"],
                         int(targets["vocab_size"]))
    encode_s = time.perf_counter() - start
    size = len(save(shard))
    start = time.perf_counter()
    order = codec.vocab_order(shard)
    rows = [codec.decode(shard, row, order) for row in range(n)]
    decode_s = time.perf_counter() - start
    stored = {key: torch.stack([r[key] for r in rows]) for key in ("topk_ids", "topk_logprobs")}
    kl = kl_per_token(targets, stored)
    return {"encoding": f"compact h{codec.exact_head} b{codec.value_bits}", "exact_head": codec.exact_head,
            "value_bits": codec.value_bits, "bytes_per_token": size / (n * seq_len), "kl_mean": kl.mean().item(),
            "kl_p99": kl.quantile(0.99).item(), "kl_max": kl.max().item(), "encode_tok_s": n * seq_len / encode_s,
            "decode_tok_s": n * seq_len / decode_s}, kl


def measure_pipeline(targets: dict[str, torch.Tensor], encoding: str, folder: Path) -> dict:
    """write_targets (teacher replayed) then TargetShards: the manifest's bytes_per_token, writer and reader
    tokens/s; the data must round-trip."""
    n, seq_len = targets["input_ids"].shape
    start = time.perf_counter()
    manifest = write_targets(ReplayTeacher(targets), Batches(targets, 4), folder, k=targets["topk_ids"].shape[-1],
                             num_sequences=n, teacher_name="replay", tok_hash="-", seq_len=seq_len, encoding=encoding)
    write_s = time.perf_counter() - start
    reader = TargetShards(folder, batch_size=8)
    for index in range(len(manifest["shards"])):  # checksums and file reads outside the decode timing
        reader._shard(index)
    start = time.perf_counter()
    batches = [reader.read(np.arange(i, min(i + 8, n))) for i in range(0, n, 8)]
    read_s = time.perf_counter() - start
    for key in ("input_ids", "document_ids", "loss_mask"):
        if not torch.equal(torch.cat([b[key] for b in batches]), targets[key].to(batches[0][key].dtype)):
            raise AssertionError(f"{encoding}: {key} does not round-trip")
    stored = {key: torch.cat([b[key] for b in batches]) for key in ("topk_ids", "topk_logprobs")}
    kl = kl_per_token(targets, stored)
    return {"encoding": f"{encoding} (write_targets + TargetShards)", "bytes_per_token": manifest["bytes_per_token"],
            "kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item(), "kl_max": kl.max().item(),
            "writer_tok_s": n * seq_len / write_s, "reader_tok_s": n * seq_len / read_s}


def plot(rows: list[dict], kls: dict[str, torch.Tensor], default: str, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for row in rows:
        left.scatter(row["bytes_per_token"], max(row["kl_mean"], 1e-9), color="C1" if row["encoding"] == default else "C0")
        left.annotate(row["encoding"], (row["bytes_per_token"], max(row["kl_mean"], 1e-9)), fontsize=7)
    left.axhline(1e-3, color="gray", ls="--", lw=0.8)
    left.axvline(400, color="gray", ls=":", lw=0.8)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("bytes per token")
    left.set_ylabel("mean KL(exact || stored), nats")
    kl = kls[default].clamp(min=1e-9).numpy()
    right.hist(np.log10(kl), bins=60)
    right.set_xlabel(f"log10 KL per token ({default})")
    right.set_ylabel("tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo-cpu.yaml"))
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. data.offline_corpora=DIR")
    parser.add_argument("--sequences", type=int, default=192)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--heads", default="4,8,16")
    parser.add_argument("--bits", default="3,4,5")
    parser.add_argument("--cache", type=Path, help="file of the teacher's targets: written on the first run, read after")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while encoding and decoding")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/target-formats"))
    args = parser.parse_args()
    recipe = Recipe.load(args.recipe, [*args.set, f"out_dir={tempfile.mkdtemp()}"])
    if args.cache is not None and args.cache.exists():
        targets = torch.load(args.cache)
        if targets["input_ids"].shape[0] < args.sequences or targets["topk_ids"].shape[-1] != args.k:
            raise SystemExit(f"{args.cache} holds other targets: delete it or give another --cache.")
        targets = {key: v[:args.sequences] if v.dim() else v for key, v in targets.items()}
        print(f"teacher targets from {args.cache}", file=sys.stderr)
    else:
        targets = teacher_targets(recipe, args.sequences, args.k)
        if args.cache is not None:
            torch.save(targets, args.cache)
    torch.set_num_threads(args.threads)
    default = CompactCodec()
    default_name = f"compact h{default.exact_head} b{default.value_bits}"
    rows, kls = [], {}
    for h in map(int, args.heads.split(",")):
        for b in map(int, args.bits.split(",")):
            row, kls[f"compact h{h} b{b}"] = measure_codec(targets, CompactCodec(exact_head=h, value_bits=b))
            rows.append({**row, "default": (h, b) == (default.exact_head, default.value_bits)})
            print(rows[-1], file=sys.stderr)
    work = Path(tempfile.mkdtemp())
    for encoding in ("exact", "compact"):
        rows.append(measure_pipeline(targets, encoding, work / encoding))
        print(rows[-1], file=sys.stderr)
    shutil.rmtree(work)
    command = "python " + " ".join(sys.argv)
    for row in rows:
        row |= {"teacher_tok_s": float(targets["teacher_tok_s"]), "threads": args.threads,
                "tokens": targets["input_ids"].numel(), "k": args.k}
    write_results(args.out, "target_formats", rows, command,
                  ["encoding", "default", "bytes_per_token", "kl_mean", "kl_p99", "kl_max", "encode_tok_s",
                   "decode_tok_s", "writer_tok_s", "reader_tok_s"],
                  lambda rows, path: plot([r for r in rows if "exact_head" in r], kls, default_name, path))


if __name__ == "__main__":
    main()
