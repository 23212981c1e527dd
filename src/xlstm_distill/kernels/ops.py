"""The mixer's operations, as the model calls them: each picks its implementation (``registry.choose_kernel``) and
calls it with the same arguments. Every implementation of an operation has this signature (see the registry)."""

from __future__ import annotations

import torch

from xlstm_distill.kernels.mlstm_native import MLSTMState
from xlstm_distill.kernels.options import KernelOptions
from xlstm_distill.kernels.registry import choose_kernel, get_kernel

DEFAULT_OPTIONS = KernelOptions()


def mlstm(
    q: torch.Tensor,  # (B, NH, S, DHQK) feature-mapped queries
    k: torch.Tensor,  # (B, NH, S, DHQK) feature-mapped keys
    v: torch.Tensor,  # (B, NH, S, DHV)
    i: torch.Tensor | None,  # (B, NH, S) input gate pre-activations; None: no gates (plain linear attention)
    f: torch.Tensor | None,  # (B, NH, S) forget gate pre-activations (logsigmoid is applied inside)
    state: MLSTMState | None = None,  # the state to continue from (None: empty)
    reset: torch.Tensor | None = None,  # (B, S) bool, True at each document's first token
    *,
    chunk_size: int = 64,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, MLSTMState]:
    """The recurrent memory over a sequence: the stabilized mLSTM with the normalizer max(|q.n|, exp(-m)) + eps, or
    without gates (``i = f = None``) linear attention with the normalizer q.n + eps. Returns h (B, NH, S, DHV) in v's
    dtype and the state after the last token (float32)."""
    name = choose_kernel("mlstm", options, q.device, gated=i is not None)
    return get_kernel("mlstm", name)(q, k, v, i, f, state, reset, chunk_size, options)


def mlstm_step(
    q: torch.Tensor,  # (B, NH, DHQK)
    k: torch.Tensor,  # (B, NH, DHQK)
    v: torch.Tensor,  # (B, NH, DHV)
    i: torch.Tensor | None,  # (B, NH) input gate pre-activations; None: no gates
    f: torch.Tensor | None,  # (B, NH) forget gate pre-activations
    state: MLSTMState,
    *,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, MLSTMState]:
    """One decoding step of :func:`mlstm`. Returns h (B, NH, DHV) in v's dtype and the new state."""
    name = choose_kernel("mlstm_step", options, q.device, gated=i is not None)
    return get_kernel("mlstm_step", name)(q, k, v, i, f, state, options)


def swa(
    q: torch.Tensor,  # (B, NH, T, D)
    k: torch.Tensor,  # (B, NKV, T, D)
    v: torch.Tensor,  # (B, NKV, T, DV)
    doc_start: torch.Tensor,  # (B, T) index of the first token of each token's document
    *,
    window: int,
    num_sinks: int,
    scale: float,
    softcap: float | None = None,  # attention-logit soft-capping: scores s -> softcap * tanh(s / softcap) (Gemma 2)
    single_document: bool = False,  # known without reading doc_start: one document per row, starting at 0
    memo: dict | None = None,  # per-forward objects shared by the layers (a block mask), filled on first use
    options: KernelOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Sliding-window attention with sink tokens: a query sees the keys of its own document inside the window (itself
    and the ``window - 1`` before it) and the document's first ``num_sinks`` tokens. GQA: query head h reads key head
    h // (NH // NKV). ``softcap``: the scaled scores s become ``softcap * tanh(s / softcap)`` before the softmax
    (None: no capping). Returns (B, NH, T, DV) in v's dtype."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    name = choose_kernel("swa", options, q.device, needs_grad=needs_grad)
    return get_kernel("swa", name)(q, k, v, doc_start, window, num_sinks, scale, softcap, single_document,
                                   {} if memo is None else memo, options)


def swa_cached(
    q: torch.Tensor,  # (B, NH, T, D) new queries
    q_pos: torch.Tensor,  # (B, T) their positions in the document
    k: torch.Tensor,  # (B, NKV, K, D) cached sinks + ring buffer + new keys
    v: torch.Tensor,  # (B, NKV, K, DV)
    k_pos: torch.Tensor,  # (B, K) key positions in the same document, -1 for empty slots
    *,
    window: int,
    num_sinks: int,
    scale: float,
    softcap: float | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """:func:`swa` of a few new tokens over an explicit key set (decoding from the cache). Returns (B, NH, T, DV)."""
    name = choose_kernel("swa_cached", options, q.device)
    return get_kernel("swa_cached", name)(q, q_pos, k, v, k_pos, window, num_sinks, scale, softcap, options)


def mixer_step(
    q: torch.Tensor,  # (B, NH, DH) the new token's queries, after RoPE
    k: torch.Tensor,  # (B, NKV, DH) its keys, after RoPE
    v: torch.Tensor,  # (B, NKV, DH) its values
    gates: torch.Tensor,  # (B, 3 * NH) input, forget, output gate pre-activations; (B, NH) output only if not gated
    maps: tuple[torch.Tensor, ...],  # q weight (NH, DH, DF), q bias (NH, DF), k weight (NH, DH, DF), k bias (NH, DF)
    state: MLSTMState,  # C (B, NH, DF, DH), n (B, NH, DF), m (B, NH), float32
    sink_k: torch.Tensor,  # (B, NKV, S, DH) cached keys of the document's sink tokens
    sink_v: torch.Tensor,  # (B, NKV, S, DH)
    ring_k: torch.Tensor,  # (B, NKV, W, DH) cached keys of the ring buffer (the window)
    ring_v: torch.Tensor,  # (B, NKV, W, DH)
    key_pos: torch.Tensor,  # (B, S + W) positions held by the sink then ring slots, -1 = empty
    position: torch.Tensor,  # (B,) the new token's position in its document
    *,
    gated: bool,  # mLSTM (input / forget gates, max normalizer); False: linear attention (sum normalizer)
    window: int,
    num_sinks: int,
    scale: float,
    softcap: float | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, MLSTMState]:
    """One decoding step of a mixer with both branches: feature maps, :func:`mlstm_step`, :func:`swa_cached` over the
    sinks + ring buffer + the new key, and the output gate's mix ``lerp(swa, memory, sigmoid(o))``. Returns the
    mixer output (B, NH, DH) in v's dtype and the new state (the cache's window K/V are not written here)."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, gates, *maps))
    name = choose_kernel("mixer_step", options, q.device, needs_grad=needs_grad)
    return get_kernel("mixer_step", name)(q, k, v, gates, maps, state, sink_k, sink_v, ring_k, ring_v, key_pos,
                                          position, gated, window, num_sinks, scale, softcap, options)


def mixer(
    q: torch.Tensor,  # (B, NH, T, DH) after RoPE
    k: torch.Tensor,  # (B, NKV, T, DH) after RoPE
    v: torch.Tensor,  # (B, NKV, T, DH)
    gates: torch.Tensor,  # (B, G*NH, T) pre-activations: [input, forget, output] (G = 3) or [output] (G = 1, ungated)
    maps: tuple[torch.Tensor, ...],  # q weight (NH, DH, DF), q bias (NH, DF), k weight, k bias
    doc_start: torch.Tensor,  # (B, T) index of the first token of each token's document
    reset: torch.Tensor | None = None,  # (B, T) bool, True at each document's first token (None: no resets)
    state: MLSTMState | None = None,  # the mLSTM state to continue from (None: empty)
    *,
    window: int,
    num_sinks: int,
    scale: float,
    softcap: float | None = None,
    chunk_size: int = 64,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, MLSTMState]:
    """The whole mixer of a ``mlstm_swa`` layer over a sequence: :func:`swa` of q, k, v (window, sinks, scale,
    softcap as there) and :func:`mlstm` of the feature-mapped phi(q), phi(k) (phi(x) = softmax(x W_h + b_h), per query
    head; k, v shared over the GQA group), mixed per head by the output gate: y = swa + sigmoid(o) (memory - swa).
    Forward only for ``triton`` (``registry.choose_kernel`` has the rule). Returns y (B, NH, T, DH) in v's dtype,
    laid out as (B, T, NH, DH), and the mLSTM's final state (float32)."""
    _check_mixer_inputs(q, k, v, gates, maps, doc_start, reset)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, gates, *maps))
    name = choose_kernel("mixer", options, q.device, gated=gates.shape[1] == 3 * q.shape[1], needs_grad=needs_grad,
                         head_dim=max(q.shape[-1], maps[0].shape[-1]))
    return get_kernel("mixer", name)(q, k, v, gates, maps, doc_start, reset, state, window, num_sinks, scale, softcap,
                                     chunk_size, options)


def _check_mixer_inputs(q, k, v, gates, maps, doc_start, reset) -> None:
    """Clear errors for inputs of the wrong shape (shapes only: no device reads)."""
    B, NH, T, DH = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (T, DH) or v.shape != k.shape or NH % k.shape[1]:
        raise ValueError(f"mixer: k and v must be (B, NKV, T, DH) with NH divisible by NKV, given q {tuple(q.shape)}; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if gates.shape not in ((B, 3 * NH, T), (B, NH, T)):
        raise ValueError(f"mixer: gates must be (B, 3*NH, T) (input, forget, output) or (B, NH, T) (output gate of "
                         f"an ungated memory) = ({B}, {3 * NH} or {NH}, {T}); got {tuple(gates.shape)}.")
    if len(maps) != 4 or maps[0].shape[:2] != (NH, DH) or maps[2].shape != maps[0].shape \
            or maps[1].shape != (NH, maps[0].shape[2]) or maps[3].shape != maps[1].shape:
        raise ValueError(f"mixer: maps must be (q weight (NH, DH, DF), q bias (NH, DF), k weight, k bias) with "
                         f"NH={NH}, "
                         f"DH={DH}; got {[tuple(x.shape) for x in maps]}.")
    for name, x in (("doc_start", doc_start), ("reset", reset)):
        if x is not None and x.shape != (B, T):
            raise ValueError(f"mixer: {name} must be (B, T) = ({B}, {T}); got {tuple(x.shape)}.")
