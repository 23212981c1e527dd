"""The multi-GPU driver (benchmarks/multi_gpu.py) on CPU: 2 gloo processes against 1, and resumes across world sizes."""

import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from xlstm_distill.teacher import resolve_teacher

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_shape_two_processes_match_one(tmp_path):
    folder, gguf = resolve_teacher("smollm2-135m")
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--out", str(out), "--shape", "tiny",
                    "--tokenizer", str(tmp_path / "tokenizer"), "--corpora", str(tmp_path / "corpora"),
                    "--work", str(tmp_path / "runs"), "--steps", "4", "--batch", "4"], check=True, timeout=900)
    summary = json.loads((out / "multi_gpu_tiny.json").read_text())
    assert set(summary["max_rel_loss_diff"]) == {"sharded", "2-to-one", "one-to-2"}
    assert all(d < 2e-3 for d in summary["max_rel_loss_diff"].values()), summary["max_rel_loss_diff"]
    assert all(len(losses) == 4 for losses in summary["losses"].values())
    assert summary["tokens_per_s"]["sharded"] > 0 and (out / "multi_gpu_tiny.png").stat().st_size > 0
    runs = tmp_path / "runs" / "tiny"

    def rows(name):
        return [json.loads(line) for line in (runs / name / "stage2" / "metrics.jsonl").read_text().splitlines()]

    # the continuations kept their source's first two logged steps as they were (timings included): they resumed
    # from the step-2 checkpoint instead of starting again
    assert rows("2-to-one")[:2] == rows("sharded")[:2] and rows("one-to-2")[:2] == rows("single")[:2]
    assert [r["step"] for r in rows("2-to-one")] == [1, 2, 3, 4]
    for name in ("single", "sharded", "2-to-one", "one-to-2"):  # pruned: no checkpoint, no model left
        assert not list((runs / name / "stage2" / "checkpoints").glob("step_*"))
        assert not (runs / name / "stage2" / "model").exists()
