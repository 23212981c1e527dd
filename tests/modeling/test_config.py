"""HybridConfig owns the kernel options: saved and restored with the model, validated, changed in one place; the
cache holds typed per-layer state."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import xlstm_distill as xd
from helpers import tiny_teacher
from xlstm_distill.kernels import KernelOptions
from xlstm_distill.modeling.cache import LayerCache, cache_of


def test_kernel_options_are_saved_and_restored_with_the_model(tmp_path):
    options = KernelOptions(mlstm="native", swa="native", copy_sinks="none", keep_chunk_states=False,
                            tfla_min_chunk=256, tfla_kernel_params={"siz_b_DH_parallel": 64})
    student = xd.convert(tiny_teacher(), xd.HybridConfig(window_size=8, num_sink_tokens=2, kernels=options))
    student.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["kernels"] == options.to_dict()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.kernels == options and loaded.config.backend == "native"
    assert loaded.model.layers[1].self_attn.options is loaded.config.kernels  # the layers read the config's options


def test_backend_is_a_shorthand_for_the_kernel_choices():
    assert (xd.HybridConfig(backend="tfla").kernels.mlstm, xd.HybridConfig(backend="tfla").kernels.swa) == ("tfla", "flex")
    config = xd.HybridConfig(kernels={"copy_sinks": "all"}, backend="native")
    assert (config.kernels.mlstm, config.kernels.swa, config.kernels.copy_sinks) == ("native", "native", "all")
    assert xd.HybridConfig(kernels={"mlstm": "recurrent"}).backend == "custom"
    config.backend = "auto"
    assert config.kernels == KernelOptions(copy_sinks="all")
    with pytest.raises(ValueError, match="backend='fast' is not supported"):
        xd.HybridConfig(backend="fast")
    with pytest.raises(ValueError, match="kernels: unknown key\\(s\\) copysinks"):
        xd.HybridConfig(kernels={"copysinks": "all"})


def test_changed_options_reach_every_layer_and_do_not_change_the_function():
    """Options set on the config after construction are what the next forward uses; every kernel choice computes the
    same student (native vs the recurrent reference memory)."""
    student = xd.convert(tiny_teacher(), xd.HybridConfig(window_size=8, num_sink_tokens=2, chunk_size=16))
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student(ids).logits
        student.config.kernels = student.config.kernels.replace(mlstm="recurrent")
        got = student(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_layer_cache_tensors_round_trip():
    """The typed per-layer cache lists its tensors in a fixed order and takes them back (the CUDA-graph decoder's
    static buffers); rows are selected for beam search."""
    student = xd.convert(tiny_teacher(), xd.HybridConfig(window_size=8, num_sink_tokens=2))
    cache = cache_of(student(torch.randint(3, 128, (3, 20)), use_cache=True))
    layer = cache.layers[0]
    assert isinstance(layer, LayerCache) and layer.memory.C.shape == (3, 4, 16, 16)
    assert layer.sink_k.shape == (3, 2, 2, 16) and layer.ring_k.shape == (3, 2, 8, 16)
    tensors = cache.tensors()
    assert len(tensors) == 2 * (3 + 4) + 3
    cache.set_tensors([t.clone() + 1 if t.is_floating_point() else t.clone() for t in tensors])
    torch.testing.assert_close(cache.layers[1].ring_v, tensors[13] + 1)
    cache.reorder_cache(torch.tensor([2, 0]))
    assert cache.layers[0].memory.n.shape[0] == 2 and cache.doc_length.shape == (2,)
    with pytest.raises(ValueError, match="needs the tensors of this cache's layout"):
        cache.set_tensors(tensors[:-1])
