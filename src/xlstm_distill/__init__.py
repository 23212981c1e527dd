"""xlstm-distill: turn a pretrained Transformer LLM into a hybrid mLSTM + sliding-window-attention student."""

from xlstm_distill.modeling import (
    SUPPORTED_FAMILIES,
    HybridCache,
    HybridConfig,
    HybridForCausalLM,
    UnsupportedArchitectureError,
    convert,
)
from xlstm_distill.teacher import load_teacher

__all__ = [
    "SUPPORTED_FAMILIES",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "UnsupportedArchitectureError",
    "convert",
    "load_teacher",
]
