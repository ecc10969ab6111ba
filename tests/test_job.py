"""End to end on the real default model: rows add up, schemas, greedy equality, resume."""

import json
import re
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, job_config, kill_when_parts_written, run_cli, sample_rows, write_csv
from splitwiser.job import run
from splitwiser.output import ERROR_SCHEMA, GENERATION_SCHEMA, TIMING_SCHEMA, OutputDir
from splitwiser.score import SCORE_SCHEMA


def read(out, name):
    return pq.read_table(out / name)


def test_rows_add_up_and_files_have_their_schemas(tmp_path, messy_csv):
    out = tmp_path / "out"
    manifest = run(job_config(f"data.path={messy_csv}", f"output.dir={out}", "engine.max_new_tokens=8",
                              "engine.batch_size=4"))
    generations, timing, errors = (read(out, n) for n in ("generations.parquet", "timing.parquet", "errors.parquet"))
    assert generations.schema.equals(pa.unify_schemas([GENERATION_SCHEMA, SCORE_SCHEMA]))  # scored (the reference)
    assert timing.schema.equals(TIMING_SCHEMA)
    assert errors.schema.equals(ERROR_SCHEMA)
    assert generations.num_rows == 6 and errors.num_rows == 4
    assert sorted(generations["id"].to_pylist()) == sorted(timing["id"].to_pylist())
    reasons = dict(zip(errors["id"].to_pylist(), errors["error"].to_pylist()))
    assert reasons["RAD-00001"].startswith("duplicate id")
    assert reasons["row:7"] == "missing id"
    assert reasons["EMPTY-1"] == reasons["BLANK-1"] == "empty or missing findings"

    rows = generations.to_pylist()
    assert all(r["generation"] and 1 <= r["generated_tokens"] <= 8 for r in rows)
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    assert all(r["generated_tokens"] == len(r["output_token_ids"]) for r in rows)
    assert all(r["reference"] for r in rows)
    for t in timing.to_pylist():
        assert 0 < t["enqueue_ms"] <= t["prefill_start_ms"] < t["first_token_ms"] <= t["finish_ms"]

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest, default=str))
    assert on_disk["rows"] == {"input": 10, "ok": 6, "failed": 4}
    assert on_disk["runs"][0]["generated_tokens"] == sum(r["generated_tokens"] for r in rows)
    assert on_disk["environment"]["device"] == "cpu" and on_disk["weights"] == "pretrained"
    assert on_disk["runs"][0]["devices"] == ["cpu"] and on_disk["runs"][0]["mode"] == "single"
    assert set(timing["gpu"].to_pylist()) == {None}
    assert not list((out / "parts").rglob("*.parquet"))


@pytest.mark.parametrize("engine", ["engine.kind=continuous engine.batch_size=3 engine.prefill_tokens=300",
                                    "engine.kind=continuous engine.batch_size=16",
                                    "engine.kind=generate engine.batch_size=3"])
def test_outputs_equal_plain_generate_token_for_token(tmp_path, default_model, engine):
    """Whatever the engine and batch size (slots reused, several prefill groups, padding), each
    row's tokens are what generate() gives its prompt alone."""
    out = tmp_path / "out"
    run(job_config("data.limit=8", f"output.dir={out}", "engine.max_new_tokens=20", *engine.split()))
    model, tokenizer = default_model.model, default_model.tokenizer
    rows = read(out, "generations.parquet").to_pylist()
    assert len(rows) == 8
    for row in rows:
        ids = tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        assert ids.shape[1] == row["prompt_tokens"]
        assert row["output_token_ids"] == reference_generation(model, ids, 20), row["id"]
        assert row["finish_reason"] == ("stop" if row["output_token_ids"][-1] == tokenizer.eos_token_id else "length")


_references: dict = {}


def reference_generation(model, ids, max_new_tokens):
    key = (id(model), tuple(ids[0].tolist()), max_new_tokens)
    if key not in _references:
        with torch.inference_mode():
            output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        _references[key] = output[0, ids.shape[1]:].tolist()
    return _references[key]


def test_rerun_resumes_without_redoing_or_duplicating(tmp_path):
    out = tmp_path / "out"
    data = write_csv(tmp_path / "d.csv", sample_rows(7))
    common = [f"data.path={data}", f"output.dir={out}", "engine.max_new_tokens=4"]
    run(job_config(*common, "data.limit=3"))
    first = {r["id"]: r for r in read(out, "timing.parquet").to_pylist()}
    manifest = run(job_config(*common))
    timing = {r["id"]: r for r in read(out, "timing.parquet").to_pylist()}
    assert len(timing) == 7 and read(out, "generations.parquet").num_rows == 7
    assert all(timing[i] == first[i] for i in first)  # the first run's rows were not redone
    assert {timing[i]["run"] for i in timing if i not in first} == {1}
    assert [r["rows_generated"] for r in manifest["runs"]] == [3, 4]
    assert manifest["runs"][1]["rows_skipped_done"] == 3
    # A third run has nothing left to do.
    assert run(job_config(*common))["runs"][2]["rows_generated"] == 0


def test_killed_job_resumes_from_its_finished_batches(tmp_path):
    """SIGKILL a real job mid-way: its finished batches survive, the rerun completes every row once."""
    out = tmp_path / "out"
    data = write_csv(tmp_path / "d.csv", sample_rows(12))
    args = [f"data.path={data}", f"output.dir={out}", "engine.batch_size=2", "engine.max_new_tokens=24"]
    survived = kill_when_parts_written(out, 2, *args)
    assert 2 <= survived < 6, "the job should have been killed part-way"
    assert not (out / "generations.parquet").exists()

    manifest = run(job_config(*args))
    generations = read(out, "generations.parquet")
    assert sorted(generations["id"].to_pylist()) == sorted(r["id"] for r in sample_rows(12))
    assert manifest["runs"][-1]["rows_skipped_done"] == 2 * survived
    assert manifest["rows"] == {"input": 12, "ok": 12, "failed": 0}


def test_random_weights_with_ignore_eos_generate_fixed_lengths(tmp_path):
    out = tmp_path / "out"
    manifest = run(job_config("data.limit=4", f"output.dir={out}", "model.weights=random",
                              "engine.ignore_eos=true", "engine.max_new_tokens=6"))
    rows = read(out, "generations.parquet").to_pylist()
    assert [r["generated_tokens"] for r in rows] == [6] * 4
    assert {r["finish_reason"] for r in rows} == {"length"}
    assert manifest["weights"] == "random"


def test_opt_architecture_offline_with_random_weights(tmp_path, default_model):
    """model=opt125m offline: OPT's default config (= opt-125m), a tokenizer given by path, the paper's
    plain prompt; both engines agree token for token."""
    outputs = []
    for kind in ("continuous", "generate"):
        out = tmp_path / kind
        manifest = run(job_config("model=opt125m", "model.weights=random", f"model.tokenizer={default_model.source}",
                                  "data.limit=5", f"output.dir={out}", "engine.max_new_tokens=6", "engine.ignore_eos=true",
                                  "prompt.style=plain", f"engine.kind={kind}", "engine.batch_size=2"))
        assert manifest["rows"]["ok"] == 5
        outputs.append(read(out, "generations.parquet").to_pylist())
    prompts = [r["prompt"] for r in outputs[0]]
    assert all(p.startswith("### findings: ") and p.endswith("### impressions:") for p in prompts)
    assert [r["output_token_ids"] for r in outputs[0]] == [r["output_token_ids"] for r in outputs[1]]


def test_cli_runs_the_default_job_and_reports(tmp_path):
    """Its wall time counts from the launch to the end: Python's start-up, the imports and the config are its first
    stage, merging, writing and scoring its last (finish_s), in job.json as in the manifest."""
    out = tmp_path / "out"
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "jobs.run", "data.limit=2", "engine.max_new_tokens=4",
                             f"output.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "done: 2 rows ok, 0 failed" in result.stderr
    assert "2/2" in result.stderr  # the progress bar
    assert (out / "generations.parquet").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["runs"][-1]["stages"]
    assert 0 < stages["launch_s"] < manifest["wall_s_last_run"] < elapsed
    assert list(stages)[0] == "launch_s" and list(stages)[-1] == "finish_s" and stages["finish_s"] > 0
    # each stage rounded to the millisecond
    assert sum(stages.values()) - 0.01 <= manifest["wall_s_last_run"] <= sum(stages.values()) + 0.05
    assert json.loads((out / "job.json").read_text())["runs"][-1]["wall_s"] == manifest["wall_s_last_run"]
    from_launch = float(re.search(r"; ([0-9.]+) s from launch", result.stderr).group(1))
    assert manifest["wall_s_last_run"] <= from_launch + 0.05 and from_launch < elapsed


def test_dry_run_counts_the_work_and_estimates_it_without_writing(tmp_path):
    """dry_run=true on a directory a job has 4 of 7 rows done in, one row empty: the rows, what a rerun generates
    (the reused and the errors apart), their tokens, and a time at a measured decode rate; nothing written."""
    rows = sample_rows(7)
    rows[5]["findings"] = ""
    data, out = write_csv(tmp_path / "d.csv", rows), tmp_path / "out"
    job = [f"data.path={data}", f"output.dir={out}", "engine.max_new_tokens=5", "engine.batch_size=4"]
    run(job_config(*job, "data.limit=4"))
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    result = run_cli(*job, "dry_run=true")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert (figures["rows"], figures["reused"], figures["requests"], figures["errors"]) == (7, 4, 2, 1)
    assert figures["max_new_tokens"] == 2 * 5 and figures["prompt_tokens"] > 2 * 20
    assert figures["decode_tokens_per_s"] > 0
    assert figures["generate_s_at_most_tokens"] == pytest.approx(10 / figures["decode_tokens_per_s"], abs=0.1)
    assert "dry run: 7 rows, 2 to generate (4 reused, 1 set aside as errors)" in result.stderr
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before
    assert not (tmp_path / "fresh").exists() and run_cli(*job[:1], f"output.dir={tmp_path / 'fresh'}",
                                                          "dry_run=true").returncode == 0
    assert not (tmp_path / "fresh").exists()


def test_answers_of_one_token_end_at_their_first_token_and_every_row_is_generated(tmp_path, default_model):
    """engine.max_new_tokens=1: each batch of requests ends at its prefill, with no request left running; the
    engine still reads and answers every request after it (it once stopped after the first batch, losing the rest
    while the job said done), each with generate's first token."""
    data, out = write_csv(tmp_path / "d.csv", sample_rows(7)), tmp_path / "out"
    manifest = run(job_config(f"data.path={data}", f"output.dir={out}", "engine.max_new_tokens=1",
                              "engine.batch_size=2", "data.reference_column=null"))
    assert manifest["rows"] == {"input": 7, "ok": 7, "failed": 0}
    model, tokenizer = default_model.model, default_model.tokenizer
    for row in pq.read_table(out / "generations.parquet").to_pylist():
        ids = tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        assert row["output_token_ids"] == reference_generation(model, ids, 1), row["id"]


def test_a_wanted_row_with_no_generation_and_no_error_is_recorded_as_an_error(tmp_path):
    """The last net under every engine: merging the outputs, a row the input wants that is neither generated nor
    set aside goes to errors.parquet with its reason (a rerun generates it), never missing from both."""
    data, out = write_csv(tmp_path / "d.csv", sample_rows(3)), tmp_path / "out"
    run(job_config(f"data.path={data}", f"output.dir={out}", "engine.max_new_tokens=2"))
    generated = pq.read_table(out / "generations.parquet", columns=["id", "sample", "prompt"])
    wanted = pa.concat_tables([generated, pa.table({"id": ["ghost"], "sample": pa.array([0], pa.int32()),
                                                    "prompt": ["p"]}, schema=generated.schema)])
    manifest = OutputDir(str(out)).finalize(pa.table({"id": pa.array([], pa.string()),
                                                      "error": pa.array([], pa.string())}),
                                            wanted, {"rows": {"input": 4}})
    assert manifest["rows"] == {"input": 4, "ok": 3, "failed": 1}
    [error] = pq.read_table(out / "errors.parquet").to_pylist()
    assert error["id"] == "ghost" and error["sample"] == 0 and "a rerun generates it" in error["error"]
