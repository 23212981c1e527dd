"""The heads read as weights over the keys (modeling/attention_weights.py): the weights must give back what the
branches compute (the teacher's attention output, the memory's output, packed documents included), and the
attention transfer must be the cross-entropy it is documented to be."""

import pytest
import torch

import xlstm_distill as xd
from helpers import SyntheticPacks, perturb_new_parameters, tiny_teacher
from xlstm_distill.modeling import attention_weights as aw
from xlstm_distill.modeling.attention import MemorySpec, memory_and_mix
from xlstm_distill.modeling.cache import full_layout
from xlstm_distill.stages.align import capture_attention
from xlstm_distill.stages.common import teacher_forward

WINDOW, SINKS = 4, 1


def layer_input(mixer_name: str, layer: int = 1):
    teacher = tiny_teacher("llama")
    student = xd.convert(teacher, xd.HybridConfig(mixer=mixer_name, window_size=WINDOW, num_sink_tokens=SINKS,
                                                  chunk_size=8))
    perturb_new_parameters(student)
    batch = SyntheticPacks(batch_size=2, seq_len=36).make(0)  # 3 documents of 12 tokens per row
    with torch.no_grad(), capture_attention(teacher) as records:
        teacher_forward(teacher, batch)
    layout = full_layout(2, 36, torch.device("cpu"), document_ids=batch["document_ids"])
    return student.model.layers[layer].self_attn, records[layer], layout


def values(mixer, hidden):
    B, T, _ = hidden.shape
    v = mixer.project(hidden)[2].view(B, T, mixer.num_kv_heads, mixer.head_dim).transpose(1, 2)
    return v.repeat_interleave(mixer.num_heads // mixer.num_kv_heads, dim=1)  # (B, NH, T, DH)


@pytest.mark.parametrize("mixer_name", ["mlstm_swa", "linear_swa"])
def test_weights_give_back_both_branches(mixer_name):
    mixer, rec, layout = layer_input(mixer_name)
    hidden, rope = rec["input"], rec["rope"]
    queries = torch.arange(36).expand(2, 36)
    visible, _ = aw.key_masks(layout.doc_start, queries, 36, WINDOW, SINKS)
    with torch.no_grad():
        inputs = aw.head_inputs(mixer, hidden, rope)
        v = values(mixer, hidden)
        teacher = torch.exp(aw.teacher_log_weights(mixer, inputs, queries, visible))
        mixer.set_full_heads(tuple(range(mixer.num_kv_heads)))  # every head kept: the teacher's attention
        full, _ = mixer(hidden_states=hidden, position_embeddings=rope, layout=layout)
        mixer.set_full_heads(())
        torch.testing.assert_close(full, rec["output"], rtol=1e-4, atol=1e-5)
        attended = (teacher @ v).transpose(1, 2).reshape(2, 36, -1)
        torch.testing.assert_close(mixer.o_proj(attended), rec["output"], rtol=1e-4, atol=1e-5)

        memory = aw.memory_weights(mixer, inputs, queries, visible)
        B, T, _ = hidden.shape
        q, k, v_kv = mixer.project(hidden)
        gates = mixer.gate_proj(torch.cat([q, k, v_kv], dim=-1)).transpose(1, 2)
        spec = MemorySpec(mixer.num_heads, mixer.gated_memory, False, mixer.chunk_size, mixer.options)
        maps = (mixer.q_feature_map.weight, mixer.q_feature_map.bias, mixer.k_feature_map.weight,
                mixer.k_feature_map.bias)
        kv = v_kv.view(B, T, mixer.num_kv_heads, mixer.head_dim).transpose(1, 2)
        expected, _ = memory_and_mix(inputs.q, inputs.k[:, ::mixer.num_heads // mixer.num_kv_heads], kv, gates, None,
                                     maps, None, layout.reset, spec)
        torch.testing.assert_close(memory @ v, expected, rtol=1e-4, atol=1e-5)
        assert torch.all(memory.masked_select(~visible[:, None].expand_as(memory)) == 0)


def test_attention_transfer_is_the_mass_weighted_cross_entropy():
    mixer, rec, layout = layer_input("mlstm_swa")
    torch.manual_seed(0)
    queries = torch.randint(0, 36, (2, 5))
    query_weight = torch.tensor([[1.0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    head_weight = torch.tensor([1.0, 0.0, 1.0, 1.0])[:mixer.num_heads]
    inputs = aw.head_inputs(mixer, rec["input"], rec["rope"])
    loss = aw.attention_transfer_loss(mixer, inputs, layout.doc_start, queries, query_weight, head_weight)
    with torch.no_grad():
        visible, beyond = aw.key_masks(layout.doc_start, queries, 36, WINDOW, SINKS)
        teacher = torch.exp(aw.teacher_log_weights(mixer, inputs, queries, visible))
        memory = aw.memory_weights(mixer, inputs, queries, visible)
    total = norm = 0.0
    for b in range(2):
        for h in range(mixer.num_heads):
            for p in range(5):
                keys = beyond[b, p].nonzero().flatten()
                if len(keys) == 0:
                    continue
                assert keys.max() <= queries[b, p] - WINDOW  # neither the window ...
                assert keys.min() >= layout.doc_start[b, queries[b, p]] + SINKS  # ... nor the sinks nor another doc
                t, m = teacher[b, h, p, keys], memory[b, h, p, keys]
                weight = t.sum() * query_weight[b, p] * head_weight[h]
                total += weight * -(t / t.sum() * torch.log(m / m.sum())).sum()
                norm += weight
    torch.testing.assert_close(loss, total / norm, rtol=1e-4, atol=1e-6)
    loss.backward()  # the memory's parameters learn; the gate rows that only mix (output gate) get nothing
    assert mixer.q_feature_map.weight.grad.abs().sum() > 0 and mixer.k_feature_map.weight.grad.abs().sum() > 0
    H = mixer.num_heads
    assert mixer.gate_proj.weight.grad[H:2 * H].abs().sum() > 0  # forget gates
    assert mixer.gate_proj.weight.grad[2 * H:].abs().sum() == 0  # output gate
