"""End to end on the real embedded teacher (SmolLM2-135M-Instruct, CPU): about a minute."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import xlstm_distill as xd

pytestmark = pytest.mark.slow
TEXT = Path(torch.__file__).read_text()[:6000]  # real (code) text that ships everywhere


@pytest.fixture(scope="module")
def teacher():
    return xd.load_teacher("smollm2-135m")


def test_swa_with_large_window_reproduces_real_teacher(teacher):
    model, tokenizer = teacher
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :256]
    student = xd.convert(model, xd.HybridConfig(mixer="swa", window_size=512))
    with torch.no_grad():
        ref, out = model(ids).logits, student(ids).logits
    assert (ref - out).abs().max() <= 1e-3
    assert torch.equal(ref.argmax(-1), out.argmax(-1))


def test_default_student_decodes_like_its_forward_and_saves(teacher, tmp_path):
    model, tokenizer = teacher
    student = xd.convert(model, xd.HybridConfig(window_size=64))  # window < text: mLSTM and sinks matter
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :160]
    with torch.no_grad():
        full = student(ids).logits
        out = student(ids[:, :150], use_cache=True)
        steps = [out.logits] + [student(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True).logits
                                for t in range(150, 160)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-3, rtol=1e-3)

    student.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = loaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])
    assert "Paris" in text  # the prompt fits the window: the untrained student still answers like the teacher
