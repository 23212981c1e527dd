"""`KernelOptions`: which implementation runs each operation of the mixer, and how (one object, owned by the model's
config: ``HybridConfig(kernels=KernelOptions(...))`` or ``kernels: {...}`` in a recipe's ``student`` section).

None of these settings changes the function a student computes (every implementation is tested against the native
one); they trade time against memory, or pick launch settings. Each default is the fastest measured setting
(docs/decisions.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from xlstm_distill.settings import from_mapping, setting

COPY_SINKS = ("rows", "all", "none")


@dataclass(frozen=True)
class KernelOptions:
    """Kernel choices and switches of a hybrid student."""

    mlstm: str = setting("auto", "mLSTM implementation: `auto` (`tfla` on CUDA when mlstm_kernels is installed, "
                                 "else `native`), `native` (PyTorch chunkwise), `tfla` (mlstm_kernels' Triton TFLA; its "
                                 "PyTorch twin on CPU), `triton` (our Triton chunkwise kernels, forward and backward, "
                                 "with the exact normalizer gradient; Triton's interpreter on CPU), `recurrent` "
                                 "(token loop; a reference). Ungated memories run `native`.")
    swa: str = setting("auto", "Sliding-window + sinks implementation: `auto` (`flex` on CUDA, else `native`), "
                               "`native` (PyTorch, query blocks), `flex` (FlexAttention; on CPU only without gradients).")
    mixer: str = setting("auto", "Whole mixer forward of a `mlstm_swa` layer (prefill, evaluation): `auto` (today: "
                                 "`native`), `native` (separate `swa` and `mlstm` kernels as chosen above), `triton` "
                                 "(one fused Triton forward: feature maps, mLSTM, window + sink attention and output "
                                 "gate; without gradients, gated memory, no cache continuation, head sizes <= 128, "
                                 "else `native`).")
    compile_memory: bool = setting(True, "On CUDA with `tfla` or `triton`: run the memory branch (feature maps, gates, "
                                         "GQA repeat) and the output-gate mix through torch.compile around the mLSTM "
                                         "kernel.")
    copy_sinks: str = setting("rows", "`flex` with gradients: where each query block reads its sinks from a copy "
                                      "placed after the keys. `rows`: rows of one document; `all`: packed rows too; "
                                      "`none`: sinks in place.")
    keep_chunk_states: bool = setting(True, "`tfla` with gradients: keep the forward's chunk states for the backward "
                                            "(faster) instead of computing them again (less memory).")
    exact_gradient: bool = setting(True, "`tfla`: differentiate the mLSTM normalizer max(|q.n|, exp(-m)) (one extra "
                                         "value column); false: mlstm_kernels' backward, which holds it constant.")
    tfla_min_chunk: int = setting(128, "`tfla` on CUDA: smallest chunk of the Triton kernel (the chunk is the next "
                                       "power of two of the model's chunk_size, at least this).")
    tfla_kernel_params: dict[str, int] = setting({}, "`tfla` on CUDA: launch settings of the Triton kernel "
                                                     "(mlstm_kernels' names, e.g. siz_b_DH_parallel); empty: its "
                                                     "heuristics.")
    flex_kernel_params: dict[str, Any] = setting({}, "`flex`: FlexAttention kernel options (e.g. fwd_BLOCK_M); "
                                                     "empty: its defaults.")
    mixer_step: str = setting("auto", "One decode step of a layer with both branches (cached generation): `auto` "
                                      "(`native` until the fused kernel is measured on the GPU), `native` (feature "
                                      "maps, mLSTM step, cached SWA and the gate mix as separate PyTorch operations), "
                                      "`triton` (all of them, for every head of the layer, in one Triton kernel; CUDA, "
                                      "no gradients).")

    def __post_init__(self) -> None:
        from xlstm_distill.kernels.registry import kernel_names  # the registry knows the implementations

        for op in ("mlstm", "swa", "mixer", "mixer_step"):
            names = ("auto", *kernel_names(op))
            if getattr(self, op) not in names:
                raise ValueError(f"kernels.{op}={getattr(self, op)!r} is not a registered implementation; "
                                 f"choose one of {', '.join(names)}.")
        if self.copy_sinks not in COPY_SINKS:
            raise ValueError(f"kernels.copy_sinks={self.copy_sinks!r}: choose one of {', '.join(COPY_SINKS)}.")
        for name in ("compile_memory", "keep_chunk_states", "exact_gradient"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"kernels.{name} must be true or false, got {getattr(self, name)!r}.")
        if not isinstance(self.tfla_min_chunk, int) or self.tfla_min_chunk < 64 or self.tfla_min_chunk & (self.tfla_min_chunk - 1):
            raise ValueError(f"kernels.tfla_min_chunk must be a power of two >= 64, got {self.tfla_min_chunk!r}.")
        for name in ("tfla_kernel_params", "flex_kernel_params"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
                raise ValueError(f"kernels.{name} must be a mapping of parameter names to values, got {value!r}.")
        # made once: torch.compile traces the model's calls, and json.dumps does not trace
        object.__setattr__(self, "_tfla_params_json", json.dumps(self.tfla_kernel_params, sort_keys=True))

    @classmethod
    def of(cls, value: KernelOptions | dict[str, Any] | None) -> KernelOptions:
        """Options from an instance, a mapping (a saved config, a recipe) or None (the defaults). Unknown keys are
        refused with the valid ones listed; values are checked against the field types."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        return from_mapping(cls, value, "kernels")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> KernelOptions:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def tfla_params_json(self) -> str:
        """The Triton launch settings as a string: what a custom operator can take as an argument."""
        return self._tfla_params_json
