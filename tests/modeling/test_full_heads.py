"""Heads that keep the teacher's full attention (HybridConfig.full_attention_layers / full_attention_heads): every
head kept reproduces the teacher at any length, cached decoding equals the full forward, the cache grows only by
the kept heads' keys and values."""

import pytest
import torch

import xlstm_distill as xd
from xlstm_distill.modeling.decode import StaticDecoder, greedy_generate
from helpers import perturb_new_parameters, tiny_teacher
from test_student import SMALL, cached_logits, tokens

MIXED = dict(full_attention_heads=[[0, 1]], full_attention_layers=[1])  # one KV head of layer 0, all of layer 1


def student_with(mixer="mlstm_swa", family="llama", teacher=None, **config):
    student = xd.convert(teacher or tiny_teacher(family), xd.HybridConfig(mixer=mixer, **{**SMALL, **config}))
    perturb_new_parameters(student)
    return student


@pytest.mark.parametrize("family, how", [("llama", "layers"), ("llama", "heads"), ("qwen3", "layers"),
                                         ("olmo3", "heads"), ("gemma2", "heads"), ("gemma3_text", "layers")])
def test_every_head_kept_reproduces_the_teacher_beyond_the_window(family, how):
    """Also past a Gemma teacher's own window (16) with every layer converted: a kept head in a teacher's
    sliding-window layer attends over the teacher's window, with its soft-capping (Gemma 2)."""
    teacher = tiny_teacher(family)
    kept = (dict(full_attention_layers=[0, 1]) if how == "layers"
            else dict(full_attention_heads=[[l, h] for l in range(2) for h in range(2)]))
    student = student_with(teacher=teacher, convert_layers="all", **kept)
    ids = tokens(2, 40)  # 5x the window
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-4, rtol=1e-4)
        assert (student_with(teacher=teacher)(ids).logits - teacher(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_every_head_kept_generates_the_teachers_tokens_from_the_cache(family):
    teacher = tiny_teacher(family)
    student = student_with(teacher=teacher, full_attention_layers=[0, 1], convert_layers="all")
    ids = tokens(2, 12)
    ref = teacher.generate(ids, max_new_tokens=30, do_sample=False, min_new_tokens=30)[:, 12:]
    assert torch.equal(student.generate(ids, max_new_tokens=30, do_sample=False, min_new_tokens=30)[:, 12:], ref)
    assert torch.equal(greedy_generate(student, ids, 30, use_graph=False), ref)


@pytest.mark.parametrize("mixer", ["mlstm_swa", "swa", "linear_swa", "mlstm"])
def test_mixed_layers_cached_decoding_matches_full_forward(mixer):
    student = student_with(mixer, **MIXED)
    ids = tokens(2, 30)
    with torch.no_grad():
        full = student(ids).logits
    torch.testing.assert_close(cached_logits(student, ids), full, atol=1e-4, rtol=1e-4)
    # the kept heads differ from the hybrid ones: the same student without kept heads gives other logits
    plain = xd.HybridForCausalLM(xd.HybridConfig(**{**student.config.to_dict(), "full_attention_heads": [],
                                                    "full_attention_layers": []}))
    plain.load_state_dict(student.state_dict())
    with torch.no_grad():
        assert (plain(ids).logits - full).abs().max() > 1e-3


def test_mixed_layers_left_padding_and_packed_documents():
    student = student_with(**MIXED)
    ids = tokens(2, 9)
    short = ids[:1, :5]
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), ids[1:]], 0)
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    kwargs = dict(max_new_tokens=20, do_sample=False, min_new_tokens=20)
    batched = student.generate(batch, attention_mask=mask, **kwargs)
    assert torch.equal(batched[0, 4:], student.generate(short, **kwargs)[0])
    assert torch.equal(batched[1], student.generate(ids[1:], **kwargs)[0])
    long = tokens(1, 30)
    doc_ids = torch.tensor([[0] * 13 + [1] * 6 + [2] * 11])
    with torch.no_grad():
        packed = student(long, document_ids=doc_ids).logits
        separate = torch.cat([student(long[:, a:b]).logits for a, b in ((0, 13), (13, 19), (19, 30))], 1)
    torch.testing.assert_close(packed, separate, atol=1e-4, rtol=1e-4)


def test_beam_search_reorders_the_full_heads():
    student = student_with(**MIXED)
    beams = student.generate(tokens(1, 6), max_new_tokens=5, num_beams=3, do_sample=False)
    assert beams.shape[1] <= 11 and torch.equal(beams[0, :6], tokens(1, 6)[0])


def test_cache_grows_only_by_the_kept_heads():
    student = student_with(**MIXED)  # kept: 1 KV head in layer 0 + 2 in layer 1, head_dim 16, float32
    sizes = {}
    with torch.no_grad():
        cache = student(tokens(1, 4), use_cache=True).past_key_values
        for t in range(4, 8 * SMALL["window_size"] + 1):
            student(tokens(1, 1, seed=t), past_key_values=cache, use_cache=True)
            sizes[t + 1] = cache.nbytes()
    per_token = 3 * 2 * 16 * 4 + 8  # K and V of 3 KV heads, plus the slot's position (int64)
    assert sizes[8 * SMALL["window_size"] + 1] - sizes[2 * SMALL["window_size"]] == \
        per_token * (6 * SMALL["window_size"] + 1)


def test_static_decoder_with_full_heads_matches_the_full_forward():
    student = student_with(**MIXED)
    ids = tokens(2, 30)
    with torch.no_grad():
        full = student(ids).logits
        cache = student(ids[:, :10], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="max_new_tokens"):
        StaticDecoder(student, cache, use_graph=False)
    decoder = StaticDecoder(student, cache, use_graph=False, max_new_tokens=20)
    buffers = [t.data_ptr() for t in cache.tensors()]
    steps = [decoder.step(ids[:, t:t + 1]).clone() for t in range(10, 30)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 10:], atol=1e-4, rtol=1e-4)
    assert [t.data_ptr() for t in cache.tensors()] == buffers  # fixed buffers: what a CUDA graph replays
    with pytest.raises(ValueError, match="larger max_new_tokens"):
        decoder.step(ids[:, :1])


def test_kept_heads_are_saved_and_checked(tmp_path):
    student = student_with(**MIXED)
    student.save_pretrained(tmp_path)
    loaded = xd.HybridForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.full_attention_heads == [[0, 1]] and loaded.config.full_attention_layers == [1]
    assert loaded.config.kept_kv_heads(0) == (1,) and loaded.config.kept_kv_heads(1) == (0, 1)
    ids = tokens(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits)
    with pytest.raises(ValueError, match="outside the teacher's 2 layers x 2 KV heads"):
        student_with(full_attention_heads=[[0, 2]])
    with pytest.raises(ValueError, match="outside the teacher's"):
        student_with(full_attention_layers=[2])
    with pytest.raises(ValueError, match=r"\[layer, kv_head\] pairs"):
        xd.HybridConfig(full_attention_heads=[3])
    with pytest.raises(ValueError, match="layer indices"):
        xd.HybridConfig(full_attention_layers=[-1])


def test_training_reaches_only_the_hybrid_heads_of_a_mixed_layer():
    """The kept heads of layer 0 do not use its mixer parameters: their output does not depend on them."""
    student = student_with(full_attention_heads=[[0, 0]])
    ids = tokens(1, 24)
    attn = student.model.layers[0].self_attn
    captured = {}
    attn.o_proj.register_forward_hook(lambda m, args, out: captured.__setitem__("y", args[0]))
    student(ids).logits.sum().backward()
    y = captured["y"].detach().view(1, 24, 4, 16)
    with torch.no_grad():
        attn.gate_proj.bias.add_(1.0)
        attn.q_feature_map.weight.mul_(2.0)
        student(ids)
    z = captured["y"].view(1, 24, 4, 16)
    torch.testing.assert_close(z[:, :, :2], y[:, :, :2])  # query heads 0, 1 = KV head 0's group: unchanged
    assert (z[:, :, 2:] - y[:, :, 2:]).abs().max() > 1e-4
    assert attn.gate_proj.weight.grad is not None and attn.gate_proj.weight.grad.abs().sum() > 0


def test_mixed_student_compiles_as_one_graph_with_the_eager_results():
    """The whole student with kept heads (packed documents: the document mask) is one graph under torch.compile."""
    student = student_with(**MIXED)
    ids = tokens(2, 24)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    explained = torch._dynamo.explain(student)(input_ids=ids, document_ids=doc_ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    with torch.no_grad():
        eager = student(input_ids=ids, document_ids=doc_ids).logits
        compiled = torch.compile(student, fullgraph=True)(input_ids=ids, document_ids=doc_ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
