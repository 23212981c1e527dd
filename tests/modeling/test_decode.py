"""StaticDecoder (the step that CUDA graphs replay) against transformers' generate() and the full forward."""

import pytest
import torch

from xlstm_distill.modeling.decode import StaticDecoder, greedy_generate
from test_student import MIXERS, student_of, tokens


@pytest.mark.parametrize("family,policy", [("llama", "global"), ("gemma2", "global"), ("gemma3_text", "all")])
@pytest.mark.parametrize("mixer", MIXERS)
def test_greedy_generate_equals_generate(mixer, family, policy):
    student = student_of(mixer, family, convert_layers=policy)
    ids = tokens(2, 12)
    ref = student.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 12:]
    assert torch.equal(greedy_generate(student, ids, 20, use_graph=False), ref)


@pytest.mark.parametrize("family,backend", [("llama", "auto"), ("llama", "tfla"), ("gemma2", "auto")])
@pytest.mark.parametrize("compile", [False, True])
def test_static_step_logits_equal_full_forward_and_buffers_stay_fixed(compile, family, backend):
    """Step logits equal the full forward past the window; the cache keeps its buffers (what a graph needs);
    also through torch.compile (the whole step is one graph: no break), after a prefill through either backend.
    Gemma 2: two window groups in the cache (the teacher's sliding layer and the mixer's), soft-capped scores."""
    student = student_of("mlstm_swa", family, backend=backend)
    ids = tokens(2, 30)
    with torch.no_grad():
        full = student(ids).logits
        cache = student(ids[:, :10], use_cache=True).past_key_values
    if compile:
        explained = torch._dynamo.explain(StaticDecoder(student, cache, use_graph=False)._step)()
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        with torch.no_grad():
            cache = student(ids[:, :10], use_cache=True).past_key_values
    decoder = StaticDecoder(student, cache, use_graph=False, compile=compile)
    buffers = [t.data_ptr() for t in cache.tensors()]
    with torch.no_grad():  # another prompt length (its prefill may compile: FlexAttention's, backend tfla)
        other_cache = student(ids[:, :7], use_cache=True).past_key_values
    with torch._dynamo.config.patch(error_on_recompile=True):  # compiled once: every step, any prompt length
        steps = [decoder.step(ids[:, t:t + 1]).clone() for t in range(10, 30)]
        if compile:
            other = StaticDecoder(student, other_cache, compile=True)
            torch.testing.assert_close(other.step(ids[:, 7:8]), full[:, 7], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 10:], atol=1e-4, rtol=1e-4)
    assert [t.data_ptr() for t in cache.tensors()] == buffers
    assert cache.seen_tokens == 30


def test_decoder_refuses_an_empty_cache():
    from xlstm_distill.modeling.cache import HybridCache

    with pytest.raises(ValueError, match="filled cache"):
        StaticDecoder(student_of("swa"), HybridCache(2, 8, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("mixer", ["mlstm_swa", "linear_swa", "swa"])
def test_cuda_graph_replay_equals_eager(mixer, family):
    student = student_of(mixer, family).cuda()
    ids = tokens(2, 12).cuda()
    assert torch.equal(greedy_generate(student, ids, 30, use_graph=True), greedy_generate(student, ids, 30, use_graph=False))


def test_bad_arguments_are_refused():
    student = student_of("mlstm_swa")
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(student, tokens(1, 5), 0)
    with torch.no_grad():
        cache = student(tokens(1, 5), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="same count, shapes"):
        cache.set_tensors(cache.tensors()[:-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_graph_step_equals_eager():
    student = student_of("mlstm_swa").cuda()
    ids = tokens(2, 12).cuda()
    logits = []
    torch._dynamo.reset()  # other tests compiled the same step (on CPU, other models): not a recompilation here
    for compile, use_graph in ((False, False), (True, True)):
        with torch.no_grad():
            cache = student(ids, use_cache=True).past_key_values
        with torch._dynamo.config.patch(error_on_recompile=True):  # one compilation: warm-up steps, capture
            decoder = StaticDecoder(student, cache, use_graph=use_graph, compile=compile)
        logits.append(torch.stack([decoder.step(ids[:, t:t + 1]).clone() for t in range(12)]))
    assert cache.seen_tokens == 24
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
