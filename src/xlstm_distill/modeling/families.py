"""Teacher families the student can be built from, with the quirks of their attention layers."""

from __future__ import annotations

from typing import Literal

QKNorm = Literal["none", "head", "full"]

# model_type -> how the family normalizes q and k before RoPE:
#   none: no q/k norm (Llama, Mistral, Qwen2/2.5; Qwen2 also has q/k/v biases, handled by reusing its Linear layers)
#   head: RMSNorm over each head's dimension (Qwen3)
#   full: RMSNorm over the whole projection (OLMo2, OLMo3; these are also post-norm blocks, handled by the
#         teacher's own decoder layer, which the student reuses)
SUPPORTED_FAMILIES: dict[str, QKNorm] = {
    "llama": "none",
    "mistral": "none",
    "qwen2": "none",
    "qwen3": "head",
    "olmo2": "full",
    "olmo3": "full",
}


class UnsupportedArchitectureError(ValueError):
    """The teacher's architecture is not one the student can be built from."""


def qk_norm_of(model_type: str) -> QKNorm:
    """The q/k normalization of a supported family; a clear error for anything else."""
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedArchitectureError(
            f"Teacher architecture '{model_type}' is not supported. Supported families: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))} (SmolLM2 is a Llama). Open an issue to request another."
        )
    return SUPPORTED_FAMILIES[model_type]
