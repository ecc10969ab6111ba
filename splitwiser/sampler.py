"""Choosing the next token from the model's logits. Sampling options (temperature, top-p, ...) go here."""

import torch


def next_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, vocab] → next token ids [B]: greedy (argmax).

    Runs inside the decode step that is captured into a CUDA graph: it must stay on the device, with
    static shapes and no host synchronisation (no .item(), .tolist() or data-dependent shapes)."""
    return logits.argmax(-1)
