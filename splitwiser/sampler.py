"""Choosing the next token from the model's logits: greedy (sampling.temperature=0, the default), or sampled so
that anyone can reproduce it.

A sampled token is the Gumbel-max choice: argmax(logits / temperature + g), where g is Gumbel noise made from a
hash of (the request's key, its step, the token id). The key comes from (sampling.seed, the row's id): so a row's
sample depends on the seed, the row, its prompt, the model and the settings, and not on the batch around it,
the slot it sits in, the worker or the run. top_k, top_p and min_p first leave out the tokens they exclude; a
repetition penalty (greedy or sampled) first lowers the tokens already seen.

next_tokens runs inside the decode step that is captured into a CUDA graph: it stays on the device, with static
shapes and no host synchronisation.
"""

import hashlib

import torch

from splitwiser import sampling_kernel
from splitwiser.config import SamplingConfig

GREEDY = SamplingConfig()
MASK32 = 0xFFFFFFFF


def request_key(sampling: SamplingConfig, row_id: str, sample: int = 0) -> int:
    """The 31-bit key of a row's random numbers (sample: which of its sampling.n samples; 0 keys as before n)."""
    text = f"{sampling.seed}\0{row_id}" + (f"\0{sample}" if sample else "")
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (x < 2**32 in int64: every product stays under 2**63, the same on CPU and GPU)."""
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & MASK32
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & MASK32
    return x ^ (x >> 16)


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B] keys and [B] steps → [B, vocab] Gumbel noise, each value a function of (key, step, token id) alone."""
    row = _mix(_mix(keys) ^ steps)  # [B]
    token = torch.arange(vocab, device=keys.device)
    bits = _mix(row[:, None] ^ _mix(token + 0x9E3779B9 & MASK32)[None, :])
    # (2**24 - 1 + 0.5) / 2**24 rounds to 1.0 in float32: its noise would be +inf, and win even where filtered out
    uniform = (((bits >> 8).float() + 0.5) / 2**24).clamp(max=1 - 2**-24)  # in (0, 1)
    return -torch.log(-torch.log(uniform))


def penalized(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the logits of the tokens `seen` [B, vocab] (in the prompt or generated)
    divided by `penalty` where positive, multiplied where negative."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filtered(logits: torch.Tensor, temperature: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Logits (float32, divided by each row's temperature [B]) with the tokens that top_k, top_p and min_p leave
    out at -inf. A row of temperature 0 is divided by 1: greedy rows take the argmax instead (next_tokens)."""
    logits = logits.float() / torch.where(temperature > 0, temperature, 1)[:, None]
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < sampling.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if sampling.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # the mass of the tokens ranked above
        ordered = ordered.masked_fill(before > sampling.top_p, float("-inf"))  # the top token always stays
        logits = torch.empty_like(logits).scatter_(-1, order, ordered)
    return logits


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig = GREEDY, keys: torch.Tensor | None = None,
                steps: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, vocab] → next token ids [B]. temperature: each row's [B] (0: greedy), or None: all greedy.
    Sampling needs each row's key (request_key) and step (the tokens it has generated so far); the repetition
    penalty needs the tokens each row has `seen` [B, vocab]."""
    if seen is not None:
        logits = penalized(logits, seen, sampling.repetition_penalty)
    if temperature is None:
        return logits.argmax(-1)
    if sampling_kernel.available(logits.device) and logits.stride(-1) == 1:  # the same tokens, one read of the row
        return sampling_kernel.next_tokens_fused(logits, keys, steps, temperature.float(), sampling.top_k,
                                                 sampling.top_p, sampling.min_p)
    return reference_tokens(logits, sampling, keys, steps, temperature)


def reference_tokens(logits: torch.Tensor, sampling: SamplingConfig, keys: torch.Tensor, steps: torch.Tensor,
                     temperature: torch.Tensor) -> torch.Tensor:
    """The sampled choice in torch operations: what the fused kernel computes in one pass on a GPU."""
    sampled = (filtered(logits, temperature, sampling) + gumbel_noise(keys, steps, logits.shape[-1])).argmax(-1)
    return torch.where(temperature > 0, sampled, logits.argmax(-1))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The log-probability [B] of each row's token under the model's own distribution (no penalty, temperature or
    filter: what the model says of the text)."""
    return logits.float().log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
