"""Mixture-of-experts models: Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) and Mixtral. Attention is their dense
sibling's (qwen3.py, llama.py); each layer's MLP is the model's own sparse block: a router picks each token's top-k
experts and the experts run as one grouped product per layer (transformers' `grouped_mm` experts: tokens sorted by
expert, torch's grouped matrix product over them, no host synchronisation), so the decode step stays one CUDA graph."""

from splitwiser.families.base import family
from splitwiser.families.llama import Llama
from splitwiser.families.qwen3 import Qwen3


@family("qwen3_moe")
class Qwen3Moe(Qwen3):
    pass


@family("mixtral")
class Mixtral(Llama):
    pass
