"""Shared fixtures: tiny random teachers of every supported family."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoConfig

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)
FAMILY_EXTRAS = {
    "llama": {},
    "mistral": {"sliding_window": 4096},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "olmo2": {},
    "olmo3": {"sliding_window": 4096, "layer_types": ["sliding_attention", "full_attention"]},
}


def tiny_teacher(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A small random teacher of the given family, in eval mode, with sharp (non-tied) logits."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY, **FAMILY_EXTRAS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # large logit margins: greedy decoding is not decided by rounding noise
        model.lm_head.weight.mul_(20.0)
    return model


def perturb_new_parameters(student: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    """Give the new mixer parameters random values, so that tests exercise non-trivial gates and maps."""
    g = torch.Generator().manual_seed(seed)
    names = set(student.new_parameter_names())
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name in names:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def llama_teacher():
    return tiny_teacher("llama")
