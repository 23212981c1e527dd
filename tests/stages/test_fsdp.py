"""Stage II under torchrun + FSDP2 (2 CPU processes, gloo) gives the single-process losses for the same global batch."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from helpers import tiny_teacher
from xlstm_distill.stages.recipe import Pipeline, Recipe
from xlstm_distill.teacher import resolve_teacher


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    folder, gguf = resolve_teacher("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    teacher = tiny_teacher("llama", vocab_size=len(tokenizer), logit_scale=3.0)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    g = torch.Generator().manual_seed(0)
    words = tokenizer.convert_ids_to_tokens(torch.randint(300, 5000, (4000,), generator=g).tolist())
    with (root / "data.jsonl").open("w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(w.strip("Ġ") for w in words[i * 20:(i + 1) * 20])}) + "\n")

    def recipe(name: str, batch_size: int) -> Recipe:
        spec = dict(name=name, out_dir=str(root / name), teacher=str(root / "teacher"),
                    student=dict(window_size=8, num_sink_tokens=2, chunk_size=16),
                    data=dict(sources=[{"path": str(root / "data.jsonl")}], seq_len=64),
                    align=dict(steps=2, batch_size=2, lr=1e-2, warmup_steps=1),
                    targets=dict(k=8, num_sequences=16, batch_size=4),
                    distill=dict(steps=4, batch_size=batch_size, lr=1e-3, warmup_steps=1, checkpoint_every=2),
                    evaluate=dict(held_out_sequences=2, batch_size=2))
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        return Recipe.load(root / f"{name}.yaml")

    return root, recipe


def _losses(path):
    return [json.loads(line)["loss"] for line in (path / "stage2" / "metrics.jsonl").read_text().splitlines()]


def test_two_process_fsdp_matches_single_process(setup):
    root, recipe = setup
    Pipeline(recipe("single", batch_size=4)).distill()  # runs Stage I and the targets first
    recipe("sharded", batch_size=2)  # writes sharded.yaml: 2 ranks x 2 = the same global batch of 4
    for part in ("student-init", "stage1", "targets"):
        shutil.copytree(root / "single" / part, root / "sharded" / part)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "xlstm_distill.cli",
           "distill", str(root / "sharded.yaml")]
    subprocess.run(cmd, check=True, timeout=600)
    a, b = _losses(root / "single"), _losses(root / "sharded")
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=2e-3), (a, b)
    assert a[-1] < a[0]
    assert (root / "sharded" / "stage2" / "model" / "config.json").exists()
