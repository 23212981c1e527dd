"""Where a student decode step's GPU time goes: the step as the benchmark runs it (CUDA graph, optionally
through torch.compile) after a prompt, its milliseconds, its kernel launches per step and its top kernels.

    python benchmarks/decode_profile.py --out DIR [--shape smollm2-135m] [--batch 1] [--compile] \
        [--mixer-step triton]   # CUDA only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from xlstm_distill.benchmarks.inference import STUDENT_PREFILL, random_models, shape_config
from xlstm_distill.benchmarks.report import time_call
from xlstm_distill.modeling import HybridConfig
from xlstm_distill.modeling.cache import cache_of
from xlstm_distill.modeling.decode import StaticDecoder

STEPS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="the step through torch.compile (--compile-decode)")
    parser.add_argument("--mixer-step", default="auto", help="kernels.mixer_step: auto, native or triton (the fused "
                        "decode step of each layer's mixer)")
    args = parser.parse_args()
    device = torch.device("cuda")
    model = random_models(shape_config(args.shape), HybridConfig(kernels={"mixer_step": args.mixer_step}), device,
                          torch.bfloat16)["student"]()
    prompt = torch.randint(model.config.vocab_size, (args.batch, STUDENT_PREFILL), device=device)
    with torch.no_grad():
        decoder = StaticDecoder(model, cache_of(model(input_ids=prompt, use_cache=True, logits_to_keep=1)),
                                compile=args.compile)
    token = prompt[:, -1:]
    ms = 1e3 * time_call(lambda: decoder.step(token), repeats=50, warmup=5)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            decoder.step(token)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    gpu_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / STEPS
    title = (f"{args.shape}, batch {args.batch}, {'compiled' if args.compile else 'eager'} step in a CUDA graph: "
             f"{ms:.3f} ms per step (wall), {gpu_ms:.3f} ms of kernels, {kernels / STEPS:.0f} kernels per step")
    table = events.table(sort_by="self_cuda_time_total", row_limit=30)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"decode_profile_{args.shape}_b{args.batch}_{'compiled' if args.compile else 'eager'}.txt"
    (args.out / name).write_text(f"{title}\n\n{table}\n")
    print(title, table, sep="\n")


if __name__ == "__main__":
    main()
