"""Dense families beyond Llama, Qwen2 and OPT on the fast engine (Llama 3.x, Qwen3, Phi-3/Phi-4-mini): each equals
generate on a tiny random model of its transformers config class (check_family), with every RoPE threshold and
window under the longest prompt (300 tokens); Phi-3's LongRoPE is refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config, Qwen3Config

from splitwiser.engine import eos_ids
from splitwiser.errors import UnsupportedModel
from splitwiser.families import adapter_for
from splitwiser.models import LoadedModel
from test_families import check_family, tiny

# Llama 3.x's frequency scaling, with wavelengths measured against 64 positions: the prompts reach 300.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
# Several EOS ids, as Llama 3.x lists [128001, 128008, 128009]: within the tiny vocabulary, the first two are tokens
# the seed-0 model below generates early on the 8- and 40-token prompts, so requests stop on different ids.
LLAMA3_EOS = [4576, 2628, 48000]


def llama32(vocab: int) -> LlamaConfig:
    """Llama 3.2 1B/3B: llama3 RoPE scaling, tied embeddings, an explicit head_dim, several EOS ids."""
    return LlamaConfig(**tiny(vocab, head_dim=32, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE,
                              eos_token_id=LLAMA3_EOS))


CONFIGS = {
    "llama 3.2": llama32,
    "qwen3: q/k norms, head_dim 32 (hidden 64 / 4 heads is 16), tied embeddings":
        lambda vocab: Qwen3Config(**tiny(vocab, head_dim=32, tie_word_embeddings=True)),
    "phi-3-mini: fused qkv_proj and gate_up_proj, a sliding window on every layer":
        lambda vocab: Phi3Config(**tiny(vocab, sliding_window=32)),
    "phi-4-mini: partial rotary (3/4 of each head), tied embeddings":
        lambda vocab: Phi3Config(**tiny(vocab, partial_rotary_factor=0.75, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_dense_family_on_the_fast_engine_equals_generate(tmp_path, default_model, name):
    check_family(tmp_path, default_model, CONFIGS[name](len(default_model.tokenizer)))


def test_every_eos_id_of_a_list_is_an_eos(default_model):
    model = AutoModelForCausalLM.from_config(llama32(len(default_model.tokenizer)))
    loaded = LoadedModel(model, default_model.tokenizer, torch.device("cpu"), torch.float32, 1024, "tiny")
    assert eos_ids(loaded) == set(LLAMA3_EOS)


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}


def test_longrope_past_its_original_length_is_refused(default_model):
    """Generate picks LongRoPE's factors from the whole sequence's length and recomputes the cache where a sequence
    crosses original_max_position_embeddings: slots longer than that are refused (the job falls back to generate)."""
    config = Phi3Config(**tiny(len(default_model.tokenizer), rope_scaling=LONGROPE, original_max_position_embeddings=64))
    model = AutoModelForCausalLM.from_config(config)
    adapter_for(model, slot_length=64)
    with pytest.raises(UnsupportedModel, match="LongRoPE past original_max_position_embeddings=64"):
        adapter_for(model, slot_length=80)


def test_longrope_within_its_original_length_runs_the_fast_engine(tmp_path, default_model):
    """Every request of the harness fits 320 positions: the short factors throughout, as generate uses them."""
    config = Phi3Config(**tiny(len(default_model.tokenizer), rope_scaling=LONGROPE, original_max_position_embeddings=320))
    check_family(tmp_path, default_model, config)
