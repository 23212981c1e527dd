"""`HybridForCausalLM`: the teacher's backbone with every attention mixer replaced by :class:`HybridAttention`.

Parameter names equal the teacher's (``model.layers.N.self_attn.q_proj.weight``, ``lm_head.weight``, ...), plus
the new mixer parameters (``...self_attn.q_feature_map.weight``, ``...self_attn.gate_proj.bias``), so a teacher
checkpoint loads into a student directly.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from xlstm_distill.modeling.attention import FeatureMap, GateProjection, HybridAttention
from xlstm_distill.modeling.cache import CACHE_FIELD, HybridCache, full_layout
from xlstm_distill.modeling.configuration import HybridConfig
from xlstm_distill.modeling.families import qk_norm_of, text_part


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _is_stateful = True  # recurrent state: no cache cropping (assisted decoding)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, GateProjection | FeatureMap):
            module.reset_parameters()
        elif isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=getattr(self.config.get_teacher_config(), "initializer_range", 0.02))
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """Hybrid xLSTM student: a standard transformers causal LM (forward, generate, save/load)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        teacher_config = config.get_teacher_config()
        qk_norm_of(teacher_config.model_type)
        # the dtype the student is built in (from_pretrained's dtype=...), not the one the teacher's config records
        self.model = AutoModel.from_config(teacher_config, dtype=torch.get_default_dtype())
        self.lm_head = nn.Linear(teacher_config.hidden_size, teacher_config.vocab_size, bias=False)
        for idx, layer in enumerate(self.model.layers):
            layer.self_attn = HybridAttention(layer.self_attn, config, idx)
        self._layer_types = getattr(teacher_config, "layer_types", None)
        self.final_logit_softcapping = getattr(teacher_config, "final_logit_softcapping", None)  # Gemma 2
        # the keyword the teacher family's decoder layer takes the cache by (it hands it on to the mixer)
        layer_args = inspect.signature(type(self.model.layers[0]).forward).parameters
        self._layer_cache_arg = "cache" if "cache" in layer_args else "past_key_values"
        self._no_split_modules = [type(self.model.layers[0]).__name__]
        self.post_init()
        # post_init initializes self.model with the teacher family's own scheme, which knows nothing of the
        # new mixer parameters: give them their intended start.
        for module in self.modules():
            if isinstance(module, GateProjection | FeatureMap):
                module.reset_parameters()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def new_parameter_names(self) -> list[str]:
        """Full names of the parameters the teacher does not have (feature maps, gates)."""
        return [f"model.layers.{i}.self_attn.{n}" for i, layer in enumerate(self.model.layers)
                for n in layer.self_attn.new_parameter_names()]

    def set_full_attention(self, heads: list[list[int]] | None = None, layers: list[int] | None = None) -> None:
        """Keep the teacher's full attention in these ``[layer, kv_head]`` pairs and whole layers (replacing the
        config's choice; the parameters are unchanged). Saved with the model."""
        self.config.set_full_attention(heads or [], layers or [])
        for idx, layer in enumerate(self.model.layers):
            layer.self_attn.set_full_heads(self.config.kept_kv_heads(idx))

    def _position_embeddings(self, x: torch.Tensor, position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) for every layer (families such as OLMo3 use a different RoPE per layer type)."""
        rotary = self.model.rotary_emb
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            per_type = {t: rotary(x, position_ids, layer_type=t) for t in set(self._layer_types)}
            return [per_type[t] for t in self._layer_types]
        return [rotary(x, position_ids)] * len(self.model.layers)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) or (B, past + T); 0 = padding
        position_ids: torch.LongTensor | None = None,  # (B, T) RoPE positions (default: position in document)
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, HIDDEN)
        labels: torch.LongTensor | None = None,  # (B, T)
        use_cache: bool | None = None,
        document_ids: torch.LongTensor | None = None,  # (B, T) packed documents: nothing crosses a change of id
        logits_to_keep: int = 0,
        cache: HybridCache | None = None,  # transformers >= 5.24's name of past_key_values
        from_layer: int = 0,  # run the decoder layers from this one, ``inputs_embeds`` being its input (no cache)
        skip_logits: bool = False,  # no logits: the final hidden states (B, T, HIDDEN) as ``hidden_states[-1]``
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``skip_logits``: for a loss that computes the logits itself in pieces (:meth:`logits`), so that the
        (B, T, VOCAB) logits are never held at once (Stage II's ``loss_chunk_tokens``)."""
        past_key_values = cache if past_key_values is None else past_key_values
        if from_layer and (inputs_embeds is None or use_cache or past_key_values is not None):
            raise ValueError("from_layer needs inputs_embeds (that layer's input) and no cache.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = HybridCache(
                len(self.model.layers), self.config.window_size, self.config.num_sink_tokens,
                keeps_full=self.config.keeps_full_attention,
                layer_windows=[self.config.layer_window(i)[:2] for i in range(len(self.model.layers))])
        if past_key_values is not None:
            layout = past_key_values.plan(B, T, inputs_embeds.device, attention_mask, document_ids)
        else:
            layout = full_layout(B, T, inputs_embeds.device, attention_mask, document_ids)
        positions = layout.position if position_ids is None else position_ids
        hidden = inputs_embeds
        layers = list(zip(self.model.layers, self._position_embeddings(hidden, positions)))[from_layer:]
        for layer, pos_emb in layers:
            out = layer(hidden, attention_mask=None, position_ids=positions, use_cache=use_cache,
                        position_embeddings=pos_emb, layout=layout, **{self._layer_cache_arg: past_key_values})
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = self.model.norm(hidden)
        if past_key_values is not None:
            past_key_values.commit(layout, T)
        if skip_logits:
            return CausalLMOutputWithPast(logits=None, hidden_states=(hidden,), **{CACHE_FIELD: past_key_values})
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.logits(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: past_key_values})

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., HIDDEN) final (normed) hidden states
        """Next-token logits (..., VOCAB) of final hidden states: the LM head (and Gemma 2's soft cap)."""
        logits = self.lm_head(hidden)
        if self.final_logit_softcapping is not None:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own HybridCache on the first forward

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        cache: HybridCache | None = None,  # transformers >= 5.24's name of past_key_values
        **kwargs,
    ) -> dict:
        """Feed only the tokens the cache has not seen; the cache derives positions itself."""
        past_key_values = cache if past_key_values is None else past_key_values
        inputs: dict = {CACHE_FIELD: past_key_values, "attention_mask": attention_mask, "use_cache": use_cache}
        if past_key_values is not None and not past_key_values.is_empty:
            inputs["input_ids"] = input_ids[:, past_key_values.seen_tokens:]
        elif inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids
        return inputs


def convert(teacher: PreTrainedModel, config: HybridConfig | None = None) -> HybridForCausalLM:
    """Build a hybrid student from a teacher: teacher weights reused, new mixer parameters initialized.

    ``config`` holds the mixer settings (``HybridConfig()`` defaults: mLSTM + SWA, window 512, 4 sinks).
    """
    config = config or HybridConfig()
    text_config, teacher_state = text_part(teacher)  # a multimodal checkpoint: its language model
    teacher_config = text_config.to_dict()
    teacher_config.pop("quantization_config", None)
    student_config = HybridConfig(
        **config.mixer_fields(),
        teacher_config=teacher_config,
        teacher_name=teacher.config.name_or_path or None,
    )
    param = next(teacher.parameters())
    student = HybridForCausalLM(student_config).to(device=param.device, dtype=param.dtype)
    missing, unexpected = student.load_state_dict(teacher_state, strict=False)
    surprising = set(missing) - set(student.new_parameter_names()) - {"lm_head.weight"}
    if unexpected or surprising:
        raise ValueError(f"Teacher weights do not map onto the student: unexpected {unexpected}, missing {sorted(surprising)}.")
    student.generation_config = teacher.generation_config
    return student.eval() if not teacher.training else student


AutoConfig.register(HybridConfig.model_type, HybridConfig)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM)
