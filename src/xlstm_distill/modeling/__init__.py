"""The hybrid student model (importing this registers it with transformers' Auto classes)."""

from xlstm_distill.modeling.cache import HybridCache
from xlstm_distill.modeling.configuration import HybridConfig
from xlstm_distill.modeling.families import SUPPORTED_FAMILIES, UnsupportedArchitectureError
from xlstm_distill.modeling.student import HybridForCausalLM, convert

__all__ = ["SUPPORTED_FAMILIES", "HybridCache", "HybridConfig", "HybridForCausalLM", "UnsupportedArchitectureError", "convert"]
