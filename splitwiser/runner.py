"""A model runner over a pool of KV-cache slots, built from a transformers model's own modules.

The KV cache is allocated once, in blocks of BLOCK_TOKENS positions (KVPool): a slot's positions are found
through its row of the block table, so a slot holds only the blocks its request needs (the engine gives them
out) and a long prompt does not make every slot long. A request owns one slot from its prefill to its last
token. `prefill` runs a group of prompts (right-padded, causal attention) and writes their keys/values into
their slots' blocks; `decode` feeds one token per slot and attends over the slot's cache up to its position
(on CUDA with kernels.py, which reads only the live keys, through the table). Both return the logits of the
next token (sampler.py chooses it) and reuse the model's linear layers, norms, MLPs and rotary embedding through
its family's adapter (families/), so the arithmetic is the model's own; decode has static shapes and no host
synchronisation, so it can be captured in a CUDA graph.

Attention is causal softmax attention (SDPA; prefill needs no mask), unless the adapter says otherwise: a layer's
sliding window (Mistral, Qwen2, Gemma) masks the keys older than it, and soft-capped scores (Gemma 2), which SDPA
cannot compute, take capped_attention. Masks are made once per forward, one per window in use.
"""

import logging
from dataclasses import dataclass

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


BLOCK_TOKENS = 16  # positions per KV block: a request wastes fewer than this at its end


@dataclass
class KVPool:
    """Keys and values, one tensor per layer of shape [blocks + 1, kv_heads, BLOCK_TOKENS, head_dim], and the block
    table [slots, max_len // BLOCK_TOKENS]: the block holding each slot's positions. The last block (`spare`) takes
    the writes nothing reads (a prompt's padding, a free slot's step): a slot's positions without a block of
    their own point there."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    table: torch.Tensor

    @property
    def spare(self) -> int:
        return self.keys[0].shape[0] - 1

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.table]


def allocate_kv(model: nn.Module, slots: int, max_len: int, blocks: int | None = None) -> KVPool:
    """A pool for `slots` slots of up to max_len positions, on the model's device. blocks=None: each slot owns the
    blocks of max_len positions for good (the table never changes: mode=split, where prompt workers fill the slots
    a token worker offers); else `blocks` blocks that the engine gives each request as it starts (the table
    starts with every position on the spare block)."""
    assert max_len % BLOCK_TOKENS == 0, max_len
    _, kv_heads, head_dim = head_geometry(model.config)
    param = next(model.parameters())
    per_slot = max_len // BLOCK_TOKENS
    if blocks is None:
        blocks = slots * per_slot
        table = torch.arange(blocks, device=param.device).view(slots, per_slot)
    else:
        table = torch.full((slots, per_slot), blocks, device=param.device)
    shape = (blocks + 1, kv_heads, BLOCK_TOKENS, head_dim)
    layers = model.config.num_hidden_layers
    return KVPool([torch.zeros(shape, device=param.device, dtype=param.dtype) for _ in range(layers)],
                  [torch.zeros(shape, device=param.device, dtype=param.dtype) for _ in range(layers)], table)


def visible(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query sees, by position: the causal ones, within the sliding window where there is one
    (Architecture.window) → bool [*queries.shape, len(keys)]."""
    queries = queries[..., None]
    causal = keys <= queries
    return causal if window is None else causal & (keys > queries - window)


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     cap: float) -> torch.Tensor:
    """Softmax attention with soft-capped scores (cap * tanh(scores / cap)), which SDPA cannot do, in transformers'
    order (Gemma 2's eager attention): q [..., Q, D] over k, v [..., K, D], where `mask` [..., Q, K] is True."""
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / cap) * cap
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)
    return weights.to(q.dtype) @ v


class SlotRunner:
    def __init__(self, model: nn.Module, slots: int, max_len: int, live_attention: bool = False,
                 kv: KVPool | None = None):
        """kv: a pool allocated elsewhere (the engine's, or in mode=split one shared by a token worker with prompt
        workers); without it each slot gets blocks of its own."""
        self.arch = adapter_for(model, max_len)
        self.slots, self.max_len = slots, max_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv = kv if kv is not None else allocate_kv(model, slots, max_len)
        self.keys, self.values, self.table = self.kv.keys, self.kv.values, self.kv.table
        self.group = self.arch.num_heads // self.arch.num_kv_heads  # query heads per kv head
        self.live_attention = live_attention and kernels.available(self.device)
        if live_attention and not self.live_attention and self.device.type == "cuda":
            log.warning("live attention needs Triton: using SDPA")
        # A window as long as the slot hides no key (positions < max_len): its layers keep the plain path.
        windows = (self.arch.window(index) for index in range(len(self.arch.layers)))
        self.windows = [window if window is not None and window < max_len else None for window in windows]
        self.softcap = self.arch.attention_softcap

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens [G, T] right-padded prompts of `lengths`, for `slots` → the first token's logits [G, vocab]. start:
        the tokens are at positions start.., after a prefix already in the slots' (cached) blocks."""
        arch = self.arch
        positions = torch.arange(start, start + tokens.shape[1], device=self.device)
        # Masks [T, start + T] where SDPA's is_causal cannot serve: after a prefix, windowed layers, and every layer
        # when scores are capped.
        keys_at = torch.arange(start + tokens.shape[1], device=self.device)
        masks = {window: visible(positions, keys_at, window) for window in set(self.windows)
                 if start or window is not None or self.softcap is not None}
        rows = self.table[slots]
        blocks, offsets = rows[:, positions // BLOCK_TOKENS], positions % BLOCK_TOKENS  # [G, T], [T]
        prefix_rows = rows[:, :start // BLOCK_TOKENS]  # each slot's cached blocks
        positions = positions.expand_as(tokens)
        x = arch.embed(tokens, positions)
        for layer, window, keys, values in zip(arch.layers, self.windows, self.keys, self.values):
            q, k, v = arch.qkv(layer, arch.attention_input(layer, x), positions)
            keys[blocks, :, offsets] = k.transpose(1, 2)  # [G, T, Hkv, D] into each position's block
            values[blocks, :, offsets] = v.transpose(1, 2)
            if start:  # the cached prefix's keys and values first, read back from each slot's first blocks
                k, v = (torch.cat([self.slot_view(cache, prefix_rows), own], dim=2)
                        for cache, own in ((keys, k), (values, v)))
            attn = self._prefill_attention(q, k, v, masks.get(window))
            x = x + arch.attention_output(layer, attn.transpose(1, 2).flatten(2))
            x = x + arch.mlp(layer, x)
        last = x[torch.arange(len(lengths), device=self.device), lengths - 1]
        return arch.logits(last)

    def _prefill_attention(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """q [G, H, T, D] over k, v [G, Hkv, K, D] → [G, H, T, D]; mask [T, K] (None: causal, K = T). Right padding:
        a real query only sees real keys before it, so causal (within the window) is enough."""
        if self.softcap is not None:  # the query heads grouped by their kv head, which they broadcast over
            grouped = q.unflatten(1, (self.arch.num_kv_heads, self.group))
            attn = capped_attention(grouped, k[:, :, None], v[:, :, None], mask, self.arch.scaling, self.softcap)
            return attn.flatten(1, 2)
        with sdpa_kernel(PREFILL_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  scale=self.arch.scaling, enable_gqa=self.group > 1)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for slots 0..B-1: tokens [B] at positions [B] → next-token logits [B, vocab]. Static shapes."""
        arch, batch = self.arch, tokens.shape[0]
        rows = torch.arange(batch, device=self.device)
        masks = {}  # SDPA's masks [B, 1, 1, L], one per window; the live kernel reads positions itself
        if not self.live_attention:
            cached = torch.arange(self.max_len, device=self.device)
            masks = {window: visible(positions[:, None, None], cached, window) for window in set(self.windows)}
        blocks, offsets = self.table[rows, positions // BLOCK_TOKENS], positions % BLOCK_TOKENS
        x = arch.embed(tokens[:, None], positions[:, None])
        for layer, window, keys, values in zip(arch.layers, self.windows, self.keys, self.values):
            q, k, v = arch.qkv(layer, arch.attention_input(layer, x), positions[:, None])
            keys[blocks, :, offsets] = k[:, :, 0]
            values[blocks, :, offsets] = v[:, :, 0]
            # The query heads that share a kv head go where SDPA expects query positions: they see
            # the same keys under the same mask, and the cache is read once, never copied.
            q = q.reshape(batch, arch.num_kv_heads, self.group, arch.head_dim)
            attn = self._decode_attention(q, keys, values, positions, window, masks.get(window))
            x = x + arch.attention_output(layer, attn.reshape(batch, 1, arch.num_heads * arch.head_dim))
            x = x + arch.mlp(layer, x)
        return arch.logits(x[:, 0])

    def _decode_attention(self, q, keys, values, positions, window: int | None, mask: torch.Tensor | None):
        """q [B, Hkv, G, D] over the first B slots of a layer's cache → [B, Hkv, G, D]."""
        batch = q.shape[0]
        if self.live_attention:  # reads only each slot's live keys
            return kernels.decode_attention(q.contiguous(), keys, values, self.table[:batch], positions,
                                            self.arch.scaling, window, self.softcap)
        keys, values = self.slot_view(keys, self.table[:batch]), self.slot_view(values, self.table[:batch])
        if self.softcap is not None:
            return capped_attention(q, keys, values, mask, self.arch.scaling, self.softcap)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.arch.scaling)

    @staticmethod
    def slot_view(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A layer's keys or values through table rows [B, N] (blocks), in position order: [B, Hkv, N * BLOCK_TOKENS,
        D], a copy (SDPA's decode path, a cached prefix's prefill)."""
        return cache[rows].transpose(1, 2).flatten(2, 3)
