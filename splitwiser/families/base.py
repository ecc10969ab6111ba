"""What every family adapter is (Architecture), and the registry that maps a transformers model_type to one."""

import torch
from torch import nn

from splitwiser.errors import UnsupportedModel
from splitwiser.memory import head_geometry

FAMILIES: dict[str, type["Architecture"]] = {}  # transformers model_type → its adapter


def family(*model_types: str):
    """Registers the decorated adapter for these transformers model types."""
    def register(adapter: type["Architecture"]) -> type["Architecture"]:
        FAMILIES.update(dict.fromkeys(model_types, adapter))
        return adapter
    return register


def adapter_for(model: nn.Module, slot_length: int) -> "Architecture":
    """The adapter of the model's family for KV slots of `slot_length` positions; raises UnsupportedModel where there
    is none."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"model type {model_type}")
    adapter = FAMILIES[model_type](model)
    adapter.check_slot_length(slot_length)
    return adapter


class Architecture:
    """How one model family computes a layer; subclasses name the modules. They set `layers` (the decoder
    layers, in order) and `scaling` (the attention's softmax scale) and implement:
    embed(tokens, positions) → x [B, T, hidden]; attention_input(layer, x) (the pre-attention norm);
    qkv(layer, x, positions); attention_output(layer, attn) (the output projection, and any norm after it);
    mlp(layer, x) (its norms included); final(x) (what comes before lm_head).

    Where a family's attention is not plain causal softmax attention, it also overrides window(index) (a layer's
    sliding window) or sets attention_softcap; logits(x) where something comes after lm_head. The defaults leave
    the runner's plain path: no mask in prefill, SDPA everywhere."""

    attention_softcap: float | None = None  # scores → cap * tanh(scores / cap) before the softmax (Gemma 2)

    def __init__(self, model: nn.Module):
        self.model = model
        self.num_heads, self.num_kv_heads, self.head_dim = head_geometry(model.config)
        self.lm_head = model.get_output_embeddings()

    def qkv(self, layer, x, positions):
        """x [B, T, hidden] → q [B, H, T, D], k and v [B, Hkv, T, D]."""
        raise NotImplementedError

    def check_slot_length(self, slot_length: int) -> None:
        """Raises UnsupportedModel where the fast engine cannot give generate's tokens over requests of up to
        `slot_length` positions (prompt and generation)."""

    def window(self, index: int) -> int | None:
        """The sliding window of layer `index`: W lets a query see the keys of its last W positions, itself
        included (transformers' sliding_window_overlay: key > query - W); None: every position before it."""
        return None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output x [N, hidden] → next-token logits [N, vocab]."""
        return self.lm_head(self.final(x))

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)
