"""Every model family on the fast engine (CPU, fp32): a tiny model of the family, random weights made from its
transformers config class (no hub), the default model's tokenizer. The continuous engine's greedy outputs equal
transformers' generate on each prompt alone, and a job with it says the fast engine ran (no fallback).

A family's test: `check_family(tmp_path, default_model, SomeConfig(**tiny(...)))`. Other test files import it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, Qwen2Config

from conftest import SAMPLE, job_config, run_cli, sample_rows
from splitwiser.config import EngineConfig
from splitwiser.engine import ContinuousEngine, GenerateEngine, make_engine
from splitwiser.job import run
from splitwiser.models import LoadedModel
from splitwiser.plan import slot_length
from splitwiser.request import Request

NEW_TOKENS = 12


def tiny(vocab_size: int, **fields) -> dict:
    """A config's fields for a 2-layer model of hidden size 64 (GQA: 4 query heads, 2 key/value heads); weights
    spread wide enough (initializer_range) that greedy choices are not near-ties."""
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2,
                **fields)


def prompts(tokenizer, lengths=(8, 40, 130, 300)) -> list[list[int]]:
    """Token ids of the sample's findings, joined until each is `length` tokens long: long enough to cross the
    sliding windows and RoPE scaling thresholds that tiny configs set below 300."""
    text = " ".join(row["findings"] for row in sample_rows(40))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [ids[:length] for length in lengths]


def outputs_of(engine, token_ids: list[list[int]]) -> list[list[int]]:
    requests = [Request(id=str(i), prompt="", input_ids=ids, prompt_tokens=len(ids)) for i, ids in enumerate(token_ids)]
    by_id = {g.request.id: g.token_ids for g in engine.run(requests)}
    return [by_id[str(i)] for i in range(len(token_ids))]


def check_family(tmp_path, default_model, config, device: str = "cpu") -> None:
    """The fast engine on a random model of `config` gives generate's tokens on each prompt alone (fp32, greedy),
    over several slots and prefill groups; a job on it runs the fast engine. On a GPU (device="cuda"): with CUDA
    graphs and the live decode kernel. Then prompts that share their first 32 tokens: those are prefilled once
    (engine.share_prefix). default_model: anything with the tokenizer."""
    torch.manual_seed(0)
    # eager: transformers' reference attention (its SDPA path leaves out Gemma 2's soft-cap on some versions)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").to(device).eval()
    loaded = LoadedModel(model, default_model.tokenizer, torch.device(device), torch.float32,
                         config.max_position_embeddings, "tiny")
    token_ids = prompts(default_model.tokenizer)
    cfg = EngineConfig(batch_size=4, max_new_tokens=NEW_TOKENS, prefill_tokens=400, attention="auto")
    engine = make_engine(loaded, cfg, slot_length(max(map(len, token_ids)), NEW_TOKENS), len(token_ids))
    assert isinstance(engine, ContinuousEngine), f"{config.model_type} fell back to generate"
    assert engine.runner.live_attention == (device == "cuda")
    generate = GenerateEngine(loaded, EngineConfig(batch_size=1, max_new_tokens=NEW_TOKENS))
    assert outputs_of(engine, token_ids) == outputs_of(generate, token_ids)
    shared = prompts(default_model.tokenizer, lengths=(40, 70, 130, 300))  # one text's starts: 32 tokens in common
    engine = make_engine(loaded, cfg, slot_length(300, NEW_TOKENS), len(shared))
    assert outputs_of(engine, shared) == outputs_of(generate, shared)
    assert engine.cached_tokens >= 32  # the first blocks read from the cache, computed once
    model.save_pretrained(tmp_path / "model")
    default_model.tokenizer.save_pretrained(tmp_path / "model")
    manifest = run(job_config(f"model.path={tmp_path / 'model'}", f"data.path={SAMPLE}", "data.limit=3",
                              f"engine.max_new_tokens={NEW_TOKENS}", f"output.dir={tmp_path / 'out'}"))
    assert manifest["runs"][-1]["engine"]["kind"] == "ContinuousEngine" and manifest["rows"]["ok"] == 3
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model_source"] == str(tmp_path / "model")


@pytest.mark.parametrize("name, config", [
    ("llama", lambda vocab: LlamaConfig(**tiny(vocab))),
    ("llama with tied embeddings and an explicit head_dim", lambda vocab: LlamaConfig(**tiny(vocab, head_dim=32,
                                                                                           tie_word_embeddings=True))),
    ("qwen2 (q/k/v biases)", lambda vocab: Qwen2Config(**tiny(vocab, use_sliding_window=False))),
    ("opt", lambda vocab: OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=1024, init_std=0.2,
                                    word_embed_proj_dim=64)),
])
def test_family_on_the_fast_engine_equals_generate(tmp_path, default_model, name, config):
    check_family(tmp_path, default_model, config(len(default_model.tokenizer)))


def test_a_family_without_an_adapter_runs_through_generate_and_says_so(tmp_path, default_model):
    """GPT-2 has no adapter: the job runs transformers' generate, says so in one warning line and in the manifest."""
    result = run_cli("model.weights=random", "model.path=gpt2", "model.architecture=gpt2",
                     f"model.tokenizer={default_model.source}", "data.limit=2", "engine.max_new_tokens=2",
                     f"output.dir={tmp_path}", "output.progress=false")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "does not support this model" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "engine.kind=continuous does not support this model (model type gpt2): using engine.kind=generate")
    engine = json.loads((tmp_path / "manifest.json").read_text())["runs"][-1]["engine"]
    assert engine["kind"] == "GenerateEngine" and engine["fallback_from"] == "continuous: model type gpt2"
