"""`HybridConfig`: the single source of truth for a hybrid xLSTM student (teacher architecture + mixer settings)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from transformers import AutoConfig, PreTrainedConfig

from xlstm_distill.kernels.options import KernelOptions

MIXERS = ("mlstm_swa", "mlstm", "swa", "linear_swa", "linear")
# which layers of a teacher with interleaved sliding-window and global layers (Gemma 2/3, OLMo3) run the mixer
CONVERT_LAYERS = ("global", "all")
# ``backend`` is a shorthand for the two kernel choices of ``kernels`` (mLSTM, SWA)
BACKENDS = {"auto": ("auto", "auto"), "native": ("native", "native"), "tfla": ("tfla", "flex"),
            "triton": ("triton", "flex")}
# The student's own settings (everything except the teacher architecture).
MIXER_FIELDS = ("mixer", "window_size", "num_sink_tokens", "exact_within_window", "convert_layers", "feature_dim",
                "chunk_size", "forget_gate_bias", "kernels", "full_attention_layers", "full_attention_heads")
# Attributes mirrored from the teacher config so that generation utilities find them on the student config.
MIRRORED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)


class LayerWindow(NamedTuple):
    """The sliding window of one student layer."""

    window: int  # a query sees itself and the window - 1 tokens before it
    num_sinks: int  # first tokens of the document visible to every later query
    teacher: bool  # the layer keeps the teacher's own sliding-window attention (no mixer, no new parameters)


class HybridConfig(PreTrainedConfig):
    """Configuration of a hybrid student.

    Args:
        mixer: sequence mixer that replaces every attention layer: ``mlstm_swa`` (mLSTM + sliding window with
            sinks, mixed by a per-head output gate; the paper's student), ``mlstm``, ``swa``, ``linear_swa``
            (LoLCATs-style linear attention + window) or ``linear``.
        window_size: sliding-window length W (a query sees itself and the W - 1 tokens before it).
        num_sink_tokens: first tokens of every document that stay visible to all later queries.
        exact_within_window: mixers with a window and a memory (``mlstm_swa``, ``linear_swa``): a token whose whole
            document prefix lies inside the window's reach (position < window_size + num_sink_tokens) takes the
            window branch alone (output gate 0), which there is exactly the teacher's attention; the learned gate
            mixes the memory in only beyond the reach. False: the gate mixes at every position.
        convert_layers: for a teacher that interleaves sliding-window and global attention layers (Gemma 2, Gemma 3,
            OLMo3): ``global`` (default) replaces only the global layers by the mixer, the sliding-window layers keep
            the teacher's own sliding-window attention exactly (their cache is a ring buffer of the teacher's
            window, constant in the context); ``all`` replaces every layer, and a sliding-window layer's window is
            the teacher's where that is larger than ``window_size``. Other teachers: every layer runs the mixer.
        feature_dim: output size of the per-head feature map phi (default: the teacher's head dimension).
        chunk_size: chunk length of the native chunkwise mLSTM kernel (TFLA on CUDA uses the next power of two,
            at least 128).
        forget_gate_bias: initial forget-gate biases of the mLSTM mixers, spread linearly over the heads from the
            first value to the second (default 3..6: sigmoid 0.95..0.998, memories of about 20 to 400 tokens).
        full_attention_layers: layers that keep the teacher's full softmax attention in every head.
        full_attention_heads: ``[layer, kv_head]`` pairs: KV heads (with the query heads of their GQA group) that
            keep the teacher's full softmax attention over the whole prefix (their keys and values are cached in
            full); every other head runs ``mixer``. ``xlstm-distill select-heads`` chooses them by measurement.
        kernels: which implementation runs each kernel and how (:class:`~xlstm_distill.kernels.KernelOptions`, or a
            mapping of its fields); saved with the model.
        backend: shorthand for the kernel choices, applied over ``kernels``: ``auto`` (on CUDA: FlexAttention, and
            TFLA when `mlstm_kernels` is installed; native PyTorch elsewhere), ``native`` (pure PyTorch, CPU or GPU),
            ``tfla`` (mLSTM through `mlstm_kernels`: Triton TFLA on CUDA, its PyTorch twin on CPU; SWA through
            FlexAttention; needs ``pip install 'xlstm-distill[gpu]'``) or ``triton`` (mLSTM on our Triton kernels
            with the exact normalizer gradient, CUDA; SWA through FlexAttention).
        teacher_config: the teacher's ``config.to_dict()``; filled in by :func:`xlstm_distill.convert`.
        teacher_name: where the teacher came from (hub id, folder, GGUF or embedded name).
    """

    model_type = "xlstm_hybrid"

    def __init__(
        self,
        mixer: str = "mlstm_swa",
        window_size: int = 512,
        num_sink_tokens: int = 4,
        exact_within_window: bool = True,
        convert_layers: str = "global",
        feature_dim: int | None = None,
        chunk_size: int = 64,
        forget_gate_bias: tuple[float, float] | list[float] = (3.0, 6.0),
        kernels: KernelOptions | dict[str, Any] | None = None,
        full_attention_layers: list[int] | tuple[int, ...] = (),
        full_attention_heads: list[list[int]] | tuple[tuple[int, int], ...] = (),
        backend: str | None = None,
        teacher_config: dict[str, Any] | None = None,
        teacher_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if mixer not in MIXERS:
            raise ValueError(f"mixer={mixer!r} is not supported; choose one of {', '.join(MIXERS)}.")
        if convert_layers not in CONVERT_LAYERS:
            raise ValueError(f"convert_layers={convert_layers!r} is not supported; choose one of "
                             f"{', '.join(CONVERT_LAYERS)}.")
        kernels = KernelOptions.of(kernels)
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(f"backend={backend!r} is not supported; choose one of {', '.join(BACKENDS)}.")
            kernels = kernels.replace(mlstm=BACKENDS[backend][0], swa=BACKENDS[backend][1])
        if not isinstance(exact_within_window, bool):
            raise ValueError(f"exact_within_window must be true or false, got {exact_within_window!r}.")
        for name, value, low in (("window_size", window_size, 1), ("num_sink_tokens", num_sink_tokens, 0),
                                 ("chunk_size", chunk_size, 1), ("feature_dim", feature_dim or 1, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if (not isinstance(forget_gate_bias, (list, tuple)) or len(forget_gate_bias) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                           for b in forget_gate_bias) or forget_gate_bias[0] > forget_gate_bias[1]):
            raise ValueError(f"forget_gate_bias must be two numbers [first head, last head] with first <= last, "
                             f"got {forget_gate_bias!r}.")
        self.mixer = mixer
        self.window_size = window_size
        self.num_sink_tokens = num_sink_tokens
        self.exact_within_window = exact_within_window
        self.convert_layers = convert_layers
        self.feature_dim = feature_dim
        self.chunk_size = chunk_size
        self.forget_gate_bias = [float(b) for b in forget_gate_bias]
        self.kernels = kernels
        self.teacher_config = teacher_config
        self.teacher_name = teacher_name
        if teacher_config is not None:
            for key in MIRRORED:
                if key in teacher_config and key not in kwargs:
                    kwargs[key] = teacher_config[key]
            kwargs.setdefault("tie_word_embeddings", teacher_config.get("tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.set_full_attention(full_attention_heads, full_attention_layers)

    def set_full_attention(self, heads: Any = (), layers: Any = ()) -> None:
        """Record the ``[layer, kv_head]`` pairs and whole layers that keep full attention (validated, sorted, without
        repeats); with a teacher config, entries outside the teacher are refused."""
        self.full_attention_layers = sorted(set(_check_layers(layers)))
        self.full_attention_heads = [list(p) for p in sorted(set(_check_heads(heads)))]
        if self.teacher_config is None:
            return
        layers, kv_heads = self.teacher_config.get("num_hidden_layers"), self._teacher_kv_heads()
        bad = [i for i in self.full_attention_layers if layers is not None and i >= layers]
        bad += [(l, h) for l, h in self.full_attention_heads
                if (layers is not None and l >= layers) or (kv_heads is not None and h >= kv_heads)]
        if bad:
            raise ValueError(f"full_attention_layers / full_attention_heads name {bad}, outside the teacher's "
                             f"{layers} layers x {kv_heads} KV heads: layers count 0..{layers - 1}, KV heads "
                             f"0..{kv_heads - 1}.")

    def _teacher_kv_heads(self) -> int | None:
        return self.teacher_config.get("num_key_value_heads") or self.teacher_config.get("num_attention_heads")

    def kept_kv_heads(self, layer: int) -> tuple[int, ...]:
        """The KV heads of ``layer`` that keep full attention (every head for a layer in full_attention_layers)."""
        if layer in self.full_attention_layers:
            return tuple(range(self._teacher_kv_heads()))
        return tuple(h for l, h in self.full_attention_heads if l == layer)

    def teacher_window(self, layer: int) -> int | None:
        """The teacher's own sliding window in ``layer`` (None: a global layer, or a teacher without interleaved
        sliding-window layers; read from the teacher config's ``layer_types`` and ``sliding_window``)."""
        if self.teacher_config is None:
            raise ValueError("This HybridConfig has no teacher_config: build students with xlstm_distill.convert().")
        layer_types = self.teacher_config.get("layer_types")
        if layer_types and layer_types[layer] == "sliding_attention":
            return self.teacher_config.get("sliding_window")
        return None

    def layer_window(self, layer: int) -> LayerWindow:
        """The sliding window of ``layer``: the student's (``window_size``, ``num_sink_tokens``), except in the teacher's
        sliding-window layers (``convert_layers``)."""
        teacher = self.teacher_window(layer)
        if teacher is None:
            return LayerWindow(self.window_size, self.num_sink_tokens, teacher=False)
        if self.convert_layers == "global":
            return LayerWindow(teacher, 0, teacher=True)
        return LayerWindow(max(self.window_size, teacher), self.num_sink_tokens, teacher=False)

    @property
    def keeps_full_attention(self) -> bool:
        """Whether any head keeps full attention (then the cache grows with the context for those heads)."""
        return bool(self.full_attention_layers or self.full_attention_heads)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["kernels"] = self.kernels.to_dict()
        return out

    @property
    def backend(self) -> str:
        """The ``backend`` shorthand that the kernel choices correspond to (``custom`` if none does)."""
        pair = (self.kernels.mlstm, self.kernels.swa)
        return next((name for name, choice in BACKENDS.items() if choice == pair), "custom")

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend={value!r} is not supported; choose one of {', '.join(BACKENDS)}.")
        self.kernels = self.kernels.replace(mlstm=BACKENDS[value][0], swa=BACKENDS[value][1])

    @property
    def uses_swa(self) -> bool:
        return self.mixer in ("mlstm_swa", "swa", "linear_swa")

    @property
    def window_reach(self) -> int | None:
        """Tokens from a document's start that the window + sinks cover completely (None: no window)."""
        return self.window_size + self.num_sink_tokens if self.uses_swa else None

    @property
    def uses_memory(self) -> bool:
        """Whether the mixer has a recurrent (mLSTM or linear-attention) branch."""
        return self.mixer != "swa"

    @property
    def gated_memory(self) -> bool:
        """mLSTM (exponential input gate + forget gate) rather than plain linear attention."""
        return self.mixer in ("mlstm_swa", "mlstm")

    def mixer_fields(self) -> dict[str, Any]:
        """The student's own settings (``MIXER_FIELDS``), e.g. to build another student with the same mixer."""
        return {name: getattr(self, name) for name in MIXER_FIELDS}

    def get_teacher_config(self) -> PreTrainedConfig:
        """The teacher's own config object (its family's class)."""
        if self.teacher_config is None:
            raise ValueError("This HybridConfig has no teacher_config: build students with xlstm_distill.convert().")
        config = dict(self.teacher_config)
        return AutoConfig.for_model(config.pop("model_type"), **config)


def _check_layers(layers: Any) -> list[int]:
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                         for i in layers):
        raise ValueError(f"full_attention_layers must be a list of layer indices (integers >= 0), got {layers!r}.")
    return list(layers)


def _check_heads(heads: Any) -> list[tuple[int, int]]:
    ok = isinstance(heads, (list, tuple)) and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair) for pair in heads)
    if not ok:
        raise ValueError(f"full_attention_heads must be a list of [layer, kv_head] pairs (integers >= 0), got "
                         f"{heads!r}.")
    return [tuple(pair) for pair in heads]
