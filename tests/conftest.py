"""Settings shared by every test module."""

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU): the same kernel code, tested against the
# native references. Set before any kernel is compiled; the kernel modules import Triton only when first used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
