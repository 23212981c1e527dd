"""Stage III linear merging (xlstm_distill.merging.merge) on tiny random Llama checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from xlstm_distill.merging import MergeError, merge, normalize_weights
from xlstm_distill.teacher import resolve_teacher

TINY = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tokenizer():
    folder, gguf = resolve_teacher("smollm2-135m")
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def make_expert(path: Path, tokenizer, seed: int, dtype=torch.float32, shard: str | None = None, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, **overrides})).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


def state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved folder, read straight from its safetensors files."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def experts(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("experts")
    return [make_expert(root / f"e{i}", tokenizer, seed=i) for i in range(2)]


def test_normalize_weights():
    assert normalize_weights(None, 4) == [0.25] * 4
    assert normalize_weights([3, 1], 2) == [0.75, 0.25]
    for bad, match in [([-1, 2], "non-negative"), ([0, 0], "sum to 0"), ([1], "2 experts"),
                       ([float("nan"), 1], "finite")]:
        with pytest.raises(MergeError, match=match):
            normalize_weights(bad, 2)


def test_identical_experts_merge_to_the_same_model(experts, tmp_path):
    out = merge([experts[0], experts[0]], None, tmp_path / "same")
    a, m = state(experts[0]), state(out)
    assert a.keys() == m.keys() and all(torch.equal(a[k], m[k]) for k in a)
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(experts[0])
    ids = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_weights_one_zero_give_the_first_expert_bitwise(experts, tmp_path):
    out = merge(experts, [1.0, 0.0], tmp_path / "first")
    a, m = state(experts[0]), state(out)
    assert a.keys() == m.keys()
    for k in a:
        assert a[k].dtype == m[k].dtype and torch.equal(a[k].view(torch.uint8), m[k].view(torch.uint8)), k
    assert json.loads((out / "merge_info.json").read_text())["normalized_weights"] == [1.0, 0.0]


def test_half_half_is_the_torch_average(experts, tmp_path):
    out = merge(experts, [0.5, 0.5], tmp_path / "avg")
    a, b, m = state(experts[0]), state(experts[1]), state(out)
    for k in a:
        assert torch.equal(m[k], (a[k] + b[k]) / 2), k
    # the merged folder is a complete model + tokenizer
    for fname in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / fname).is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], m[k]) for k in m)
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"]


def test_unequal_weights_bf16_and_shards(tokenizer, tmp_path):
    e1 = make_expert(tmp_path / "b1", tokenizer, seed=1, dtype=torch.bfloat16, shard="40KB")
    e2 = make_expert(tmp_path / "b2", tokenizer, seed=2, dtype=torch.bfloat16)  # unsharded
    assert (e1 / "model.safetensors.index.json").is_file() and (e2 / "model.safetensors").is_file()
    out = merge([e1, e2], [3, 1], tmp_path / "m", max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b, m = state(e1), state(e2), state(out)
    assert set(index["weight_map"]) == set(a) == set(m)
    for k in a:
        expected = (a[k].float() * 0.75 + b[k].float() * 0.25).to(torch.bfloat16)
        assert m[k].dtype == torch.bfloat16 and torch.equal(m[k], expected), k
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_different_architecture_is_refused(experts, tokenizer, tmp_path):
    other = make_expert(tmp_path / "deep", tokenizer, seed=0, num_hidden_layers=3)
    with pytest.raises(MergeError, match=r"config\.json.*num_hidden_layers: 2 vs 3"):
        merge([experts[0], other], None, tmp_path / "out")
    rope = make_expert(tmp_path / "rope", tokenizer, seed=0, rope_theta=500000.0)
    with pytest.raises(MergeError, match=r"rope_parameters\.rope_theta"):
        merge([experts[0], rope], None, tmp_path / "out")


def test_different_tensors_are_refused(experts, tmp_path):
    import shutil

    for case in ("missing", "shape"):
        folder = tmp_path / case
        shutil.copytree(experts[1], folder)
        tensors = load_file(folder / "model.safetensors")
        if case == "missing":
            del tensors["model.layers.1.mlp.up_proj.weight"]
            match = r"tensor names: tensors missing: model\.layers\.1\.mlp\.up_proj\.weight"
        else:
            tensors["model.norm.weight"] = torch.ones(16)
            match = r"tensor shapes: model\.norm\.weight: \[32\] vs \[16\]"
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(MergeError, match=match):
            merge([experts[0], folder], None, tmp_path / "out")


def test_different_tokenizer_is_refused(experts, tokenizer, tmp_path):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(experts[1], folder)
    changed = AutoTokenizer.from_pretrained(folder)
    changed.add_tokens(["<extra_token_for_test>"])
    changed.save_pretrained(folder)
    with pytest.raises(MergeError, match=r"tokenizer: .*tokenizer\.json \(content differs\)"):
        merge([experts[0], folder], None, tmp_path / "out")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(MergeError, match=r"tokenizer\.json \(present in expert 1, missing in expert 2\)"):
        merge([experts[0], folder], None, tmp_path / "out")


def test_bad_arguments_are_refused(experts, tmp_path):
    with pytest.raises(MergeError, match="non-negative"):
        merge(experts, [1.0, -0.5], tmp_path / "neg")
    with pytest.raises(MergeError, match="one weight per expert"):
        merge(experts, [1.0], tmp_path / "count")
    with pytest.raises(MergeError, match="not a folder"):
        merge([experts[0], tmp_path / "nope"], None, tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file.txt").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge(experts, None, busy)
    merge(experts, None, busy, overwrite=True)
    assert (busy / "model.safetensors").is_file()
    with pytest.raises(MergeError, match="one of the experts"):
        merge(experts, None, experts[0])
    with safe_open(busy / "model.safetensors", framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
