"""The hybrid student: teacher equivalence, cached decoding, padding, packing, save/load, errors."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import xlstm_distill as xd
from helpers import FAMILY_EXTRAS, perturb_new_parameters, tiny_teacher

MIXERS = ["mlstm_swa", "mlstm", "swa", "linear_swa", "linear"]
SMALL = dict(window_size=8, num_sink_tokens=2, chunk_size=4)
# Gemma's interleaved sliding-window layers under both conversion policies (tests/helpers.py: a teacher window of 16)
GEMMA = [("gemma2", "global"), ("gemma2", "all"), ("gemma3_text", "global"), ("gemma3_text", "all")]
FAMILY_POLICIES = [("llama", "global"), *GEMMA]


def student_of(mixer: str, family: str = "llama", **config) -> xd.HybridForCausalLM:
    student = xd.convert(tiny_teacher(family), xd.HybridConfig(mixer=mixer, **{**SMALL, **config}))
    perturb_new_parameters(student)
    return student


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILY_EXTRAS))
def test_swa_with_large_window_reproduces_teacher(family):
    teacher = tiny_teacher(family)
    student = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=64))
    ids = tokens(2, 40)
    with torch.no_grad():
        diff = (teacher(ids).logits - student(ids).logits).abs().max()
    assert diff <= 1e-4


@pytest.mark.parametrize("family", list(FAMILY_EXTRAS))
def test_small_window_differs_from_teacher(family):
    """The equivalence above is not vacuous: a window shorter than the sequence changes the logits."""
    teacher = tiny_teacher(family)
    student = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=4, num_sink_tokens=1))
    ids = tokens(1, 40)
    with torch.no_grad():
        assert (teacher(ids).logits[:, 10:] - student(ids).logits[:, 10:]).abs().max() > 1e-2


@pytest.mark.parametrize("family,policy", [("llama", "global"), ("gemma2", "global"), ("gemma3_text", "all")])
@pytest.mark.parametrize("mixer", ["mlstm_swa", "linear_swa"])
def test_window_and_memory_student_is_exact_within_the_windows_reach(mixer, family, policy):
    """exact_within_window (the default): with trained-looking (random) gates and maps, every token whose document
    prefix the window + sinks cover has the teacher's logits, also in packed documents; beyond the reach the memory
    mixes in. Turned off, the gate mixes the memory in everywhere (the check is not vacuous)."""
    teacher = tiny_teacher(family)
    ids = tokens(1, 30)
    doc_ids = torch.tensor([[0] * 13 + [1] * 17])
    reach = SMALL["window_size"] + SMALL["num_sink_tokens"]  # in a kept teacher-window layer the teacher's own (16)
    within = [p for p in range(30) if (p if p < 13 else p - 13) < reach]
    with torch.no_grad():
        packed_teacher = torch.cat([teacher(ids[:, :13]).logits, teacher(ids[:, 13:]).logits], 1)
        diffs = {}
        for exact in (True, False):
            student = student_of(mixer, family, convert_layers=policy, exact_within_window=exact)
            diffs[exact] = (student(ids, document_ids=doc_ids).logits - packed_teacher).abs().amax(-1)[0]
    assert diffs[True][within].max() <= 1e-4
    assert diffs[False][within].max() > 1e-3
    beyond = [p for p in range(30) if p not in within]
    assert diffs[True][beyond].max() > 1e-3


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_quirks_are_not_vacuous(family):
    """The Gemma equivalence above depends on every quirk: the query scale (query_pre_attn_scalar, not the head
    dimension), Gemma 2's attention and final-logit soft-capping and the teacher's window in its sliding layers."""
    teacher = tiny_teacher(family)
    student = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=64))
    ids = tokens(1, 40)
    attn = [layer.self_attn for layer in student.model.layers]
    changes = {"scaling": [(a, "scaling", a.head_dim ** -0.5) for a in attn],
               "window": [(attn[0], "window", 64)]}
    if family == "gemma2":
        changes["softcap"] = [(a, "softcap", None) for a in attn]
        changes["final softcap"] = [(student, "final_logit_softcapping", None)]
    with torch.no_grad():
        ref = teacher(ids).logits
        assert (ref - student(ids).logits).abs().max() <= 1e-4
        for name, edits in changes.items():
            saved = [getattr(obj, attr) for obj, attr, _ in edits]
            for obj, attr, value in edits:
                setattr(obj, attr, value)
            assert (ref - student(ids).logits).abs().max() > 1e-2, name
            for (obj, attr, _), value in zip(edits, saved):
                setattr(obj, attr, value)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "olmo3"])
def test_convert_layers_policy(family):
    """``global``: the teacher's sliding-window layers keep its attention (its window, no sinks, no new parameters), so
    with a window covering the sequence the student is the teacher also past the teacher's window; ``all``: every
    layer runs the mixer and a sliding layer keeps the teacher's window where it is the larger one."""
    teacher = tiny_teacher(family)
    ids = tokens(2, 40)
    layer_types = teacher.config.layer_types
    teacher_window = teacher.config.sliding_window
    for policy in ("global", "all"):
        student = xd.convert(teacher, xd.HybridConfig(mixer="mlstm_swa", convert_layers=policy, **SMALL))
        for attn, kind in zip((layer.self_attn for layer in student.model.layers), layer_types):
            kept = policy == "global" and kind == "sliding_attention"
            assert attn.keeps_teacher_window == kept
            assert hasattr(attn, "gate_proj") == (not kept)
            expected = (teacher_window, 0) if kept else (
                (max(8, teacher_window), 2) if kind == "sliding_attention" else (8, 2))
            assert (attn.window, attn.num_sinks) == expected
    global_swa = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=64, convert_layers="global"))
    all_swa = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=64, convert_layers="all"))
    with torch.no_grad():
        ref = teacher(ids).logits
        assert (ref - global_swa(ids).logits).abs().max() <= 1e-4
        short = min(teacher_window, 40)  # inside the teacher's window both policies are the teacher
        assert (ref[:, :short] - all_swa(ids[:, :short]).logits).abs().max() <= 1e-4
        if teacher_window < 40:  # past it, `all` sees what the teacher's sliding layers do not
            assert (ref - all_swa(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("family,policy", FAMILY_POLICIES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_cached_decoding_matches_full_forward(mixer, family, policy):
    """Prefill, a multi-token chunk, then single tokens: same logits as one forward (T > window + sinks, and past the
    Gemma teachers' own window). The cache goes in under both of transformers' names (`past_key_values`, and `cache`
    since 5.24)."""
    student = student_of(mixer, family, convert_layers=policy)
    ids = tokens(2, 30)
    with torch.no_grad():
        full = student(ids).logits
    torch.testing.assert_close(cached_logits(student, ids), full, atol=1e-4, rtol=1e-4)


def cached_logits(student, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` (B, 30) through the cache: a 10-token prefill, an 11-token chunk, then single tokens (the
    cache passed under both of transformers' names)."""
    from xlstm_distill.modeling.cache import cache_of

    with torch.no_grad():
        out = student(ids[:, :10], use_cache=True)
        cache, pieces = cache_of(out), [out.logits]
        pieces.append(student(ids[:, 10:21], past_key_values=cache, use_cache=True).logits)
        for t in range(21, ids.shape[1]):
            pieces.append(student(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("family,policy", [("llama", "global"), ("gemma2", "all")])
@pytest.mark.parametrize("mixer", MIXERS)
def test_left_padded_batch_generation_equals_single(mixer, family, policy):
    student = student_of(mixer, family, convert_layers=policy)
    ids = tokens(2, 9)
    short = ids[:1, :5]
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), ids[1:]], 0)
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    kwargs = dict(max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True)
    batched = student.generate(batch, attention_mask=mask, **kwargs)
    for row, prompt, offset in ((0, short, 4), (1, ids[1:], 0)):
        single = student.generate(prompt, **kwargs)  # may stop earlier at EOS; the batch then pads that row
        n = single.sequences.shape[1]
        assert torch.equal(batched.sequences[row, offset:offset + n], single.sequences[0])
        steps = len(single.scores)
        torch.testing.assert_close(torch.stack(batched.scores[:steps])[:, row], torch.stack(single.scores)[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,policy", [("llama", "global"), ("gemma3_text", "global")])
@pytest.mark.parametrize("mixer", MIXERS)
def test_packed_documents_are_independent(mixer, family, policy):
    """document_ids: a packed row gives the same logits as its documents run one by one."""
    student = student_of(mixer, family, convert_layers=policy)
    ids = tokens(1, 30)
    doc_ids = torch.tensor([[0] * 13 + [1] * 6 + [2] * 11])
    with torch.no_grad():
        packed = student(ids, document_ids=doc_ids).logits
        separate = torch.cat([student(ids[:, a:b]).logits for a, b in ((0, 13), (13, 19), (19, 30))], 1)
    torch.testing.assert_close(packed, separate, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mixer", ["mlstm_swa", "swa"])
def test_sampling_and_beam_search_run(mixer):
    student = student_of(mixer)
    torch.manual_seed(0)
    out = student.generate(tokens(2, 6), max_new_tokens=5, do_sample=True, top_k=20)
    assert out.shape == (2, 11)
    beams = student.generate(tokens(1, 6), max_new_tokens=5, num_beams=3, do_sample=False)
    assert beams.shape[1] <= 11 and torch.equal(beams[0, :6], tokens(1, 6)[0])


@pytest.mark.parametrize("mixer", MIXERS)
def test_cache_memory_is_constant(mixer):
    student = student_of(mixer)
    sizes = []
    with torch.no_grad():
        cache = student(tokens(1, 4), use_cache=True).past_key_values
        for t in range(4, 8 * SMALL["window_size"] + 1):
            student(tokens(1, 1, seed=t), past_key_values=cache, use_cache=True)
            if t in (2 * SMALL["window_size"], 8 * SMALL["window_size"]):
                sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] > 0


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo3", "gemma2", "gemma3_text"])
def test_save_load_round_trip(tmp_path, family):
    student = student_of("mlstm_swa", family)
    student.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).mixer == "mlstm_swa"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, xd.HybridForCausalLM)
    ids = tokens(2, 20)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, loaded(ids).logits)


def test_loading_in_bfloat16_casts_every_parameter(tmp_path):
    # the teacher's layers are built from its own config, which records the dtype it was saved in (float32)
    student = student_of("mlstm_swa")
    student.config.teacher_config["dtype"] = "float32"
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert loaded(tokens(1, 20)).logits.dtype == torch.bfloat16


def test_tied_embeddings_survive_save_load(tmp_path):
    teacher = tiny_teacher("llama", tie_word_embeddings=True)
    student = xd.convert(teacher, xd.HybridConfig(**SMALL))
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, student.lm_head.weight)


def test_teacher_weights_are_reused_and_gates_start_near_swa():
    teacher = tiny_teacher("llama")
    student = xd.convert(teacher, xd.HybridConfig(**SMALL))
    attn = student.model.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    o_bias = attn.gate_proj.bias[-attn.num_heads:]
    assert torch.sigmoid(o_bias).max() < 0.1  # output gate starts on the SWA branch
    # per layer: q and k feature maps (weight, bias) and the gate projection (weight, bias)
    assert len(student.new_parameter_names()) == 2 * 6
    assert not any(name in dict(teacher.named_parameters()) for name in student.new_parameter_names())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_map_matches_reference(dtype):
    """The batched feature map (values and gradients) against the per-head formula in float32:
    phi(x)_h = softmax(x_h W_h + b_h), on a transposed (non-contiguous) batch of two rows."""
    from xlstm_distill.modeling.attention import FeatureMap

    torch.manual_seed(0)
    fmap = FeatureMap(num_heads=3, head_dim=8, feature_dim=6)
    with torch.no_grad():
        fmap.weight.normal_()
        fmap.bias.normal_()
    x = torch.randn(2, 5, 3, 8).transpose(1, 2)  # (B, NH, T, DH), as the attention's view of its projections
    x_low = x.to(dtype).requires_grad_()
    fmap = fmap.to(dtype)
    out = fmap(x_low)
    ref = torch.stack([torch.softmax(x_low.float()[:, h] @ fmap.weight.float()[h] + fmap.bias.float()[h], -1)
                       for h in range(3)], dim=1)
    tol = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    torch.testing.assert_close(out.float(), ref, **tol)
    grad = torch.randn_like(ref)
    inputs = (x_low, fmap.weight, fmap.bias)  # the weights' gradients are summed over the batch rows
    for d_out, d_ref in zip(torch.autograd.grad(out.float(), inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(d_out.float(), d_ref.float(), **tol)


def test_larger_feature_map_starts_as_copies_of_the_identity():
    """feature_dim = 4 x head_dim: phi(q).phi(k) starts near a quarter of the head-dim map's softmax(q).softmax(k)
    (so the normalized memory reads the same weights), and the copies differ, so their gradients differ too."""
    from xlstm_distill.modeling.attention import FeatureMap

    torch.manual_seed(0)
    small, large = FeatureMap(2, 16, 16), FeatureMap(2, 16, 64)
    q, k = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    kernel_small = small(q) @ small(k).transpose(-1, -2)  # (1, NH, T, T)
    kernel_large = large(q) @ large(k).transpose(-1, -2)
    torch.testing.assert_close(4 * kernel_large, kernel_small, rtol=0.1, atol=0)
    copies = large.weight.view(2, 16, 4, 16)
    assert (copies[:, :, 0] - copies[:, :, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("mixer", ["mlstm_swa", "linear_swa"])
def test_forward_under_autocast_matches_float32(mixer):
    """The stages train under bf16 autocast on CUDA: there q leaves RoPE in float32 while the branches are bf16.
    The same mixing on CPU autocast, against the float32 forward."""
    student = xd.convert(tiny_teacher("llama"), xd.HybridConfig(**SMALL, mixer=mixer))
    perturb_new_parameters(student)
    ids = torch.randint(0, student.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = student(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = student(ids).logits
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)


def test_forget_gate_bias_is_configurable_and_saved(tmp_path):
    """forget_gate_bias sets the initial forget biases, linearly over the heads, and survives save / load."""
    student = xd.convert(tiny_teacher("llama"), xd.HybridConfig(**{**SMALL, "forget_gate_bias": (6, 9)}))
    attn = student.model.layers[0].self_attn
    H = attn.num_heads
    torch.testing.assert_close(attn.gate_proj.bias[H:2 * H].detach(), torch.linspace(6.0, 9.0, H))
    student.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).forget_gate_bias == [6.0, 9.0]
    default = xd.convert(tiny_teacher("llama"), xd.HybridConfig(**SMALL)).model.layers[0].self_attn
    torch.testing.assert_close(default.gate_proj.bias[H:2 * H].detach(), torch.linspace(3.0, 6.0, H))


def test_multimodal_gemma3_converts_its_text_part():
    """A Gemma 3 checkpoint with a vision tower: the student is built from its language model and LM head, and on text
    it reproduces the checkpoint (swa, window covering the sequence)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from helpers import FAMILY_EXTRAS, TINY

    torch.manual_seed(0)
    text = {**TINY, **FAMILY_EXTRAS["gemma3_text"]}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=127,
                          boi_token_index=125, eoi_token_index=126)
    teacher = Gemma3ForConditionalGeneration(config).eval()
    student = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=64))
    assert student.config.teacher_config["model_type"] == "gemma3_text"
    ids = tokens(2, 40)
    with torch.no_grad():
        assert (teacher(input_ids=ids).logits - student(ids).logits).abs().max() <= 1e-4


def test_unsupported_architecture_is_refused():
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(xd.UnsupportedArchitectureError, match="gpt2.*Supported families: .*llama"):
        xd.convert(teacher)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mixer="mamba"), "mixer='mamba' is not supported"),
    (dict(window_size=0), "window_size must be an integer >= 1"),
    (dict(num_sink_tokens=-1), "num_sink_tokens must be"),
    (dict(backend="cuda-magic"), "backend='cuda-magic' is not supported"),
    (dict(forget_gate_bias=[6.0, 3.0]), "forget_gate_bias must be two numbers"),
    (dict(forget_gate_bias=[3.0]), "forget_gate_bias must be two numbers"),
    (dict(forget_gate_bias=3.0), "forget_gate_bias must be two numbers"),
    (dict(forget_gate_bias=[float("nan"), 1.0]), "forget_gate_bias must be two numbers"),
    (dict(convert_layers="sliding"), "convert_layers='sliding' is not supported"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        xd.HybridConfig(**kwargs)


def test_bad_forward_inputs_are_refused():
    student = student_of("mlstm_swa")
    ids = tokens(2, 6)
    right_padded = torch.ones_like(ids)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        student(ids, attention_mask=right_padded, use_cache=True)
    cache = student(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="only supported in the first forward"):
        student(ids[:, :1], past_key_values=cache, document_ids=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="Expected a \\(2, 6\\) mask"):
        student(ids, document_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        student()


@pytest.mark.parametrize("mixer,backend", [("mlstm_swa", "tfla"), ("mlstm_swa", "triton"), ("linear_swa", "auto"),
                                           ("swa", "auto")])
def test_student_compiles_as_one_graph_with_the_eager_results(mixer, backend):
    """A user's torch.compile(model, fullgraph=True) of the student (mlstm_swa with backend 'tfla' or 'triton': the
    TFLA or Triton mLSTM as custom operators, the latter in Triton's interpreter, FlexAttention without gradients; the
    two baselines' native kernels): no graph break, and the
    logits (packed documents too) and a training step's gradients equal eager's. CPU, backend aot_eager: dynamo's
    graph, the operators' fake shapes and strides and AOT autograd are checked; inductor's kernels run in the CUDA
    tests."""
    torch._dynamo.reset()
    teacher = tiny_teacher(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    model = xd.convert(teacher, xd.HybridConfig(mixer=mixer, window_size=16, num_sink_tokens=2, backend=backend))
    perturb_new_parameters(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(3, 100, (2, 48), generator=torch.Generator().manual_seed(0))
    docs = torch.zeros_like(ids)
    docs[1, 20:] = 1
    with torch.no_grad():
        for kwargs in ({}, {"document_ids": docs}):
            torch.testing.assert_close(compiled(ids, **kwargs).logits, model(ids, **kwargs).logits)
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        fn(ids, document_ids=docs).logits.logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
