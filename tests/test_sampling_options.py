"""The sampling options beyond temperature, on the CPU with the real default model: n samples per row, stop
strings, log-probabilities, the repetition penalty and per-row settings from columns; each checked against
transformers (generate, a forward pass) or against the job's own invariants (rows in x n = rows out)."""

import pyarrow.parquet as pq
import pytest
import torch

from conftest import SAMPLE, job_config, run_cli, sample_rows, write_csv
from splitwiser.bench import workload, write_workload
from splitwiser.config import EngineConfig, PromptConfig, SamplingConfig
from splitwiser.engine import Choice, make_engine
from splitwiser.job import run
from splitwiser.plan import slot_length

NEW = 12


def generations(out) -> dict[tuple[str, int], dict]:
    table = pq.read_table(out / "generations.parquet").to_pylist()
    return {(row["id"], row["sample"]): row for row in table}


def job(out, *overrides: str, rows: int = 6) -> dict:
    run(job_config(f"data.limit={rows}", f"engine.max_new_tokens={NEW}", f"output.dir={out}", *overrides))
    return generations(out)


@pytest.fixture(scope="module")
def workload_csv(tmp_path_factory):
    return write_workload(SAMPLE, 5, tmp_path_factory.mktemp("w") / "w.csv")


@pytest.fixture(scope="module")
def requests(default_model, workload_csv):
    return workload(default_model, workload_csv, PromptConfig())


def engine_outputs(model, requests, sampling: SamplingConfig, batch_size: int = 4) -> dict:
    length = slot_length(max(r.prompt_tokens for r in requests), NEW)
    engine = make_engine(model, EngineConfig(batch_size=batch_size, max_new_tokens=NEW), length, len(requests),
                         Choice(sampling, not sampling.greedy))
    return {g.request.id: g for g in engine.run(requests)}


def hf_generate(model, request, **options) -> list[int]:
    prompt = torch.tensor([request.input_ids])
    output = model.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                                  do_sample=False, pad_token_id=model.tokenizer.pad_token_id, **options)
    return output[0, prompt.shape[1]:].tolist()


def test_the_repetition_penalty_equals_generate_on_each_prompt(default_model, requests):
    sampling = SamplingConfig(repetition_penalty=1.3)
    ours = engine_outputs(default_model, requests, sampling)
    plain = engine_outputs(default_model, requests, SamplingConfig())
    for request in requests:
        expected = hf_generate(default_model, request, repetition_penalty=1.3)
        assert ours[request.id].token_ids == expected[:len(ours[request.id].token_ids)], request.id
    assert any(ours[r.id].token_ids != plain[r.id].token_ids for r in requests)  # the penalty did something


def test_logprobs_are_the_models_own(default_model, requests):
    """Each output token's log-probability, summed, is the sequence's log-probability as a forward pass of the
    prompt and the output computes it."""
    ours = engine_outputs(default_model, requests, SamplingConfig(temperature=0.9, logprobs=True))
    for request in requests:
        generation = ours[request.id]
        ids = torch.tensor([request.input_ids + generation.token_ids])
        with torch.no_grad():
            logits = default_model.model(ids).logits[0, request.prompt_tokens - 1:-1].float()
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(generation.token_ids)[:, None])[:, 0]
        assert len(generation.logprobs) == len(generation.token_ids)
        assert torch.allclose(torch.tensor(generation.logprobs), expected, atol=1e-3), request.id


def test_stop_strings_cut_where_generate_stops(tmp_path, default_model, workload_csv, requests):
    """The job's tokens end where generate(stop_strings=...) stops, its text before the stop string."""
    stop = [".", "radio", "ligament"]  # greedy, these rows write "radiologist" and "ligaments": stops inside tokens
    out = job(tmp_path, 'sampling.stop=[".", radio, ligament]', f"data.path={workload_csv}", rows=5)
    stopped = 0
    for request in requests:
        row = out[(request.id, 0)]
        expected = hf_generate(default_model, request, stop_strings=stop, tokenizer=default_model.tokenizer)
        assert row["output_token_ids"] == expected, request.id
        assert not any(s in row["generation"] for s in stop)
        if row["finish_reason"] == "stop":
            stopped += 1
            text = default_model.tokenizer.decode(expected, skip_special_tokens=True)
            assert text.startswith(row["generation"]) and any(text[len(row["generation"]):].lstrip().startswith(s) for s in stop)
    assert stopped >= 4


def test_n_samples_per_row_and_nothing_lost(tmp_path, default_model):
    rows = sample_rows(4) + [{**sample_rows(1)[0], "id": "EMPTY", "findings": ""}]
    data = write_csv(tmp_path / "data.csv", rows)
    sampled = ("sampling.temperature=0.8", "sampling.seed=3", f"data.path={data}")
    once = job(tmp_path / "n1", *sampled)
    three = job(tmp_path / "n3", *sampled, "sampling.n=3")
    assert sorted(three) == sorted((row["id"], k) for row in rows[:4] for k in range(3))
    assert all(three[(i, 0)]["output_token_ids"] == once[(i, 0)]["output_token_ids"] for i, _ in once)  # sample 0
    assert all(len({str(three[(row["id"], k)]["output_token_ids"]) for k in range(3)}) > 1 for row in rows[:4])
    errors = pq.read_table(tmp_path / "n3" / "errors.parquet").to_pylist()
    assert [(e["id"], e["sample"]) for e in errors] == [("EMPTY", None)]  # one row-level error: all its samples
    again = run(job_config("data.limit=6", f"engine.max_new_tokens={NEW}", f"output.dir={tmp_path / 'n3'}",
                           *sampled, "sampling.n=3"))
    assert again["runs"][-1]["rows_skipped_done"] == 12 and again["rows"] == {
        "input": 5, "samples_per_row": 3, "ok": 12, "failed": 1}


def test_per_row_max_new_tokens_and_temperature(tmp_path):
    rows = [{**row, "max_tokens": limit, "temp": temperature} for row, limit, temperature in
            zip(sample_rows(5), ["3", "", "5", "0", "x"], ["0", "1.5", "", "0", "0"])]
    data = write_csv(tmp_path / "data.csv", rows)
    columns = (f"data.path={data}", "data.max_new_tokens_column=max_tokens", "data.temperature_column=temp",
               "engine.ignore_eos=true")
    out = job(tmp_path / "per-row", *columns)
    greedy = job(tmp_path / "greedy", f"data.path={data}", "engine.ignore_eos=true")
    assert {i: row["generated_tokens"] for (i, _), row in out.items()} == {
        rows[0]["id"]: 3, rows[1]["id"]: NEW, rows[2]["id"]: 5}
    first = rows[0]["id"]
    assert out[(first, 0)]["output_token_ids"] == greedy[(first, 0)]["output_token_ids"][:3]  # temperature 0
    assert out[(rows[1]["id"], 0)]["output_token_ids"] != greedy[(rows[1]["id"], 0)]["output_token_ids"]
    errors = {e["id"]: e["error"] for e in pq.read_table(tmp_path / "per-row" / "errors.parquet").to_pylist()}
    assert errors == {rows[3]["id"]: f"max_tokens=0: must be 1 to engine.max_new_tokens={NEW}",
                      rows[4]["id"]: "max_tokens='x' is not a whole number"}


def test_split_workers_give_the_same_outputs_with_every_option(tmp_path):
    options = ("sampling.temperature=0.7", "sampling.n=2", "sampling.repetition_penalty=1.2",
               "sampling.logprobs=true", 'sampling.stop=["."]')
    alone = job(tmp_path / "single", *options, rows=4)
    split = job(tmp_path / "split", *options, "mode=split", "procs=2", "engine.batch_size=2", rows=4)
    assert {k: (r["output_token_ids"], r["generation"]) for k, r in split.items()} == {
        k: (r["output_token_ids"], r["generation"]) for k, r in alone.items()}
    for key, row in split.items():
        assert row["output_logprobs"] == pytest.approx(alone[key]["output_logprobs"], abs=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (("sampling.n=0",), "sampling.n=0: must be at least 1"),
    (("sampling.n=3",), "sampling.n=3 with sampling.temperature=0 would write 3 identical greedy generations: "
                        "set sampling.temperature above 0"),
    (("sampling.repetition_penalty=0",), "sampling.repetition_penalty=0.0: must be above 0 (1: off)"),
    (('sampling.stop=[""]',), "sampling.stop=['']: every stop string must be a non-empty string"),
    (("sampling.logprobs=true", "engine.kind=generate"), "sampling.logprobs: only engine.kind=continuous has them"),
    (("data.temperature_column=nope",), "data.temperature_column=nope: no such column; the columns are: "),
])
def test_bad_options_are_one_line_errors(tmp_path, overrides, message):
    result = run_cli(*overrides, f"output.dir={tmp_path}/o")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), \
        result.stderr
    assert not (tmp_path / "o").exists()
