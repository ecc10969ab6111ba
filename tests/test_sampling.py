"""Sampling (sampling.temperature > 0) on the CPU with the real default model: reproducible from the seed and the
row alone, whatever the batch, the workers, a resume or a split into parts; temperature 0 is today's greedy."""

import pyarrow.parquet as pq
import pytest
import torch

from conftest import SAMPLE, job_config, run_cli
from splitwiser.bench import workload, write_workload
from splitwiser.config import EngineConfig, PromptConfig, SamplingConfig
from splitwiser.engine import Choice, make_engine
from splitwiser.job import run
from splitwiser.merge import merge_tasks
from splitwiser.plan import slot_length
from splitwiser.sampler import gumbel_noise, next_tokens, request_key

SAMPLED = ("sampling.temperature=0.8", "sampling.top_p=0.95", "sampling.seed=7")


def tokens(out) -> dict[str, list[int]]:
    table = pq.read_table(out / "generations.parquet")
    return dict(zip(table["id"].to_pylist(), table["output_token_ids"].to_pylist()))


def job(out, *overrides: str, rows: int = 8) -> dict[str, list[int]]:
    run(job_config(f"data.limit={rows}", "engine.max_new_tokens=10", f"output.dir={out}", *overrides))
    return tokens(out)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    return job(tmp_path_factory.mktemp("sampled"), *SAMPLED)


def test_the_sampler_draws_from_the_softmax():
    """Gumbel-max over 20,000 keys picks each token about as often as its probability."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    keys = torch.tensor([request_key(SamplingConfig(seed=1), str(i)) for i in range(20_000)])
    logits = probs.log().expand(len(keys), -1)
    chosen = next_tokens(logits, SamplingConfig(temperature=1.0), keys, torch.zeros_like(keys), torch.ones(len(keys)))
    frequencies = torch.bincount(chosen, minlength=4) / len(keys)
    assert torch.allclose(frequencies, probs, atol=0.015), frequencies


def test_top_k_1_min_p_and_a_tiny_top_p_leave_only_the_greedy_token():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    keys = torch.arange(64)
    for option in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 0.999}):
        chosen = next_tokens(logits, SamplingConfig(temperature=2.0, **option), keys, torch.zeros_like(keys),
                             torch.full((64,), 2.0))
        assert torch.equal(chosen, logits.argmax(-1)), option


def test_the_noise_is_finite_and_a_filtered_token_never_wins():
    """Key 7969 at step 0 hashes token 964 to the largest 24 bits, whose uniform rounds to 1.0 (noise +inf) unless
    kept below it: top_k=1 must still give the argmax."""
    keys = torch.tensor([7969, 17513, 31120])
    noise = gumbel_noise(keys, torch.zeros_like(keys), 1000)
    assert torch.isfinite(noise).all()
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    chosen = next_tokens(logits, SamplingConfig(temperature=1.0, top_k=1), keys, torch.zeros_like(keys), torch.ones(3))
    assert torch.equal(chosen, logits.argmax(-1))


def test_sampled_rows_vary_and_the_seed_reproduces_them(tmp_path, sampled):
    greedy = job(tmp_path / "greedy")
    assert sum(sampled[i] != greedy[i] for i in greedy) >= 6  # sampled, not greedy
    assert job(tmp_path / "again", *SAMPLED) == sampled
    other_seed = job(tmp_path / "seed8", *SAMPLED[:2], "sampling.seed=8")
    assert sum(other_seed[i] != sampled[i] for i in sampled) >= 6


def test_the_same_row_gets_the_same_sample_whatever_the_batch(tmp_path, default_model):
    requests = workload(default_model, write_workload(SAMPLE, 12, tmp_path / "w.csv"), PromptConfig())
    sampling = SamplingConfig(temperature=1.0, top_k=50, seed=3)
    length = slot_length(max(r.prompt_tokens for r in requests), 10)
    outputs = []
    for batch_size in (1, 4, 16):
        engine = make_engine(default_model, EngineConfig(batch_size=batch_size, max_new_tokens=10), length,
                             len(requests), Choice(sampling, sampled=True))
        outputs.append({g.request.id: g.token_ids for g in engine.run(requests)})
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("overrides", [("procs=2",), ("mode=split", "procs=2")], ids=["colocated", "split"])
def test_workers_give_the_same_samples(tmp_path, sampled, overrides):
    assert job(tmp_path, *SAMPLED, *overrides, "engine.batch_size=2") == sampled


def test_a_resumed_job_and_a_job_in_parts_give_the_same_samples(tmp_path, sampled):
    # data.limit is outside the fingerprint: the second run resumes the first's 4 rows and samples the other 4
    job(tmp_path / "resumed", *SAMPLED, rows=4)
    assert job(tmp_path / "resumed", *SAMPLED) == sampled
    for part in (0, 1):
        job(tmp_path / "parts" / f"task-{part}", *SAMPLED, f"data.part={part}", "data.parts=2")
    merge_tasks(str(tmp_path / "parts"))
    assert tokens(tmp_path / "parts") == sampled


def test_temperature_zero_is_greedy_and_the_same_job(tmp_path):
    greedy = job(tmp_path, rows=4)
    assert job(tmp_path, "sampling.temperature=0", "sampling.seed=5", rows=4) == greedy  # resumes: same job


@pytest.mark.parametrize("override, message", [
    ("sampling.temperature=-1", "sampling.temperature=-1.0: must be 0 (greedy) or more"),
    ("sampling.top_p=1.5", "sampling.top_p=1.5: must be above 0 and at most 1"),
    ("sampling.top_k=-2", "sampling.top_k=-2: must be 0 (all tokens) or more"),
    ("sampling.min_p=1", "sampling.min_p=1.0: must be 0 or more and below 1"),
])
def test_bad_sampling_values_are_one_line_errors(tmp_path, override, message):
    result = run_cli(override, f"output.dir={tmp_path}/o")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"error: {message}", result.stderr


def test_sampling_with_the_generate_engine_is_refused(tmp_path):
    result = run_cli("sampling.temperature=0.7", "engine.kind=generate", f"output.dir={tmp_path}/o")
    assert result.returncode == 2 and "only engine.kind=continuous has them" in result.stderr.splitlines()[-1]
