"""benchmarks/scale_8b.py at the tiny shape on CPU: every stage runs through the pipeline and the report has its
fields (tokens/s, FLOPs, MFU, memory, the profiled Stage II step) in JSON, markdown and PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_shape_reports_every_stage(tmp_path):
    pytest.importorskip("torchao")  # the benchmark's Stage I and II use AdamW8bit
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale_8b.py"), "--out", str(out), "--shape", "tiny",
                    "--seq-len", "64", "--steps", "1", "--loss-chunk-tokens", "16", "--work", str(tmp_path / "work")],
                   check=True, timeout=600)
    result = json.loads((out / "scale_tiny.json").read_text())
    assert result["shape"] == "tiny" and result["seq_len"] == 64 and "scale_8b.py" in result["command"]
    assert result["device"].startswith("CPU") and result["versions"]["torch"] and result["peak_flops"] is None
    assert set(result["stages"]) == {"convert", "Stage I", "targets", "Stage II"}
    for name in ("Stage I", "targets", "Stage II"):
        stage = result["stages"][name]
        assert stage["tokens_per_s"] > 0 and stage["flops_per_token"] > 0 and stage["seconds"] > 0
        assert stage["mfu"] is None and stage["peak_mem_gb"] is None  # no GPU: no peak FLOPs, no GPU memory
    params = result["params"]
    assert result["stages"]["Stage II"]["flops_per_token"] == 6 * params["student_matmul"]
    assert result["stages"]["targets"]["flops_per_token"] == 2 * params["teacher_matmul"]
    settings = result["stage2_settings"]
    assert settings == {"train": "full", "optimizer": "adamw8bit", "param_dtype": "bfloat16",
                        "activation_checkpointing": True, "loss_chunk_tokens": 16, "compile": False, "batch_size": 1}
    profile = result["profile"]
    assert profile["ops"] and all(op["self_ms"] >= 0 and op["calls"] > 0 for op in profile["ops"])
    assert profile["ops"][0]["self_ms"] == max(op["self_ms"] for op in profile["ops"])
    assert sum(op["share"] for op in profile["ops"]) <= 1.0 + 1e-9
    memory = profile["memory"]
    assert memory["trained_params_gb"] > 0 and memory["optimizer_state_gb"] > 0
    markdown = (out / "scale_tiny.md").read_text()
    assert "Where the time goes" in markdown and "| Stage II |" in markdown and result["command"] in markdown
    assert (out / "scale_tiny.png").stat().st_size > 0
    # the models were deleted once read (disk at 8B), the targets stay
    assert not (tmp_path / "work" / "tiny" / "stage2" / "model").exists()
    assert not (tmp_path / "work" / "tiny" / "student-init").exists()
