"""Gemma 2 (gemma2) and Gemma 3's text model (gemma3_text: Gemma 3 270M and 1B). What they need beyond Llama, each
from the model's own modules and config, as transformers computes it:
- the (1 + w) RMSNorm, embeddings scaled by sqrt(hidden) in the model's dtype, GeGLU: the model's own norm,
  embedding and MLP modules do these, so the Llama adapter's calls serve;
- four norms per layer: input, post_attention (on the attention's output), pre_ and post_feedforward (around the MLP);
- the attention scale query_pre_attn_scalar ** -0.5 (the attention module's `scaling`);
- a sliding window on the layers that layer_types marks sliding_attention (Llama.window);
- Gemma 2: soft-capping of the attention scores (attn_logit_softcapping) and of the final logits
  (final_logit_softcapping);
- Gemma 3: per-head RMSNorm of the queries and keys before RoPE (q_norm, k_norm), and RoPE per layer type (local
  layers their own base: rope_parameters["sliding_attention"], which transformers 5 also makes from 4.x's
  rope_local_base_freq); no attention soft-cap (Gemma3Attention applies none), the final one where the config sets it.
Bidirectional attention (use_bidirectional_attention: embedding models) is refused."""

import torch
from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb

from splitwiser.errors import UnsupportedModel
from splitwiser.families.base import family
from splitwiser.families.llama import Llama


@family("gemma2")
class Gemma2(Llama):
    def __init__(self, model):
        super().__init__(model)
        config = model.config
        if config.use_bidirectional_attention:
            raise UnsupportedModel(f"{config.model_type} with bidirectional attention")
        self.apply_rotary = apply_rotary_pos_emb
        self.scaling = self.layers[0].self_attn.scaling
        self.attention_softcap = config.attn_logit_softcapping
        self.final_softcap = config.final_logit_softcapping

    def attention_output(self, layer, x):
        return layer.post_attention_layernorm(layer.self_attn.o_proj(x))

    def mlp(self, layer, x):
        return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))

    def logits(self, x):
        logits = super().logits(x)
        cap = self.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


@family("gemma3_text")
class Gemma3(Gemma2):
    def __init__(self, model):
        super().__init__(model)
        self.attention_softcap = None  # Gemma3Attention ignores attn_logit_softcapping

    def project(self, layer, x):
        q, k, v = super().project(layer, x)
        return layer.self_attn.q_norm(q), layer.self_attn.k_norm(k), v

    def rotary(self, layer, x, positions):
        return self.inner.rotary_emb(x, positions, layer.self_attn.layer_type)
