"""Teacher families the student can be built from, with the quirks of their attention layers."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import PreTrainedConfig, PreTrainedModel

QKNorm = Literal["none", "head", "full"]

# model_type -> how the family normalizes q and k before RoPE:
#   none: no q/k norm (Llama, Mistral, Qwen2/2.5; Qwen2 also has q/k/v biases, handled by reusing its Linear layers)
#   head: RMSNorm over each head's dimension (Qwen3)
#   full: RMSNorm over the whole projection (OLMo2, OLMo3; these are also post-norm blocks, handled by the
#         teacher's own decoder layer, which the student reuses)
# Gemma 2 (no q/k norm) and Gemma 3 (per-head q/k norm) bring more quirks, each handled where it lives: scaled
# embeddings, (1 + weight) RMSNorms and the extra pre/post feed-forward norms are in the teacher's own embedding and
# decoder-layer modules, which the student reuses; the query scale (query_pre_attn_scalar) and attention-logit
# soft-capping are read by the student's attention from the teacher's; per-layer-type RoPE bases come from the
# teacher's rotary module; final-logit soft-capping is applied by the student's head; interleaved sliding-window
# layers follow HybridConfig.convert_layers. A multimodal Gemma 3 checkpoint (model_type gemma3) is converted from its
# text part (text_part below).
SUPPORTED_FAMILIES: dict[str, QKNorm] = {
    "llama": "none",
    "mistral": "none",
    "qwen2": "none",
    "qwen3": "head",
    "olmo2": "full",
    "olmo3": "full",
    "gemma2": "none",
    "gemma3_text": "head",
}
# multimodal checkpoints whose language model the student is built from: model_type -> its text model_type
MULTIMODAL_TEXT = {"gemma3": "gemma3_text"}


class UnsupportedArchitectureError(ValueError):
    """The teacher's architecture is not one the student can be built from."""


def qk_norm_of(model_type: str) -> QKNorm:
    """The q/k normalization of a supported family; a clear error for anything else."""
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedArchitectureError(
            f"Teacher architecture '{model_type}' is not supported. Supported families: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))} (SmolLM2 is a Llama; gemma3 checkpoints are converted from their "
            f"text part). Open an issue to request another."
        )
    return SUPPORTED_FAMILIES[model_type]


def text_part(teacher: PreTrainedModel) -> tuple[PreTrainedConfig, dict[str, torch.Tensor]]:
    """The config and state dict of the causal language model inside ``teacher``: the teacher's own for a text model,
    the language model and LM head of a multimodal checkpoint (Gemma 3: ``model.language_model.*`` becomes
    ``model.*``; the vision tower and projector are left out)."""
    config = teacher.config
    if config.model_type not in MULTIMODAL_TEXT:
        qk_norm_of(config.model_type)
        return config, teacher.state_dict()
    text = config.get_text_config()
    if text.model_type != MULTIMODAL_TEXT[config.model_type]:
        raise UnsupportedArchitectureError(f"The text part of this {config.model_type} checkpoint is a "
                                           f"'{text.model_type}', expected '{MULTIMODAL_TEXT[config.model_type]}'.")
    state = {f"model.{name}": tensor for name, tensor in teacher.model.language_model.state_dict().items()}
    state["lm_head.weight"] = teacher.lm_head.weight
    return text, state
