"""Model-family adapters: how each family of transformers models computes a layer, for runner.SlotRunner.

Supported: Llama-style models (Llama, SmolLM2, Mistral without sliding window, Qwen2) and OPT.

To add a family:
1. a subclass of `Architecture` here (its docstring lists what to set and implement), built from
   the model's own modules; it raises UnsupportedModel for variants it cannot run;
2. its transformers `model_type`(s) in `FAMILIES`;
3. a test that the fast engine equals `generate(do_sample=False)` on it (the `architecture`
   parameter of tests/test_gpu.py's float32 test, with random weights).
A model type not in `FAMILIES` makes the job fall back to transformers' generate (mode=split, which hands
KV slots over, refuses it in one line).
"""

import torch
from torch import nn

from splitwiser.errors import UnsupportedModel
from splitwiser.memory import head_geometry


class Architecture:
    """How one model family computes a layer; subclasses name the modules. They set `layers` (the decoder
    layers, in order) and `scaling` (the attention's softmax scale) and implement:
    embed(tokens, positions) → x [B, T, hidden]; attention_input(layer, x) (the pre-attention norm);
    qkv(layer, x, positions); attention_output(layer, attn) (the output projection);
    mlp(layer, x) (its norm included); final(x) (what comes before lm_head)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.num_heads, self.num_kv_heads, self.head_dim = head_geometry(model.config)
        self.lm_head = model.get_output_embeddings()

    def qkv(self, layer, x, positions):
        """x [B, T, hidden] → q [B, H, T, D], k and v [B, Hkv, T, D]."""
        raise NotImplementedError

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)


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


class OPT(Architecture):
    def __init__(self, model):
        super().__init__(model)
        self.decoder = model.model.decoder
        self.layers = list(self.decoder.layers)
        if not model.config.do_layer_norm_before:
            raise UnsupportedModel("OPT with post-layer-norm (opt-350m)")
        self.scaling = 1.0  # OPT scales the queries before attention, as transformers does

    def embed(self, tokens, positions):
        x = self.decoder.embed_tokens(tokens)
        if self.decoder.project_in is not None:
            x = self.decoder.project_in(x)
        return x + self.decoder.embed_positions.weight[positions + self.decoder.embed_positions.offset]

    def attention_input(self, layer, x):
        return layer.self_attn_layer_norm(x)

    def qkv(self, layer, x, positions):
        attn = layer.self_attn
        q = self.split_heads(attn.q_proj(x) * attn.scaling, self.num_heads)
        return q, self.split_heads(attn.k_proj(x), self.num_heads), self.split_heads(attn.v_proj(x), self.num_heads)

    def attention_output(self, layer, x):
        return layer.self_attn.out_proj(x)

    def mlp(self, layer, x):
        return layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))

    def final(self, x):
        x = self.decoder.final_layer_norm(x) if self.decoder.final_layer_norm is not None else x
        return self.decoder.project_out(x) if self.decoder.project_out is not None else x


FAMILIES = {"llama": Llama, "mistral": Llama, "qwen2": Llama, "opt": OPT}  # transformers model_type → adapter


def adapter_for(model: nn.Module) -> Architecture:
    """The adapter of the model's family; raises UnsupportedModel where there is none."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"model type {model_type}")
    return FAMILIES[model_type](model)
