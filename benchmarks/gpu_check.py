"""GPU check and step timing (one device call): native kernels on CUDA vs the CPU fp32 reference, then Stage I and
Stage II step time / memory with SmolLM2-135M shapes (random weights: speed does not depend on the values), under
bf16 autocast as the stages train on CUDA.

    python benchmarks/gpu_check.py --out $OUT
    python benchmarks/gpu_check.py --out $OUT --memory-branch both   # the steps with the memory branch eager, then
                                                                     # through torch.compile (the default)
    python benchmarks/gpu_check.py --out $OUT --compile-model   # also with align.compile and distill.compile
    python benchmarks/gpu_check.py --out $OUT --sinks compare   # FlexAttention's sinks copied for rows of one document
                                                                # (the default), for all rows, for none
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import xlstm_distill as xd
from xlstm_distill.kernels import KernelOptions, mlstm_chunkwise, mlstm_recurrent, swa_sinks_attention
from xlstm_distill.stages.align import make_align_step, set_stage1_trainable
from xlstm_distill.stages.distill import OnlineTargets, make_distill_step, set_stage2_trainable

SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def kernel_checks() -> dict:
    g = torch.Generator().manual_seed(0)
    B, H, S, D = 2, 4, 300, 32
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    q, k = q.softmax(-1), k.softmax(-1)
    i, lf = torch.randn(B, H, S, generator=g), torch.nn.functional.logsigmoid(torch.randn(B, H, S, generator=g) + 3)
    ref, _ = mlstm_recurrent(q, k, v, i, lf)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        h, _ = mlstm_chunkwise(*(x.cuda().to(dtype) for x in (q, k, v)), i.cuda(), lf.cuda(), chunk_size=64)
        out[f"mlstm_chunkwise_cuda_{dtype}"] = rel(h.float().cpu(), ref)
    doc = torch.zeros(B, S, dtype=torch.long)
    ref_swa = swa_sinks_attention(q, k[:, :2], v[:, :2], doc, 64, 4, 0.2)
    for dtype in (torch.float32, torch.bfloat16):
        o = swa_sinks_attention(*(x.cuda().to(dtype) for x in (q, k[:, :2], v[:, :2])), doc.cuda(), 64, 4, 0.2)
        out[f"swa_cuda_{dtype}"] = rel(o.float().cpu(), ref_swa)
    return out


def _time_steps(step, batch: dict, steps: int) -> dict:
    """Seconds per step and peak GB of ``steps`` steps after one untimed one."""
    step(batch, 1.0)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); t = time.perf_counter()
    for _ in range(steps):
        step(batch, 1.0)
    torch.cuda.synchronize()
    return {"s_per_step": (time.perf_counter() - t) / steps, "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def _time_compiled(step, batch: dict, steps: int) -> dict:
    """``_time_steps`` of a compiled step, after a first call whose seconds (the compilation) are ``compile_s``."""
    t = time.perf_counter()
    step(batch, 0.0)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t
    return {**_time_steps(step, batch, steps), "compile_s": compile_s}


def step_timing(batch_size: int, seq_len: int, steps: int = 3, compile_model: bool = False,
                kernels: KernelOptions | None = None) -> dict:
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(SMOLLM2).cuda().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = xd.convert(teacher, xd.HybridConfig(kernels=kernels))
    batch = {"input_ids": torch.randint(0, 49152, (batch_size, seq_len)),
             "document_ids": torch.zeros(batch_size, seq_len, dtype=torch.long),
             "loss_mask": torch.ones(batch_size, seq_len, dtype=torch.bool)}
    res = {}
    set_stage1_trainable(student)
    res["stage1"] = _time_steps(make_align_step(student, teacher, torch.bfloat16), batch, steps)
    if compile_model:  # each layer's mixer and MSE through one compiled function (align.compile)
        res["stage1_compiled"] = _time_compiled(make_align_step(student, teacher, torch.bfloat16, compiled=True),
                                                batch, steps)
    model = set_stage2_trainable(student, "full")
    tb = next(iter(OnlineTargets(teacher, [batch], k=256)))
    res["stage2"] = _time_steps(make_distill_step(model, 0.9, 0.1, "renormalize", torch.bfloat16), tb, steps)
    if compile_model:  # the whole student as one graph (distill.compile)
        compiled = make_distill_step(torch.compile(model, fullgraph=True), 0.9, 0.1, "renormalize", torch.bfloat16)
        res["stage2_compiled_model"] = _time_compiled(compiled, tb, steps)
    for r in res.values():
        r["tokens_per_s"] = batch_size * seq_len / r["s_per_step"]
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--memory-branch", choices=("compiled", "eager", "both"), default="compiled",
                        help="the student's memory branch through torch.compile (the default), eager, or both in turn")
    parser.add_argument("--sinks", choices=("rows", "all", "none", "compare"), default="rows",
                        help="with gradients, FlexAttention's sinks copied per query block for rows of one document "
                             "(the default; these steps' rows are packed), for all rows, for none, or each in turn")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each stage (after one untimed)")
    parser.add_argument("--compile-model", action="store_true",
                        help="Stage I also with align.compile, Stage II with the whole student compiled")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": kernel_checks()}
    memory = ("eager", "compiled") if args.memory_branch == "both" else (args.memory_branch,)
    sinks = ("rows", "all", "none") if args.sinks == "compare" else (args.sinks,)
    for mode in memory:
        for sink_mode in sinks:
            kernels = KernelOptions(compile_memory=mode == "compiled", copy_sinks=sink_mode)
            key = "steps_b16_t1024" + (f"_{mode}_memory_branch" if args.memory_branch == "both" else "") + (
                f"_sinks_copied_{sink_mode}" if args.sinks == "compare" else "")
            result[key] = step_timing(16, 1024, args.steps, args.compile_model, kernels)
            print(key, result[key], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    json.dump(result, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
