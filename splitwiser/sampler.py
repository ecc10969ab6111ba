"""Choosing the next token from the model's logits: greedy (sampling.temperature=0, the default), or sampled so
that anyone can reproduce it.

A sampled token is the Gumbel-max choice: argmax(logits / temperature + g), where g is Gumbel noise made from a
hash of (the request's key, its step, the token id). The key comes from (sampling.seed, the row's id): so a row's
sample depends on the seed, the row, its prompt, the model and the settings, and not on the batch around it,
the slot it sits in, the worker or the run. top_k, top_p and min_p first leave out the tokens they exclude.

next_tokens runs inside the decode step that is captured into a CUDA graph: it stays on the device, with static
shapes and no host synchronisation.
"""

import hashlib

import torch

from splitwiser.config import SamplingConfig

GREEDY = SamplingConfig()
MASK32 = 0xFFFFFFFF


def request_key(sampling: SamplingConfig, row_id: str) -> int:
    """The 31-bit key of a row's random numbers."""
    digest = hashlib.sha256(f"{sampling.seed}\0{row_id}".encode()).digest()
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
    uniform = ((bits >> 8).float() + 0.5) / 2**24  # in (0, 1)
    return -torch.log(-torch.log(uniform))


def filtered(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Logits (float32, divided by the temperature) with the tokens that top_k, top_p and min_p leave out at -inf."""
    logits = logits.float() / sampling.temperature
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
                steps: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, vocab] → next token ids [B]. Sampling needs each row's key (request_key) and step (the tokens
    it has generated so far)."""
    if sampling.greedy:
        return logits.argmax(-1)
    return (filtered(logits, sampling) + gumbel_noise(keys, steps, logits.shape[-1])).argmax(-1)
