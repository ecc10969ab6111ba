"""Qwen3 (dense): Llama-style, plus a per-head RMSNorm on the queries and keys (q_norm, k_norm) before RoPE; its
explicit head_dim (128, whatever the hidden size) is read by base.Architecture like any other."""

from splitwiser.families.base import family
from splitwiser.families.llama import Llama


@family("qwen3")
class Qwen3(Llama):
    def qkv(self, layer, x, positions):
        attn = layer.self_attn
        q = attn.q_norm(self.split_heads(attn.q_proj(x), self.num_heads))
        k = attn.k_norm(self.split_heads(attn.k_proj(x), self.num_kv_heads))
        v = self.split_heads(attn.v_proj(x), self.num_kv_heads)
        cos, sin = self.inner.rotary_emb(x, positions)
        return (*self.apply_rotary(q, k, cos, sin), v)
