"""End to end on the real Gemma 3 270M base teacher (GGUF from PyPI, CPU): interleaved sliding-window layers, per-head
q/k norms, per-layer-type RoPE, scaled embeddings; about two minutes, most of it loading the GGUF."""

import pytest
import torch

import xlstm_distill as xd
from helpers import check_cached_decoding, check_swa_reproduces

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher():
    return xd.load_teacher("gemma3-270m")


def test_loads_the_gemma3_base_model(teacher):
    model, tokenizer = teacher
    assert model.config.model_type == "gemma3_text" and model.config.sliding_window == 512
    assert tokenizer.chat_template is None and tokenizer.pad_token is not None
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "capital" in tokenizer.decode(out[0, ids.shape[1]:])  # "... is the capital of the country ..."


def test_swa_with_large_window_reproduces_real_teacher(teacher):
    check_swa_reproduces(*teacher)  # the 3 global layers converted, the 15 sliding-window layers the teacher's


def test_default_student_decodes_like_its_forward(teacher):
    check_cached_decoding(*teacher)
