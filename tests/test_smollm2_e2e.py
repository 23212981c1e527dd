"""End to end on the real embedded teacher (SmolLM2-135M-Instruct, CPU): about a minute."""

import pytest
from transformers import AutoModelForCausalLM

import xlstm_distill as xd
from helpers import check_cached_decoding, check_swa_reproduces

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher():
    return xd.load_teacher("smollm2-135m")


def test_swa_with_large_window_reproduces_real_teacher(teacher):
    check_swa_reproduces(*teacher)


def test_default_student_decodes_like_its_forward_and_saves(teacher, tmp_path):
    model, tokenizer = teacher
    student = check_cached_decoding(model, tokenizer)
    student.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = loaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])
    assert "Paris" in text  # the prompt fits the window: the untrained student still answers like the teacher
