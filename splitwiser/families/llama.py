"""Llama-style models: Llama, SmolLM2, Qwen2, Mistral, with their sliding windows (window: Mistral's on every layer,
Qwen2's with use_sliding_window on the layers its layer_types mark). Subclasses (gemma.py, qwen3.py, phi3.py)
override the parts they change: project (the q/k/v projections), rotary (a layer's RoPE cos and sin), window."""

from splitwiser.families.base import Architecture, family


@family("llama", "mistral", "qwen2")
class Llama(Architecture):
    def __init__(self, model):
        super().__init__(model)
        self.inner = model.model
        self.layers = list(self.inner.layers)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        self.apply_rotary = apply_rotary_pos_emb
        self.scaling = self.head_dim ** -0.5

    def embed(self, tokens, positions):
        return self.inner.embed_tokens(tokens)

    def attention_input(self, layer, x):
        return layer.input_layernorm(x)

    def qkv(self, layer, x, positions):
        q, k, v = self.project(layer, x)
        cos, sin = self.rotary(layer, x, positions)
        q, k = self.apply_rotary(q, k, cos, sin)
        return q, k, v

    def project(self, layer, x):
        """x [B, T, hidden] → q [B, H, T, D], k and v [B, Hkv, T, D], before RoPE."""
        attn = layer.self_attn
        return (self.split_heads(attn.q_proj(x), self.num_heads), self.split_heads(attn.k_proj(x), self.num_kv_heads),
                self.split_heads(attn.v_proj(x), self.num_kv_heads))

    def rotary(self, layer, x, positions):
        """RoPE's cos and sin at `positions` for this layer (here one rotary embedding serves every layer)."""
        return self.inner.rotary_emb(x, positions)

    def window(self, index):
        # As the models mask: layer_types marks the sliding layers (Qwen2, Qwen3); without it, config.sliding_window
        # is every layer's (Mistral, Phi-3; Llama has none).
        config = self.model.config
        if getattr(config, "layer_types", None) is None:
            return getattr(config, "sliding_window", None)
        return config.sliding_window if config.layer_types[index] == "sliding_attention" else None

    def attention_output(self, layer, x):
        return layer.self_attn.o_proj(x)

    def mlp(self, layer, x):
        return layer.mlp(layer.post_attention_layernorm(x))

    def final(self, x):
        return self.inner.norm(x)
