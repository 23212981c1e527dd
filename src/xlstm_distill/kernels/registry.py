"""The kernel registry: implementations of each operation by name, and the one place that picks one for a device.

Operations (every implementation of one takes the same arguments; see ``xlstm_distill.kernels.ops``):

    mlstm        chunkwise / parallel mLSTM over a sequence (training, prefill)      native, tfla, triton, recurrent
    mlstm_step   one recurrent decoding step                                          native
    swa          sliding window + sinks over a sequence (training, prefill)          native, flex
    swa_cached   sliding window + sinks of a few new tokens over cached keys          native
    mixer        the whole mixer forward (swa + feature maps + mlstm + output gate)  native, triton
    mixer_step   one decoding step of the whole mixer (memory, SWA, output-gate mix)  native, triton

Implementations register themselves with :func:`register_kernel` when their module is imported (the package's
``__init__`` imports them all); :func:`choose_kernel` resolves ``auto`` and the device rules of
:class:`~xlstm_distill.kernels.options.KernelOptions`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from xlstm_distill.kernels.options import KernelOptions

logger = logging.getLogger(__name__)

OPERATIONS = ("mlstm", "mlstm_step", "swa", "swa_cached", "mixer", "mixer_step")
_REGISTRY: dict[str, dict[str, Callable]] = {op: {} for op in OPERATIONS}
MIXER_MAX_HEAD_DIM = 128  # the fused mixer's largest head / feature size (shared memory of its tiles)
# a constant: torch.compile does not trace find_spec
MLSTM_KERNELS_AVAILABLE = importlib.util.find_spec("mlstm_kernels") is not None


def register_kernel(op: str, name: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the implementation ``name`` of operation ``op``."""
    if op not in _REGISTRY:
        raise ValueError(f"Unknown kernel operation {op!r}; operations: {', '.join(OPERATIONS)}.")

    def add(fn: Callable) -> Callable:
        _REGISTRY[op][name] = fn
        return fn

    return add


def kernel_names(op: str) -> tuple[str, ...]:
    """The registered implementations of ``op``."""
    return tuple(_REGISTRY[op])


def get_kernel(op: str, name: str) -> Callable:
    """The implementation ``name`` of operation ``op`` (a clear error for an unknown one)."""
    if op not in _REGISTRY:
        raise ValueError(f"Unknown kernel operation {op!r}; operations: {', '.join(OPERATIONS)}.")
    if name not in _REGISTRY[op]:
        raise ValueError(f"No {op} kernel named {name!r}; registered: {', '.join(_REGISTRY[op])}.")
    return _REGISTRY[op][name]


def choose_kernel(op: str, options: KernelOptions, device: torch.device, *, gated: bool = True,
                  needs_grad: bool = False, continues_cache: bool = False, head_dim: int = 0) -> str:
    """The implementation that runs ``op`` on ``device`` under ``options``:

    - ``mlstm``: ``auto`` is ``tfla`` on CUDA when mlstm_kernels is installed, else ``native``; an ungated memory
      (plain linear attention, ``gated=False``) always runs ``native`` unless ``recurrent`` is asked for (TFLA and
      ``triton`` have only the mLSTM's gates and normalizer). ``auto`` stays ``tfla``: on an H200 ``triton`` is slower
      in the forward and faster in forward + backward, and the whole training step with it is unmeasured
      (docs/decisions.md).
    - ``swa``: ``auto`` is ``flex`` on CUDA, else ``native``; ``flex`` on CPU runs only without gradients
      (FlexAttention has no CPU backward), ``native`` otherwise.
    - ``mlstm_step``, ``swa_cached``: ``native`` (the decode step is compiled and graphed as a whole).
    - ``mixer`` (the whole mixer forward of a ``mlstm_swa`` layer): ``auto`` is ``native`` (the model keeps its
      separate ``swa`` and ``mlstm`` calls: on an H200 the fused kernel is slower on one document per row,
      docs/decisions.md); ``triton`` runs only
      without gradients (forward only), for the gated mLSTM (an ungated memory: ``native``), for a forward that does
      not continue a cache (prefill from empty; continuing a cache and decode steps: ``native``), for head and
      feature sizes up to 128 (``head_dim``: the larger; tiles of 256 need more than an H200's shared memory), and
      on CUDA or in Triton's interpreter (``TRITON_INTERPRET=1``; elsewhere ``native``). The model reads ``native``
      as "today's path"; the registered ``native`` implementation is the PyTorch reference.
    - ``mixer_step``: ``auto`` is ``native`` (the unfused step) until the fused kernel is timed against it
      on one device (docs/decisions.md); ``triton`` runs on CUDA, on CPU only in Triton's interpreter (``TRITON_INTERPRET=1``),
      and never with gradients (it has no backward): ``native`` otherwise.
    """
    cuda = device.type == "cuda"
    if op == "mlstm":
        name = options.mlstm
        if name == "auto":
            name = "tfla" if cuda and MLSTM_KERNELS_AVAILABLE else "native"
            if cuda and not MLSTM_KERNELS_AVAILABLE and not torch.compiler.is_compiling():
                _log_once("kernels.mlstm='auto': mlstm_kernels is not installed, the mLSTM runs on the native kernel "
                          "(pip install 'xlstm-distill[gpu]').")
        if name in ("tfla", "triton") and not gated:
            name = "native"
        if name == "tfla" and not MLSTM_KERNELS_AVAILABLE:
            raise ImportError("kernels.mlstm='tfla' needs mlstm_kernels: pip install 'xlstm-distill[gpu]' "
                              "(or use 'native').")
        return name
    if op == "swa":
        name = options.swa
        if name == "auto":
            name = "flex" if cuda else "native"
        if name == "flex" and not cuda and needs_grad:
            name = "native"
        return name
    if op in ("mlstm_step", "swa_cached"):
        return "native"
    if op == "mixer":
        name = "native" if options.mixer == "auto" else options.mixer
        if name == "triton" and (needs_grad or not gated or continues_cache or head_dim > MIXER_MAX_HEAD_DIM
                                 or not (cuda or _triton_interpreter())):
            name = "native"
        return name
    if op == "mixer_step":
        name = options.mixer_step
        if name == "auto":
            name = "native"  # to switch on: "triton" if cuda else "native"
        if name == "triton" and not (cuda or _triton_interpreter()):
            if not torch.compiler.is_compiling():
                _log_once("kernels.mixer_step='triton' runs on CUDA (on CPU only in Triton's interpreter, "
                          "TRITON_INTERPRET=1): the decode step runs the native kernels.")
            name = "native"
        if name == "triton" and needs_grad:
            name = "native"
        return name
    raise ValueError(f"Unknown kernel operation {op!r}; operations: {', '.join(OPERATIONS)}.")


def _triton_interpreter() -> bool:
    """Triton kernels run on CPU tensors in Triton's interpreter (the tests set it without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)
