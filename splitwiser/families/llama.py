"""Llama-style models: Llama, SmolLM2, Qwen2, Mistral without a sliding window."""

from splitwiser.errors import UnsupportedModel
from splitwiser.families.base import Architecture, family


@family("llama", "mistral", "qwen2")
class Llama(Architecture):
    def __init__(self, model):
        super().__init__(model)
        self.inner = model.model
        self.layers = list(self.inner.layers)
        if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
            raise UnsupportedModel("sliding-window attention")
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        self.apply_rotary = apply_rotary_pos_emb
        self.scaling = self.head_dim ** -0.5

    def embed(self, tokens, positions):
        return self.inner.embed_tokens(tokens)

    def attention_input(self, layer, x):
        return layer.input_layernorm(x)

    def qkv(self, layer, x, positions):
        attn = layer.self_attn
        q = self.split_heads(attn.q_proj(x), self.num_heads)
        k = self.split_heads(attn.k_proj(x), self.num_kv_heads)
        v = self.split_heads(attn.v_proj(x), self.num_kv_heads)
        cos, sin = self.inner.rotary_emb(x, positions)
        q, k = self.apply_rotary(q, k, cos, sin)
        return q, k, v

    def attention_output(self, layer, x):
        return layer.self_attn.o_proj(x)

    def mlp(self, layer, x):
        return layer.mlp(layer.post_attention_layernorm(x))

    def final(self, x):
        return self.inner.norm(x)
