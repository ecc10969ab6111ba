"""Loading models: the GGUF conversion cache; random weights made a module at a time."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          MixtralConfig, OPTConfig, Phi3Config, Qwen2Config, Qwen3Config, Qwen3MoeConfig)

from splitwiser.config import ModelConfig
from splitwiser.models import convert_gguf, locate, made_by_modules


def test_the_same_gguf_elsewhere_reuses_its_conversion(tmp_path, default_model):
    # Another virtual environment (or a reinstall) holds the same file at another path, with another mtime:
    # it must not cost another conversion (~20 s) and another ~500 MB in the cache.
    original = Path(locate(ModelConfig().path))
    copy = tmp_path / "other-venv" / original.name
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    cache_dir = Path(os.path.expanduser(ModelConfig().cache_dir))
    assert convert_gguf(copy, cache_dir) == Path(default_model.source)


TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)
LONGROPE = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5] * 8}
FAMILIES = {
    "llama": LlamaConfig(**TINY), "llama, tied head": LlamaConfig(**TINY, tie_word_embeddings=True),
    "qwen2": Qwen2Config(**TINY), "qwen3": Qwen3Config(**TINY, head_dim=16),
    "mistral": MistralConfig(**TINY, sliding_window=64), "gemma2": Gemma2Config(**TINY, head_dim=16),
    "gemma3": Gemma3TextConfig(**TINY, head_dim=16, sliding_window=64),
    "phi3 (longrope)": Phi3Config(**{**TINY, "num_key_value_heads": 4}, pad_token_id=0, rope_scaling=LONGROPE,
                                  original_max_position_embeddings=256),
    "opt": OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=1024, word_embed_proj_dim=64),
    "qwen3_moe": Qwen3MoeConfig(**TINY, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mixtral": MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_random_weights_made_a_module_at_a_time_are_the_models_own_initialisation(name):
    """made_by_modules builds on the meta device and makes each module's tensors in turn (what lets a 70B model be
    quantized as it is made): the same buffers as transformers' from_config (RoPE's frequencies, Gemma's embedding
    scale), the same parameters with the same spread (no uninitialised memory), the head tied where it was."""
    config = FAMILIES[name]
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = made_by_modules(config, torch.float32, torch.device("cpu"))
    buffers = dict(model.named_buffers())
    assert buffers.keys() == dict(reference.named_buffers()).keys()
    for key, buffer in reference.named_buffers():
        assert torch.equal(buffers[key], buffer), key
    parameters = dict(model.named_parameters())
    assert parameters.keys() == dict(reference.named_parameters()).keys()
    for key, parameter in reference.named_parameters():
        made = parameters[key]
        assert made.shape == parameter.shape and made.dtype == parameter.dtype, key
        if parameter.min() == parameter.max():  # norms' ones, biases' zeros
            assert torch.equal(made, parameter), key
        else:
            assert made.std().item() == pytest.approx(parameter.std().item(), rel=0.25), key
    tied = reference.get_output_embeddings().weight is reference.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert torch.isfinite(model(torch.arange(20)[None]).logits).all()
