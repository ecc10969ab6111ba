"""Mixture-of-experts families on the fast engine (Qwen3-MoE, Mixtral): each equals generate on a tiny random model of
its transformers config class (check_family): the router's top-k experts per token, the experts as transformers'
grouped product, a dense MLP on the layers Qwen3-MoE's mlp_only_layers names."""

import pytest
from transformers import MixtralConfig, Qwen3MoeConfig

from test_families import check_family, tiny

CONFIGS = {
    "qwen3-moe: 8 experts, top 2, normalised weights, q/k norms, a dense first layer":
        lambda vocab: Qwen3MoeConfig(**tiny(vocab, head_dim=32, moe_intermediate_size=32, num_experts=8,
                                            num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0])),
    "mixtral: 4 experts, top 2": lambda vocab: MixtralConfig(**tiny(vocab, num_local_experts=4, num_experts_per_tok=2)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_moe_family_on_the_fast_engine_equals_generate(tmp_path, default_model, name):
    check_family(tmp_path, default_model, CONFIGS[name](len(default_model.tokenizer)))
