"""xlstm-distill: turn a pretrained Transformer LLM into a hybrid mLSTM + sliding-window-attention student."""

import logging

import torch


class _TorchaoImportNotices(logging.Filter):
    """torchao (installed for ``optimizer: adamw8bit``; transformers imports it when present) logs at import that its
    CUDA extensions do not load on a CPU build of torch, and newer torch releases log a deprecation for each enum it
    registers with torch.compile. Neither concerns a user of this package; only those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cuda_extension = torch.version.cuda is None and message.startswith("Failed to load ")
        return not (cuda_extension or "is an Enum subclass and is now natively supported by torch.compile" in message)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_TorchaoImportNotices())

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
