"""Qwen3 (dense): Llama-style, plus a per-head RMSNorm of the queries and keys (q_norm, k_norm) before RoPE. Its
head_dim (128 at every size, not hidden / heads) is read from the config like any other; a sliding window, where
use_sliding_window sets one, is Llama.window's (layer_types)."""

from splitwiser.families.base import family
from splitwiser.families.llama import Llama


@family("qwen3")
class Qwen3(Llama):
    def project(self, layer, x):
        q, k, v = super().project(layer, x)
        return layer.self_attn.q_norm(q), layer.self_attn.k_norm(k), v
