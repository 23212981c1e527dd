"""benchmarks/memory_selectivity.py reads each head as weights over the prefix: the teacher's softmax attention and the
student's mLSTM memory. The weights must reproduce what the layers compute: the teacher's attention output and the
memory branch's output at the scored position."""

import importlib.util
import sys
from pathlib import Path

import torch

import xlstm_distill as xd
from helpers import perturb_new_parameters, tiny_teacher
from xlstm_distill.modeling.attention import memory_and_mix

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(monkeypatch):
    spec = importlib.util.spec_from_file_location("memory_selectivity", BENCHMARKS / "memory_selectivity.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_weights_reproduce_teacher_attention_and_memory(monkeypatch):
    module = load(monkeypatch)
    teacher = tiny_teacher("llama")
    student = xd.convert(teacher, xd.HybridConfig(mixer="mlstm_swa", window_size=8, num_sink_tokens=2))
    perturb_new_parameters(student)
    ids = torch.randint(0, teacher.config.vocab_size, (40,))
    p, layer = 33, 1
    with torch.no_grad():
        hidden, pos_emb = module.layer_inputs(teacher, ids)[layer]
        attn = teacher.model.layers[layer].self_attn
        weights = module.teacher_weights(attn, hidden, pos_emb, p)  # (NH, p + 1)
        q, k = module.heads_qk(attn, hidden, pos_emb)
        B, T, _ = hidden.shape
        v = attn.v_proj(hidden).view(B, T, -1, attn.head_dim).transpose(1, 2)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
        torch.testing.assert_close((weights[:, None] @ v[0, :, :p + 1])[:, 0], expected[0, :, p], rtol=1e-4, atol=1e-5)
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[0]))

        hidden, pos_emb = module.layer_inputs(student, ids)[layer]
        attn = student.model.layers[layer].self_attn
        weights, gate = module.memory_weights(attn, hidden, pos_emb, p)
        q, k, v = attn.project(hidden)
        gates = attn.gate_proj(torch.cat([q, k, v], dim=-1)).transpose(1, 2)
        H, KV, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q = q.view(B, T, H, D).transpose(1, 2)
        k, v = (x.view(B, T, KV, D).transpose(1, 2) for x in (k, v))
        q, k = attn.apply_rope(q, k, *pos_emb)
        maps = (attn.q_feature_map.weight, attn.q_feature_map.bias, attn.k_feature_map.weight, attn.k_feature_map.bias)
        spec = xd.modeling.attention.MemorySpec(H, True, False, attn.chunk_size, attn.options)
        memory, _ = memory_and_mix(q, k, v, gates, None, maps, None, None, spec)  # (B, NH, T, DH) memory alone
        v = v.repeat_interleave(H // KV, dim=1)
        torch.testing.assert_close((weights[:, None] @ v[0, :, :p + 1])[:, 0], memory[0, :, p], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gate, torch.sigmoid(gates[0, -H:, p]))

    stats = module.summarize(torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25] * 4]), torch.tensor([0]))
    torch.testing.assert_close(stats["mass"], torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(stats["lift"], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(stats["tokens"], torch.tensor([1 / 0.375, 4.0]))


def test_driver_trains_variants_and_measures_them(tmp_path, monkeypatch):
    """A Stage I variant trains from the recipe's converted student; every model gets held-out KL, needle scores and
    the selectivity columns, the teacher its needle scores and attention mass; the files are written."""
    import json

    from helpers import REAL_TEXT, tiny_recipe

    module = load(monkeypatch)
    words = REAL_TEXT.split()
    docs = [f"Part {i}. " + " ".join(words[i % 300:] + words[:i % 300]) for i in range(400)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = {"sources": [{"path": str(tmp_path / "long.jsonl"), "name": "long"}], "seq_len": 96}
    recipe = tiny_recipe(tmp_path, "ms", data=data)
    out = tmp_path / "out"
    module.main(["--recipe", str(recipe), "--out", str(out), "--probes", "2", "--probe-length", "128",
                 "--sharpness", "1", "4", "--retrieval-mass", "0", "--variant", "plain: align.steps=2",
                 "--variant", "transfer: align.steps=2 align.attention_transfer=1.0",
                 "--variant", "wide: align.steps=2 student.feature_dim=24"])
    rows = json.loads((out / "memory_selectivity.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["teacher", "plain", "plain, sharpness 4", "transfer",
                                          "transfer, sharpness 4", "wide", "wide, sharpness 4"]
    assert (out / "runs" / "transfer" / "stage1" / "model" / "config.json").exists()
    configs = {name: json.loads((out / "runs" / name / "student-init" / "config.json").read_text())
               for name in ("plain", "wide")}  # a variant that changes the student is converted anew
    assert configs["wide"]["feature_dim"] == 24 and configs["plain"]["feature_dim"] is None
    plain, transfer = rows[1], rows[3]
    assert plain["kl"] > 0 and transfer["kl"] > 0 and plain["kl"] != transfer["kl"]
    assert 0 <= rows[0]["needles"] <= 1 and "kl" not in rows[0] and "gate_retrieval" not in rows[0]
    assert 0 < plain["gate_retrieval"] < 1 and plain["tokens_read_median"] >= 1
    for name in ("memory_selectivity.md", "memory_selectivity.png", "memory_selectivity_heads.json"):
        assert (out / name).stat().st_size > 0
