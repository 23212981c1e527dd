"""The student's sequence mixer: teacher q/k/v/o projections + SWA with sinks and/or mLSTM, mixed per head.

The mixer asks ``xlstm_distill.kernels`` for operations (``swa``, ``mlstm``, their cached / step forms); which
implementation runs them is the config's ``kernels`` (:class:`~xlstm_distill.kernels.KernelOptions`).
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xlstm_distill import kernels
from xlstm_distill.kernels.compiling import many_variants
from xlstm_distill.kernels.mixer_step_native import feature_map
from xlstm_distill.kernels.mlstm_native import MLSTMState
from xlstm_distill.kernels.options import KernelOptions
from xlstm_distill.kernels.swa_native import soft_cap
from xlstm_distill.modeling.cache import HybridCache, LayerCache, TokenLayout
from xlstm_distill.modeling.configuration import HybridConfig
from xlstm_distill.modeling.families import qk_norm_of

# Initial gate biases (see docs/decisions.md): input gates start neutral, forget gates as HybridConfig.forget_gate_bias
# says, and the output gate starts near the SWA branch (sigmoid(-3) = 0.047), which alone reproduces the teacher
# inside the window.
OUTPUT_GATE_BIAS = -3.0


class FeatureMap(nn.Module):
    """Hedgehog-style per-head feature map: phi(x) = softmax(x W_h + b_h) over the feature dimension."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))  # (NH, DH, DF)
        self.bias = nn.Parameter(torch.empty(num_heads, feature_dim))  # (NH, DF)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity start: phi(x) = softmax(x) when feature_dim == head_dim (the first feature_dim inputs when it is
        smaller). A larger map starts as copies of the identity, phi(x) = [softmax(x), softmax(x), ...] / copies, so
        that phi(q).phi(k) is the head-dim map's up to the factor 1 / copies, which the memory's normalizer divides
        out; a small random perturbation (std 0.1 / sqrt(head_dim)) lets the copies learn different features."""
        NH, DH, DF = self.weight.shape
        with torch.no_grad():
            eye = torch.eye(DH, device=self.weight.device, dtype=self.weight.dtype)
            if DF <= DH:
                self.weight.copy_(eye[:, :DF].expand_as(self.weight))
            else:
                self.weight.copy_(eye.repeat(1, -(-DF // DH))[:, :DF].expand_as(self.weight))
                self.weight.add_(torch.randn_like(self.weight) * (0.1 / DH ** 0.5))
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, NH, T, DH) -> (B, NH, T, DF)
        return feature_map(x, self.weight, self.bias)


class GateProjection(nn.Linear):
    """Per-head scalar gates from the concatenated q, k, v head activations: [input, forget] and/or output."""

    def __init__(self, in_features: int, num_heads: int, memory_gates: bool, output_gate: bool,
                 forget_bias: tuple[float, float]) -> None:
        self.num_heads, self.memory_gates, self.output_gate = num_heads, memory_gates, output_gate
        self.forget_bias = forget_bias  # (first head, last head)
        super().__init__(in_features, (2 * memory_gates + output_gate) * num_heads)

    def reset_parameters(self) -> None:
        """Weights zero (constant gates at the start); biases as in docs/decisions.md."""
        nn.init.zeros_(self.weight)
        bias = torch.zeros(2 * self.memory_gates + self.output_gate, self.num_heads)
        if self.memory_gates:
            bias[1] = torch.linspace(*self.forget_bias, self.num_heads)
        if self.output_gate:
            bias[-1] = OUTPUT_GATE_BIAS
        with torch.no_grad():
            self.bias.copy_(bias.flatten())


class HybridAttention(nn.Module):
    """Drop-in replacement of one teacher attention layer (same call signature as transformers' attention).

    Family quirks come from the teacher: its projections, q/k norms and RoPE, its query scale (Gemma's
    ``query_pre_attn_scalar``) and attention-logit soft-capping (Gemma 2). In a teacher's own sliding-window layer
    that ``HybridConfig.convert_layers`` keeps, the layer is the teacher's sliding-window attention (the SWA kernel
    with the teacher's window and no sinks) and has no new parameters."""

    def __init__(self, teacher_attn: nn.Module, config: HybridConfig, layer_idx: int) -> None:
        super().__init__()
        teacher = config.get_teacher_config()
        self.config = config  # the kernel options are read from it at every call (settable after construction)
        self.layer_idx = layer_idx
        layer_window = config.layer_window(layer_idx)
        self.keeps_teacher_window = layer_window.teacher
        self.mixer = "swa" if self.keeps_teacher_window else config.mixer
        self.window, self.num_sinks, self.chunk_size = layer_window.window, layer_window.num_sinks, config.chunk_size
        self.teacher_window = config.teacher_window(layer_idx)  # heads that keep the teacher's attention use it too
        self.softcap = getattr(teacher, "attn_logit_softcapping", None)
        if config.kernels.mlstm == "tfla" and not kernels.registry.MLSTM_KERNELS_AVAILABLE:
            raise ImportError("kernels.mlstm='tfla' (backend='tfla') needs mlstm_kernels: "
                              "pip install 'xlstm-distill[gpu]' (or use backend='native').")
        self.num_heads = teacher.num_attention_heads
        self.num_kv_heads = getattr(teacher, "num_key_value_heads", None) or self.num_heads
        self.head_dim = teacher_attn.head_dim
        self.scaling = teacher_attn.scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            teacher_attn.q_proj, teacher_attn.k_proj, teacher_attn.v_proj, teacher_attn.o_proj)
        self.qk_norm = qk_norm_of(teacher.model_type)
        if self.qk_norm != "none":
            self.q_norm, self.k_norm = teacher_attn.q_norm, teacher_attn.k_norm
        self.apply_rope = sys.modules[type(teacher_attn).__module__].apply_rotary_pos_emb  # the family's own RoPE

        H, D = self.num_heads, self.head_dim
        self.uses_swa, self.uses_memory, self.gated_memory = (
            (True, False, False) if self.keeps_teacher_window else (config.uses_swa, config.uses_memory, config.gated_memory))
        output_gate = self.uses_swa and self.uses_memory
        # tokens whose whole document prefix the window + sinks cover take the window branch alone (exact there)
        self.exact_reach = self.window + self.num_sinks if output_gate and config.exact_within_window else None
        self.num_gates = 2 * self.gated_memory + output_gate
        if self.uses_memory:
            feature_dim = config.feature_dim or D
            self.q_feature_map = FeatureMap(H, D, feature_dim)
            self.k_feature_map = FeatureMap(H, D, feature_dim)
        if self.num_gates:
            gate_in = (H + 2 * self.num_kv_heads) * D  # concatenated q, k, v head activations
            self.gate_proj = GateProjection(gate_in, H, self.gated_memory, output_gate, config.forget_gate_bias)
        # Heads that keep the teacher's full attention (a KV head and the query heads of its GQA group). Their mixer
        # parameters stay (unused), so that every student of one teacher has the same parameters.
        self.set_full_heads(config.kept_kv_heads(layer_idx))

    def set_full_heads(self, kept: tuple[int, ...]) -> None:
        """The KV heads (with their query groups) that run the teacher's full attention instead of the mixer; the
        model's config is the record (``HybridForCausalLM.set_full_attention`` sets both)."""
        group = self.num_heads // self.num_kv_heads
        self.all_heads_full = len(set(kept)) == self.num_kv_heads
        # maximal runs of consecutive heads, (start, stop, kept): slices, no index tensors (compile- and graph-safe)
        self.kv_runs = _runs([h in kept for h in range(self.num_kv_heads)])
        self.q_runs = _runs([h // group in kept for h in range(self.num_heads)])

    @property
    def options(self) -> KernelOptions:
        return self.config.kernels

    def new_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the parameters the teacher does not have."""
        return [n for n, _ in self.named_parameters() if n.split(".")[0] in ("q_feature_map", "k_feature_map", "gate_proj")]

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher projections (+ q/k norms). Returns q (B, T, NH*DH), k, v (B, T, NKV*DH), before RoPE."""
        B, T, _ = hidden_states.shape
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "head":
            q = self.q_norm(q.view(B, T, -1, self.head_dim)).view(B, T, -1)
            k = self.k_norm(k.view(B, T, -1, self.head_dim)).view(B, T, -1)
        return q, k, v

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, HIDDEN)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,  # ignored: the layout below carries padding and documents
        past_key_values: HybridCache | None = None,
        layout: TokenLayout | None = None,
        cache: HybridCache | None = None,  # transformers >= 5.24's name of past_key_values
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        past_key_values = cache if past_key_values is None else past_key_values
        B, T, _ = hidden_states.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.project(hidden_states)
        gates = None
        if self.num_gates and not self.all_heads_full:
            gates = self.gate_proj(torch.cat([q, k, v], dim=-1)).transpose(1, 2)  # (B, G*NH, T)
            if self.exact_reach is not None:
                gates = window_only_within_reach(gates, layout.position, self.exact_reach, H)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, NH, T, DH)
        k = k.view(B, T, KV, D).transpose(1, 2)  # (B, NKV, T, DH)
        v = v.view(B, T, KV, D).transpose(1, 2)  # (B, NKV, T, DH)
        cos, sin = position_embeddings
        q, k = self.apply_rope(q, k, cos, sin)
        layer_cache = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        if self.all_heads_full:
            y = self.full_attention(q, k, v, layout, layer_cache)
        else:
            y = self.mix(q, k, v, gates, layout, layer_cache)
            if len(self.q_runs) > 1:  # some heads are kept: their outputs replace the mixer's
                full = self.full_attention(_take(q, self.q_runs), _take(k, self.kv_runs), _take(v, self.kv_runs),
                                           layout, layer_cache).to(y.dtype)
                y = _merge(y, full, self.q_runs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D)), None

    def full_attention(
        self,
        q: torch.Tensor,  # (B, NHF, T, DH) the kept query heads, after RoPE
        k: torch.Tensor,  # (B, NKVF, T, DH) the kept KV heads, after RoPE
        v: torch.Tensor,  # (B, NKVF, T, DH)
        layout: TokenLayout,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:  # (B, NHF, T, DH)
        """The teacher's softmax attention over the whole prefix of each token's document (over the teacher's window in
        its sliding-window layers); with a cache, the kept heads' keys and values are appended to it and a continuing
        forward attends to everything it holds."""
        window = self.teacher_window
        if cache is not None:
            keys, values, key_pos = cache.write_full(k, v, layout)  # (B, NKVF, L, DH), (B, L)
            if layout.continues_cache:
                query_pos, key_pos = layout.position[:, :, None], key_pos[:, None, :]  # (B, T, 1), (B, 1, L)
                mask = (key_pos >= 0) & (key_pos <= query_pos)  # (B, T, L)
                if window is not None:
                    mask = mask & (query_pos - key_pos < window)
                return self._softmax_attention(q, keys, values, mask[:, None])
        if layout.single_document and window is None:
            return self._softmax_attention(q, k, v, None)
        key = ("document_mask", window)
        if key not in layout.memo:  # shared by the layers of one forward
            T = q.shape[2]
            j = torch.arange(T, device=q.device)
            mask = (j[None, None, :] >= layout.doc_start[:, :, None]) & (j[None, None, :] <= j[None, :, None])
            if window is not None:
                mask = mask & (j[None, :, None] - j[None, None, :] < window)
            layout.memo[key] = mask[:, None]  # (B, 1, T, T)
        return self._softmax_attention(q, k, v, layout.memo[key])

    def _softmax_attention(
        self,
        q: torch.Tensor,  # (B, NHF, T, DH)
        k: torch.Tensor,  # (B, NKVF, L, DH)
        v: torch.Tensor,  # (B, NKVF, L, DH)
        mask: torch.Tensor | None,  # (B, 1, T, L) True = attend; None: causal
    ) -> torch.Tensor:  # (B, NHF, T, DH)
        """Softmax attention with the teacher's scale: PyTorch's SDPA, or with soft-capped scores (which SDPA cannot
        do) the definition in float32."""
        k, v = k.to(q.dtype), v.to(q.dtype)
        if self.softcap is None:
            gqa = dict(enable_gqa=True) if q.shape[1] != k.shape[1] else {}
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scaling,
                                                  **gqa)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
        scores = soft_cap(q.float() @ k.transpose(-1, -2) * self.scaling, self.softcap)  # (B, NHF, T, L)
        if mask is None:
            T, L = scores.shape[-2:]
            mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
        return (torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v).to(q.dtype)

    def mix(
        self,
        q: torch.Tensor,  # (B, NH, T, DH) after RoPE
        k: torch.Tensor,  # (B, NKV, T, DH) after RoPE
        v: torch.Tensor,  # (B, NKV, T, DH)
        gates: torch.Tensor | None,  # (B, G*NH, T) gate pre-activations
        layout: TokenLayout,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """The sequence mixer alone (what replaces softmax attention). Returns (B, NH, T, DH)."""
        continues = cache is not None and layout.continues_cache
        state = cache.memory if continues else None
        if self.uses_swa and self.uses_memory and state is not None and q.shape[2] == 1:
            return self._mixer_step(q, k, v, gates, layout, cache)
        if self.uses_swa and self.uses_memory and self._fused(q, k, v, gates, layout, cache):
            return self._fused_mix(q, k, v, gates, layout, cache)
        swa = self._swa(q, k, v, layout, cache) if self.uses_swa else None
        if not self.uses_memory:
            return swa
        options = self.options
        step = state is not None and q.shape[2] == 1  # one decode step: the recurrent form
        spec = MemorySpec(self.num_heads, self.gated_memory, step, self.chunk_size, options)
        maps = (self.q_feature_map.weight, self.q_feature_map.bias, self.k_feature_map.weight, self.k_feature_map.bias)
        args = (q, k, v, gates, swa, maps, state, None if continues else layout.reset, spec)
        # its own compiled graph on CUDA around the TFLA / Triton kernel; inside a compiled model it is traced with the
        # model
        fused = not step and kernels.choose_kernel("mlstm", options, q.device, gated=self.gated_memory) in ("tfla",
                                                                                                           "triton")
        if fused and q.is_cuda and options.compile_memory and not torch.compiler.is_compiling():
            with many_variants():
                y, state = _compiled_memory_and_mix()(*args)
        else:
            y, state = memory_and_mix(*args)
        if cache is not None:
            cache.update_memory(state)
        return y

    def _mixer_step(
        self,
        q: torch.Tensor,  # (B, NH, 1, DH) after RoPE
        k: torch.Tensor,  # (B, NKV, 1, DH) after RoPE
        v: torch.Tensor,  # (B, NKV, 1, DH)
        gates: torch.Tensor,  # (B, G*NH, 1) gate pre-activations
        layout: TokenLayout,
        cache: LayerCache,
    ) -> torch.Tensor:  # (B, NH, 1, DH)
        """One decode step of both branches and their mix (``kernels.mixer_step``: the unfused PyTorch step or one
        fused kernel, as ``KernelOptions.mixer_step`` says), then this token's K/V into the window cache and the new
        state into the cache."""
        group = (self.window, self.num_sinks)  # the cache's window group of this layer
        maps = (self.q_feature_map.weight, self.q_feature_map.bias, self.k_feature_map.weight, self.k_feature_map.bias)
        y, state = kernels.mixer_step(
            q[:, :, 0], k[:, :, 0], v[:, :, 0], gates[..., 0], maps, cache.memory, cache.sink_k, cache.sink_v,
            cache.ring_k, cache.ring_v, layout.cached_key_pos[group], layout.position[:, 0], gated=self.gated_memory,
            window=self.window, num_sinks=self.num_sinks, scale=self.scaling, softcap=self.softcap,
            options=self.options)
        cache.write_window(k, v, layout.write[group])
        cache.update_memory(state)
        return y.unsqueeze(2)

    def _fused(self, q, k, v, gates, layout: TokenLayout, cache: LayerCache | None) -> bool:
        """Whether ``kernels.mixer`` runs this call as one fused forward (``registry.choose_kernel`` has the rule)."""
        maps = (self.q_feature_map.weight, self.q_feature_map.bias, self.k_feature_map.weight, self.k_feature_map.bias)
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, gates, *maps))
        return kernels.choose_kernel("mixer", self.options, q.device, gated=self.gated_memory, needs_grad=needs_grad,
                                     continues_cache=cache is not None and layout.continues_cache,
                                     head_dim=max(self.head_dim, maps[0].shape[-1])) == "triton"

    def _fused_mix(self, q, k, v, gates, layout: TokenLayout, cache: LayerCache | None) -> torch.Tensor:
        """:meth:`mix` as one ``kernels.mixer`` call (a forward from an empty state); fills the cache as ``mix``."""
        maps = (self.q_feature_map.weight, self.q_feature_map.bias, self.k_feature_map.weight, self.k_feature_map.bias)
        y, state = kernels.mixer(q, k, v, gates, maps, layout.doc_start, layout.reset, window=self.window,
                                 num_sinks=self.num_sinks, scale=self.scaling, softcap=self.softcap,
                                 chunk_size=self.chunk_size, options=self.options)
        if cache is not None:
            cache.write_window(k, v, layout.write[(self.window, self.num_sinks)])
            cache.update_memory(state)
        return y

    def _swa(self, q, k, v, layout: TokenLayout, cache: LayerCache | None) -> torch.Tensor:
        """Sliding-window + sinks branch; fills / reads the sink and ring-buffer K/V of ``cache``."""
        window = dict(window=self.window, num_sinks=self.num_sinks, scale=self.scaling, softcap=self.softcap,
                      options=self.options)
        group = (self.window, self.num_sinks)  # the cache's window group of this layer
        if cache is not None and layout.continues_cache:
            keys, values = cache.window_keys(k, v)
            key_pos = torch.cat([layout.cached_key_pos[group], layout.position], dim=1)  # (B, S + W + T)
            out = kernels.swa_cached(q, layout.position, keys, values, key_pos, **window)
        else:
            out = kernels.swa(q, k, v, layout.doc_start, single_document=layout.single_document, memo=layout.memo,
                              **window)
        if cache is not None:
            cache.write_window(k, v, layout.write[group])
        return out


def window_only_within_reach(
    gates: torch.Tensor,  # (B, G*NH, T) gate pre-activations, the output gate's last
    position: torch.Tensor,  # (B, T) position of every token in its document
    reach: int,  # window + sinks: positions below it see their whole prefix through the window
    num_heads: int,
) -> torch.Tensor:  # (B, G*NH, T)
    """The output gate's pre-activation set to -inf (gate 0: the window branch alone) where the window sees the
    token's whole document prefix; every kernel then mixes as usual."""
    o = gates[:, -num_heads:].masked_fill((position < reach)[:, None, :], float("-inf"))
    return torch.cat([gates[:, :-num_heads], o], dim=1)


def _runs(kept: list[bool]) -> tuple[tuple[int, int, bool], ...]:
    """Maximal runs of equal flags: ((start, stop, flag), ...) covering every index."""
    runs, start = [], 0
    for i in range(1, len(kept) + 1):
        if i == len(kept) or kept[i] != kept[start]:
            runs.append((start, i, kept[start]))
            start = i
    return tuple(runs)


def _take(x: torch.Tensor, runs: tuple[tuple[int, int, bool], ...]) -> torch.Tensor:  # (B, N, T, D) -> (B, NF, T, D)
    """The heads of the kept runs."""
    parts = [x[:, a:b] for a, b, kept in runs if kept]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _merge(
    mixed: torch.Tensor,  # (B, NH, T, DH) the mixer's output for every head
    full: torch.Tensor,  # (B, NHF, T, DH) full attention of the kept heads
    runs: tuple[tuple[int, int, bool], ...],
) -> torch.Tensor:  # (B, NH, T, DH)
    parts, offset = [], 0
    for a, b, kept in runs:
        parts.append(full[:, offset:offset + b - a] if kept else mixed[:, a:b])
        offset += (b - a) if kept else 0
    return torch.cat(parts, dim=1)


class MemorySpec(NamedTuple):
    """The static choices of one memory-branch call, the same in every layer (so one compiled graph serves all)."""

    num_heads: int
    gated: bool  # mLSTM (input / forget gates, max normalizer) or plain linear attention (sum normalizer)
    step: bool  # one recurrent decoding step (T = 1, continuing a state)
    chunk_size: int
    options: KernelOptions


def memory_and_mix(
    q: torch.Tensor,  # (B, NH, T, DH) after RoPE
    k: torch.Tensor,  # (B, NKV, T, DH) after RoPE
    v: torch.Tensor,  # (B, NKV, T, DH)
    gates: torch.Tensor | None,  # (B, G*NH, T) gate pre-activations: [input, forget] and/or output
    swa: torch.Tensor | None,  # (B, NH, T, DH) the SWA branch's output (None: memory only)
    maps: tuple[torch.Tensor, ...],  # the q and k feature maps' weight (NH, DH, DF) and bias (NH, DF)
    state: MLSTMState | None,  # the cached state to continue from
    reset: torch.Tensor | None,  # (B, T) True at each document's first token
    spec: MemorySpec,
) -> tuple[torch.Tensor, MLSTMState]:
    """mLSTM (or linear-attention) branch over the feature-mapped q, k, per query head (GQA k, v shared), mixed
    with the SWA branch by the output gate. A pure function of its tensors: on CUDA it runs through torch.compile
    (``_compiled_memory_and_mix``), which fuses the PyTorch work around the TFLA kernel. Returns the mixer's output
    (B, NH, T, DH) and the final state; mixed with the SWA branch, the output is laid out as (B, T, NH, DH), which the
    output projection reads without a copy."""
    H = spec.num_heads
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    fq, fk = feature_map(q, *maps[:2]), feature_map(k, *maps[2:])  # (B, NH, T, DF)
    i, f = (gates[:, :H], gates[:, H:2 * H]) if spec.gated else (None, None)  # (B, NH, T) pre-activations
    if spec.step:
        h, state = kernels.mlstm_step(fq[:, :, 0], fk[:, :, 0], v[:, :, 0], None if i is None else i[..., 0],
                                      None if f is None else f[..., 0], state, options=spec.options)
        h = h.unsqueeze(2)
    else:
        h, state = kernels.mlstm(fq, fk, v, i, f, state, reset, chunk_size=spec.chunk_size, options=spec.options)
    if swa is None:
        return h, state
    # (B, NH, T, 1); under autocast q (after RoPE) may be float32 while the branches are 16-bit
    o = torch.sigmoid(gates[:, -H:].float()).unsqueeze(-1).to(swa.dtype)
    y = torch.lerp(swa, h.to(swa.dtype), o)  # o * memory + (1 - o) * swa in one pass
    return y.transpose(1, 2).contiguous().transpose(1, 2), state


@functools.cache
def _compiled_memory_and_mix():
    """``memory_and_mix`` through torch.compile: the TFLA kernel is one custom operator in the graph (the Triton
    kernels as they are); the feature maps, GQA repeat, gate and mix work around it become a few fused kernels,
    forward and backward. Static shapes for the first length, a symbolic length from the second (as FlexAttention,
    kernels/swa_flex.py)."""
    return torch.compile(memory_and_mix, dynamic=None)
