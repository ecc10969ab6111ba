"""Writes the config.json of real model shapes into bench/shapes/NAME/ (python bench/shapes/make.py bench/shapes
[NAME ...]: those alone):
the benchmark runs them with random weights, so no hub is needed. Layer sizes as the published models have them;
Mistral's and Phi-3.5's vocabularies are raised to 49,152, the benchmark tokenizer's (SmolLM2's), since a model
may not have fewer tokens than its tokenizer."""
import sys
from pathlib import Path
from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
                          Qwen2Config, Qwen3Config, Qwen3MoeConfig)

llama3_rope = lambda factor: {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
SHAPES = {
    "llama3.2-1b": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                               rope_scaling=llama3_rope(32.0), max_position_embeddings=131072,
                               tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=128000,
                               eos_token_id=[128001, 128008, 128009]),
    "llama3.1-8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                               rope_scaling=llama3_rope(8.0), max_position_embeddings=131072, rms_norm_eps=1e-5,
                               bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "llama3.3-70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                                rope_scaling=llama3_rope(8.0), max_position_embeddings=131072, rms_norm_eps=1e-5,
                                bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "qwen2.5-1.5b": Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                                max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                use_sliding_window=False, sliding_window=32768),
    "qwen2.5-7b": Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                              max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                              sliding_window=131072),
    "qwen3-1.7b": Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                              num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
                              max_position_embeddings=40960, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "qwen3-8b": Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
                            max_position_embeddings=40960, rms_norm_eps=1e-6),
    "mistral-7b": MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=49152, sliding_window=4096,
                                max_position_embeddings=32768, rms_norm_eps=1e-5),
    "gemma2-2b": Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=256, vocab_size=256000, query_pre_attn_scalar=256,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                              max_position_embeddings=8192),
    "gemma3-1b": Gemma3TextConfig(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                  query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768),
    "phi3.5-mini": Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=49152, max_position_embeddings=131072,
                              original_max_position_embeddings=4096,
                              rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                            "long_factor": [1.0 + i / 16 for i in range(48)]}),
    "qwen3-30b-a3b": Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                                    rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6),
    "mixtral-8x7b": MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                  num_experts_per_tok=2, vocab_size=32000, rope_theta=1000000.0,
                                  max_position_embeddings=32768, rms_norm_eps=1e-5),
}
for name, config in SHAPES.items():
    if len(sys.argv) > 2 and name not in sys.argv[2:]:
        continue
    out = Path(sys.argv[1]) / name
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    print(name, config.model_type)
