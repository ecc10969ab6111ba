"""A model runner over a pool of KV-cache slots, built from a transformers model's own modules.

The KV cache is allocated once: per layer, keys and values of shape [slots, kv_heads, max_len,
head_dim]. A request owns one slot from its prefill to its last token. `prefill` runs a group of
prompts (right-padded, causal attention) and writes their keys/values into their slots;
`decode` feeds one token per slot and attends over the slot's cache up to its position (on CUDA
with kernels.py, which reads only the live keys). Both return the logits of the next token
(sampler.py chooses it) and reuse the model's linear layers, norms, MLPs and rotary embedding
through its family's adapter (families.py), so the arithmetic is the model's own; decode has
static shapes and no host synchronisation, so it can be captured in a CUDA graph.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from splitwiser import kernels
from splitwiser.families import adapter_for
from splitwiser.memory import head_geometry

log = logging.getLogger(__name__)
# Prefill shapes change with every group of prompts. cuDNN's attention builds a plan per new shape
# (bench/NOTES.md, run 4): leave it out.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
        self.arch = adapter_for(model)
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
        """tokens [G, T] right-padded prompts of `lengths`, for `slots` → the first token's logits [G, vocab]."""
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
        return arch.lm_head(arch.final(last))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for slots 0..B-1: tokens [B] at positions [B] → next-token logits [B, vocab]. Static shapes."""
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
        return arch.lm_head(arch.final(x[:, 0]))
