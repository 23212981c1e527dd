"""Stage II under torchrun + FSDP2 (2 CPU processes, gloo) gives the single-process losses for the same global batch."""

import json
import shutil
import subprocess
import sys

import pytest

from helpers import tiny_recipe
from xlstm_distill.stages.recipe import Pipeline, Recipe


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


def _losses(path):
    return [json.loads(line)["loss"] for line in (path / "stage2" / "metrics.jsonl").read_text().splitlines()]


def _distill(batch_size: int) -> dict:
    return dict(steps=4, batch_size=batch_size, lr=1e-3, warmup_steps=1, checkpoint_every=2)


def test_two_process_fsdp_matches_single_process(root):
    Pipeline(Recipe.load(tiny_recipe(root, "single", distill=_distill(4)))).distill()  # Stage I and targets first
    tiny_recipe(root, "sharded", distill=_distill(2))  # 2 ranks x 2 = the same global batch of 4
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
