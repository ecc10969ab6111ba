"""How much memory things take and how much is free: a KV slot, a forward's activations, the device's free bytes."""

import torch


def head_geometry(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def kv_slot_bytes(config, dtype: torch.dtype, max_len: int) -> int:
    """Bytes of one KV slot of max_len positions, keys and values of every layer."""
    _, kv_heads, head_dim = head_geometry(config)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * max_len * dtype.itemsize


def forward_bytes(config, dtype: torch.dtype, sequences: int, tokens: int, cached_tokens: int = 0) -> int:
    """A rough estimate of the memory one forward over `sequences` x `tokens` takes beyond the weights: its
    widest activations (attention projections and the MLP), the attention scores, and a KV cache of
    `cached_tokens` per sequence (generate allocates its own)."""
    heads, _, _ = head_geometry(config)
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * config.hidden_size)
    activations = sequences * tokens * (4 * config.hidden_size + mlp) + sequences * heads * tokens * tokens
    return activations * dtype.itemsize + sequences * kv_slot_bytes(config, dtype, cached_tokens)


def step_bytes(config, dtype: torch.dtype, slots: int, prefill_tokens: int) -> int:
    """A rough estimate of what an engine's steps take beyond the weights and the KV cache: the widest decode step's
    and a prefill group's activations, and the decode step's float32 logits with the sampler's copies of them."""
    activations = forward_bytes(config, dtype, slots + prefill_tokens, 1)  # a token each: no prompt's scores
    return activations + 3 * slots * config.vocab_size * 4


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
