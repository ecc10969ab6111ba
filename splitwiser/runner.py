"""A model runner over a pool of KV-cache slots, built from a transformers model's own modules.

The KV cache is allocated once: per layer, keys and values of shape [slots, kv_heads, max_len,
head_dim]. A request owns one slot from its prefill to its last token. `prefill` runs a group of
prompts (right-padded, causal attention) and writes their keys/values into their slots;
`decode` feeds one token per slot, attends over the slot's cache up to its position (on CUDA
with kernels.py, which reads only the live keys), and returns the greedy next token. Both reuse the model's linear layers, norms, MLPs and rotary
embedding, so the arithmetic is the model's own; decode has static shapes and no host
synchronisation, so it can be captured in a CUDA graph.

Supported: Llama-style models (Llama, SmolLM2, Mistral without sliding window, Qwen2) and OPT.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from splitwiser import kernels
from splitwiser.errors import UnsupportedModel

log = logging.getLogger(__name__)
# Prefill shapes change with every group of prompts. cuDNN's attention builds a plan per new shape
# (measured on an H100: 140 ms on a new shape, 5 ms on a seen one; flash 7.5 ms): leave it out.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def head_geometry(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def kv_slot_bytes(config, dtype: torch.dtype, max_len: int) -> int:
    """Bytes of one KV slot of max_len positions, keys and values of every layer."""
    _, kv_heads, head_dim = head_geometry(config)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * max_len * dtype.itemsize


def free_memory(device: torch.device) -> int | None:
    """Bytes that new allocations on `device` can take: the GPU's free memory, or the host's MemAvailable (Linux;
    None where it is not known)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def gigabytes(count: int) -> str:
    return f"{count / 2**30:,.{1 if count < 10 * 2**30 else 0}f} GB"


def forward_bytes(config, dtype: torch.dtype, sequences: int, tokens: int, cached_tokens: int = 0) -> int:
    """A rough estimate of the memory one forward over `sequences` x `tokens` takes beyond the weights: its
    widest activations (attention projections and the MLP), the attention scores, and a KV cache of
    `cached_tokens` per sequence (generate allocates its own)."""
    heads, _, _ = head_geometry(config)
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * config.hidden_size)
    activations = sequences * tokens * (4 * config.hidden_size + mlp) + sequences * heads * tokens * tokens
    return activations * dtype.itemsize + sequences * kv_slot_bytes(config, dtype, cached_tokens)


class Architecture:
    """How one model family computes a layer; subclasses name the modules."""

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


ARCHITECTURES = {"llama": Llama, "mistral": Llama, "qwen2": Llama, "opt": OPT}


KVPool = tuple[list[torch.Tensor], list[torch.Tensor]]  # keys and values, one tensor per layer


def allocate_kv(model: nn.Module, slots: int, max_len: int) -> KVPool:
    """Per layer, keys and values of shape [slots, kv_heads, max_len, head_dim], on the model's device."""
    _, kv_heads, head_dim = head_geometry(model.config)
    param = next(model.parameters())
    shape = (slots, kv_heads, max_len, head_dim)
    layers = model.config.num_hidden_layers
    return ([torch.zeros(shape, device=param.device, dtype=param.dtype) for _ in range(layers)],
            [torch.zeros(shape, device=param.device, dtype=param.dtype) for _ in range(layers)])


class SlotRunner:
    def __init__(self, model: nn.Module, slots: int, max_len: int, live_attention: bool = False,
                 kv: KVPool | None = None):
        """kv: a pool allocated elsewhere (mode=split: shared by a token worker with prompt workers)."""
        model_type = model.config.model_type
        if model_type not in ARCHITECTURES:
            raise UnsupportedModel(f"model type {model_type}")
        self.arch = ARCHITECTURES[model_type](model)
        self.slots, self.max_len = slots, max_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.keys, self.values = kv if kv is not None else allocate_kv(model, slots, max_len)
        self.group = self.arch.num_heads // self.arch.num_kv_heads  # query heads per kv head
        head_dim = self.arch.head_dim
        self.live_attention = live_attention and kernels.available(self.device) and head_dim & (head_dim - 1) == 0
        if live_attention and not self.live_attention and self.device.type == "cuda":
            log.warning("live attention needs Triton and a power-of-two head size: using SDPA")

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens [G, T] right-padded prompts of `lengths`, for `slots` → first generated token [G]."""
        arch = self.arch
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        x = arch.embed(tokens, positions)
        for layer, keys, values in zip(arch.layers, self.keys, self.values):
            q, k, v = arch.qkv(layer, arch.attention_input(layer, x), positions)
            keys[slots, :, :tokens.shape[1]] = k
            values[slots, :, :tokens.shape[1]] = v
            # Right padding: a real query only sees real keys before it, so causal is enough.
            with sdpa_kernel(PREFILL_BACKENDS):
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=arch.scaling,
                                                      enable_gqa=self.group > 1)
            x = x + arch.attention_output(layer, attn.transpose(1, 2).flatten(2))
            x = x + arch.mlp(layer, x)
        last = x[torch.arange(len(lengths), device=self.device), lengths - 1]
        return arch.lm_head(arch.final(last)).argmax(-1)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for slots 0..B-1: tokens [B] at positions [B] → next tokens [B]. Static shapes."""
        arch, batch = self.arch, tokens.shape[0]
        rows = torch.arange(batch, device=self.device)
        if not self.live_attention:  # SDPA's mask [B, L]; the live kernel reads positions itself
            visible = torch.arange(self.max_len, device=self.device) <= positions[:, None]
        x = arch.embed(tokens[:, None], positions[:, None])
        for layer, keys, values in zip(arch.layers, self.keys, self.values):
            q, k, v = arch.qkv(layer, arch.attention_input(layer, x), positions[:, None])
            keys[rows, :, positions] = k[:, :, 0]
            values[rows, :, positions] = v[:, :, 0]
            # The query heads that share a kv head go where SDPA expects query positions: they see
            # the same keys under the same mask, and the cache is read once, never copied.
            q = q.reshape(batch, arch.num_kv_heads, self.group, arch.head_dim)
            if self.live_attention:  # reads only each slot's live keys
                attn = kernels.decode_attention(q.contiguous(), keys, values, positions, arch.scaling)
            else:
                attn = F.scaled_dot_product_attention(q, keys[:batch], values[:batch],
                                                      attn_mask=visible[:, None, None, :], scale=arch.scaling)
            x = x + arch.attention_output(layer, attn.reshape(batch, 1, arch.num_heads * arch.head_dim))
            x = x + arch.mlp(layer, x)
        return arch.lm_head(arch.final(x[:, 0])).argmax(-1)
