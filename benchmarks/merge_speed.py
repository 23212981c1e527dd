"""Stage III merging speed and memory on CPU: 4 experts of the SmolLM2-135M student's shape (the converted
``mlstm_swa`` student, float32, and 3 copies with random perturbations), merged uniformly by ``merge`` in a fresh
process each time (wall time of the call; peak resident memory of the process, ``VmHWM``, next to its resident memory
after the imports); then ``merge --sweep`` on a small slice of the offline corpora's sweep split.

    python benchmarks/merge_speed.py --out benchmarks/results/merge-speed --work /tmp/merge-speed \\
        --corpora runs/corpora

The experts (about 0.6 GB each) are written under --work once and reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from xlstm_distill.benchmarks.report import write_results

# Runs in a fresh process: resident memory after the imports, the merge's wall time, the process's peak.
CHILD = """
import json, sys, time
def status(key):
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
from xlstm_distill.cli import app
from xlstm_distill.merging import merge
rss_imports = status("VmRSS")
args = json.loads(sys.argv[1])
t = time.perf_counter()
if args[0] == "merge-function":
    merge(args[1:-1], None, args[-1], overwrite=True)
else:
    app(args, standalone_mode=False)
print(json.dumps({"seconds": time.perf_counter() - t, "rss_after_imports_mb": rss_imports,
                  "peak_rss_mb": status("VmHWM")}))
"""


def build_experts(work: Path, n: int, scale: float) -> list[Path]:
    """The converted SmolLM2-135M student and ``n - 1`` perturbed copies (theta + scale * N(0, 1) per entry)."""
    import torch

    import xlstm_distill as xd

    folders = [work / f"expert{i}" for i in range(n)]
    if all((f / "model.safetensors").exists() for f in folders):
        return folders
    teacher, tokenizer = xd.load_teacher("smollm2-135m")
    student = xd.convert(teacher, xd.HybridConfig(mixer="mlstm_swa"))
    g = torch.Generator().manual_seed(0)
    for i, folder in enumerate(folders):
        state = {k: v + scale * i * torch.randn(v.shape, generator=g) for k, v in student.state_dict().items()}
        student.save_pretrained(folder, state_dict=state)
        tokenizer.save_pretrained(folder)
    return folders


def child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    lines = result.stdout.strip().splitlines()
    return {**json.loads(lines[-1]), "log": lines[:-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="Folder for the experts and the merged models.")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpora", type=Path, help="Offline corpora for the sweep (skipped without).")
    parser.add_argument("--sweep-args", default="--seq-len 128 --sequences 1 --batch-size 1 --grid 2 --refine 0",
                        help="The sweep's size.")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    experts = build_experts(args.work, args.experts, 1e-3)
    model_mb = sum(f.stat().st_size for f in experts[0].glob("*.safetensors")) / 2**20
    rows = []
    for r in range(args.repeats):
        m = child(["merge-function", *map(str, experts), str(args.work / "merged")])
        rows.append({"run": f"merge {args.experts} experts, uniform (#{r + 1})", "seconds": m["seconds"],
                     "peak_rss_mb": m["peak_rss_mb"], "rss_after_imports_mb": m["rss_after_imports_mb"],
                     "model_mb": model_mb})
        print(rows[-1], flush=True)
    if args.corpora:
        data = [f"--sweep-data={d}={args.corpora / f'{d}.jsonl'}" for d in ("chat", "code", "prose", "math")]
        cli = ["merge", *map(str, experts), "--out", str(args.work / "merged-sweep"), "--overwrite", "--sweep",
               "--teacher", "smollm2-135m", "--device", "cpu", *data, *args.sweep_args.split()]
        m = child(cli)
        info = json.loads((args.work / "merged-sweep" / "merge_info.json").read_text())["sweep"]
        rows.append({"run": f"merge --sweep ({args.sweep_args}), {len(info['candidates'])} candidates, "
                            f"{sum(info['tokens'].values())} tokens", "seconds": m["seconds"],
                     "peak_rss_mb": m["peak_rss_mb"], "rss_after_imports_mb": m["rss_after_imports_mb"],
                     "model_mb": model_mb})
        print("\n".join(m["log"]), flush=True)
        print(rows[-1], flush=True)
        (args.out / "sweep").mkdir(parents=True, exist_ok=True)
        (args.out / "sweep" / "merge_info.json").write_text(
            (args.work / "merged-sweep" / "merge_info.json").read_text())
        (args.out / "sweep" / "sweep.png").write_bytes((args.work / "merged-sweep" / "sweep.png").read_bytes())
    write_results(args.out, "merge_speed", rows, command,
                  ["run", "seconds", "peak_rss_mb", "rss_after_imports_mb", "model_mb"])
    print((args.out / "merge_speed.md").read_text())


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
