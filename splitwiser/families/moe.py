"""Mixture-of-experts models: Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) and Mixtral. Attention is their dense
sibling's (qwen3.py, llama.py); each layer's MLP is the model's own sparse block: a router picks each token's top-k
experts, and the experts run as transformers' `grouped_mm` experts (tokens sorted by expert, one grouped product of
torch's per layer, no host synchronisation), so that the decode step stays one CUDA graph.

torch's grouped product runs inside a CUDA graph in bf16 only (in other dtypes it copies its offsets to the host):
on a GPU in fp16 or fp32 the experts run as `batched_mm` instead (each token's experts' weights gathered: exact,
capturable, but memory for every running token's experts: run MoE models in bf16)."""

import torch

from splitwiser.families.base import family
from splitwiser.families.llama import Llama
from splitwiser.families.qwen3 import Qwen3


class MixtureOfExperts:
    def __init__(self, model):
        super().__init__(model)
        weight = next(model.parameters())
        if weight.is_cuda and weight.dtype != torch.bfloat16:
            model.set_experts_implementation("batched_mm")


@family("qwen3_moe")
class Qwen3Moe(MixtureOfExperts, Qwen3):
    pass


@family("mixtral")
class Mixtral(MixtureOfExperts, Llama):
    pass
