"""Constrained answers (sampling.json_schema, regex, choice; data.json_schema_column), on the CPU with the real
default model: every answer parses and validates against its schema, greedy and sampled; the engine's greedy
tokens are the model's most likely tokens the grammar accepts (checked against generate with llguidance's own
check of each candidate); unconstrained rows beside constrained ones keep their tokens; bad schemas are refused
before the model loads, or go to errors.parquet per row; an answer cut short never reaches generations.parquet."""

import json
import re

import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import ROOT, SAMPLE, job_config, run_cli, sample_rows, write_csv
from splitwiser.config import EngineConfig, PromptConfig, SamplingConfig
from splitwiser.bench import workload, write_workload
from splitwiser.engine import Choice, eos_ids, grammars_of, make_engine
from splitwiser.grammar import incomplete
from splitwiser.job import run
from splitwiser.merge import merge_tasks
from splitwiser.plan import slot_length

SCHEMA_PATH = ROOT / "data" / "radiology.schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text())
URGENT = {"type": "object", "properties": {"urgent": {"type": "boolean"}}, "required": ["urgent"],
          "additionalProperties": False}
NEW = 128


def outputs(out) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(out / "generations.parquet").to_pylist()}


def errors(out) -> dict[str, str]:
    return {row["id"]: row["error"] for row in pq.read_table(out / "errors.parquet").to_pylist()}


def job(out, rows: int, *overrides: str) -> dict[str, dict]:
    run(job_config(f"data.limit={rows}", f"engine.max_new_tokens={NEW}", f"output.dir={out}", *overrides))
    return outputs(out)


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_every_answer_validates_against_the_schema(tmp_path, temperature):
    rows = job(tmp_path, 20, f"sampling.json_schema={SCHEMA_PATH}", f"sampling.temperature={temperature}")
    assert len(rows) == 20 and not errors(tmp_path)
    for row in rows.values():
        value = json.loads(row["generation"])
        jsonschema.validate(value, SCHEMA)
        assert row["parsed"] == value and row["finish_reason"] == "stop"
    assert len({row["generation"] for row in rows.values()}) > 10  # answers of their own reports, not one template


def test_a_sampled_constrained_answer_does_not_depend_on_the_batch(tmp_path):
    settings = (f"sampling.json_schema={SCHEMA_PATH}", "sampling.temperature=0.8")
    two = job(tmp_path / "two", 6, *settings, "engine.batch_size=2")
    eight = job(tmp_path / "eight", 6, *settings, "engine.batch_size=8")
    assert {k: r["output_token_ids"] for k, r in two.items()} == {k: r["output_token_ids"] for k, r in eight.items()}


class MostLikelyAccepted(LogitsProcessor):
    """generate's reference for one prompt: the most likely token that llguidance's matcher allows (its own
    bitmask of one matcher, unpacked here: not the engine's batched masks)."""

    def __init__(self, matcher, prompt_tokens: int):
        self.matcher, self.prompt_tokens = matcher, prompt_tokens

    def __call__(self, input_ids, scores):
        new = input_ids[0, self.prompt_tokens:].tolist()
        if new:
            assert self.matcher.consume_token(new[-1])
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(bits[:scores.shape[-1]].astype(bool))
        return scores.masked_fill(~allowed, float("-inf"))


def test_greedy_constrained_tokens_are_the_most_likely_the_grammar_accepts(tmp_path, default_model):
    requests = workload(default_model, write_workload(SAMPLE, 4, tmp_path / "w.csv"), PromptConfig())
    sampling = SamplingConfig(json_schema=str(SCHEMA_PATH))
    length = slot_length(max(r.prompt_tokens for r in requests), NEW)
    engine = make_engine(default_model, EngineConfig(batch_size=2, max_new_tokens=NEW), length, len(requests),
                         Choice(sampling, constrained=True))
    ours = {g.request.id: g.token_ids for g in engine.run(requests)}
    grammars = grammars_of(default_model, Choice(sampling, constrained=True))
    for request in requests:
        prompt = torch.tensor([request.input_ids])
        processor = MostLikelyAccepted(grammars.matcher(sampling.grammar), request.prompt_tokens)
        output = default_model.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                                              do_sample=False, pad_token_id=default_model.tokenizer.pad_token_id,
                                              eos_token_id=sorted(eos_ids(default_model)),
                                              logits_processor=LogitsProcessorList([processor]))
        assert ours[request.id] == output[0, request.prompt_tokens:].tolist(), request.id


def test_a_refused_token_ends_its_request_with_the_reason_not_the_job(default_model):
    """A matcher that refuses a token (which its mask should have kept out) stays in error: its mask then allows only
    EOS, so its request ends at the next token, and the request's error says what the grammar library said."""
    grammars = grammars_of(default_model, Choice(SamplingConfig(regex="[0-9]+"), constrained=True))
    matcher = grammars.matcher(grammars.default)
    grammars.defer([matcher], default_model.tokenizer.encode("a"))
    mask = grammars.masks([matcher])[0]
    allowed = np.flatnonzero(np.unpackbits(mask.numpy().view(np.uint8), bitorder="little"))
    assert allowed.tolist() == sorted(eos_ids(default_model))
    error = incomplete(matcher, "stop", 2)
    assert error.startswith("its grammar refused its answer: ") and "\n" not in error, error
    resumed = grammars.matcher(grammars.default, default_model.tokenizer.encode("7a"))  # after a preemption
    assert incomplete(resumed, "length", 2).startswith("its grammar refused its answer: ")
    assert incomplete(grammars.matcher(grammars.default, default_model.tokenizer.encode("7")), "stop", 1) is None


def test_a_regex_and_a_choice(tmp_path):
    regex = r"(Normal|Abnormal)\. [A-Z][a-z ,]{2,60}\."
    for answer in job(tmp_path / "regex", 8, f"sampling.regex='{regex}'").values():
        assert re.fullmatch(regex, answer["generation"]), answer["generation"]
    choices = ["normal", "abnormal", "indeterminate"]
    answers = job(tmp_path / "choice", 8, f"sampling.choice=[{','.join(choices)}]")
    assert len(answers) == 8 and {a["generation"] for a in answers.values()} <= set(choices)
    assert "parsed" not in next(iter(answers.values()))


def test_per_row_schemas_beside_unconstrained_rows(tmp_path):
    """A row's schema from its column; a row with an empty cell generates what it would without constraints (the
    same tokens), and a row with a schema llguidance refuses goes to errors.parquet with the reason."""
    schemas = [json.dumps(SCHEMA), json.dumps(URGENT), "", '{"type": "nope"}'] * 2
    data = write_csv(tmp_path / "d.csv", [row | {"schema": schema} for row, schema in zip(sample_rows(8), schemas)])
    short = (f"data.path={data}", "engine.batch_size=4", "engine.max_new_tokens=64")
    rows = job(tmp_path / "rows", 8, *short, "data.json_schema_column=schema")
    plain = job(tmp_path / "plain", 8, *short)
    failed = errors(tmp_path / "rows")
    assert len(rows) == 6 and len(failed) == 2
    assert all(e.startswith("schema: llguidance cannot compile it: ") and "nope" in e for e in failed.values())
    for (row_id, row), schema in zip(rows.items(), [s for s in schemas if "nope" not in s]):
        if schema:
            jsonschema.validate(json.loads(row["generation"]), json.loads(schema))
        else:
            assert row["output_token_ids"] == plain[row_id]["output_token_ids"], row_id
    assert "parsed" not in rows[next(iter(rows))]  # per-row schemas differ: the JSON text is the answer


def test_an_answer_cut_short_goes_to_errors_not_generations(tmp_path):
    run(job_config("data.limit=4", "engine.max_new_tokens=6", f"output.dir={tmp_path}",
                   f"sampling.json_schema={SCHEMA_PATH}"))
    assert not outputs(tmp_path)
    assert set(errors(tmp_path).values()) == {"its answer ended (length, 6 tokens) before its constraint was complete"}


@pytest.mark.parametrize("schema, said", [
    ('{"type": "object", "properties": 3}', "properties must be an object"),
    ('{"type": "string", "minLength": 5, "maxLength": 2}', "Unsatisfiable schema"),
    ("{not json", "not valid JSON"),
    ("no/such/schema.json", "neither a JSON schema"),
])
def test_a_schema_that_cannot_compile_is_one_line_before_the_model_loads(tmp_path, schema, said):
    result = run_cli(f"sampling.json_schema='{schema}'", f"output.dir={tmp_path / 'out'}", "data.limit=2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: sampling.json_schema")
    assert said in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_expand_json_gives_each_property_a_column(tmp_path):
    rows = job(tmp_path, 4, f"sampling.json_schema={SCHEMA_PATH}", "output.expand_json=true")
    table = pq.read_table(tmp_path / "generations.parquet")
    assert {"impression", "urgent", "findings"} <= set(table.column_names) and "parsed" not in table.column_names
    for row in rows.values():
        assert {k: row[k] for k in SCHEMA["properties"]} == json.loads(row["generation"])


WORKERS_SETTINGS = (f"sampling.json_schema={SCHEMA_PATH}", "engine.batch_size=2")


@pytest.fixture(scope="module")
def single_answers(tmp_path_factory):
    return job(tmp_path_factory.mktemp("single"), 6, *WORKERS_SETTINGS)


@pytest.mark.parametrize("mode", ["colocated", "split"])
def test_workers_give_the_single_process_answers(tmp_path, single_answers, mode):
    workers = job(tmp_path, 6, *WORKERS_SETTINGS, "procs=2", f"mode={mode}")
    assert {k: r["generation"] for k, r in workers.items()} == {k: r["generation"] for k, r in single_answers.items()}



def test_array_tasks_and_a_rerun_keep_the_parsed_answers(tmp_path):
    """data.parts: each task's parsed column, the rerun of a finished task (nothing generated) and jobs.merge's
    merged file keep the answers' values, typed by the schema."""
    for part in (0, 1):
        job(tmp_path / f"task-{part}", 6, f"sampling.json_schema={SCHEMA_PATH}", "data.parts=2", f"data.part={part}")
    rerun = job(tmp_path / "task-0", 6, f"sampling.json_schema={SCHEMA_PATH}", "data.parts=2", "data.part=0")
    merge_tasks(str(tmp_path))
    merged = pq.read_table(tmp_path / "generations.parquet")
    assert merged.num_rows == 6 and str(merged.schema.field("parsed").type) == (
        "struct<impression: string, urgent: bool, findings: list<element: string>>")
    for row in merged.to_pylist():
        assert row["parsed"] == json.loads(row["generation"])
    assert {k: r["parsed"] for k, r in rerun.items()} == {r["id"]: r["parsed"] for r in merged.to_pylist() if r["id"] in rerun}
