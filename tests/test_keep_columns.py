"""output.keep_columns (issue 17): source columns copied into generations.parquet typed as in the input (Parquet and
JSON Lines keep their types, CSV is text), through a resume and jobs.merge; and output.format=openai_batch over an
ordinary dataset."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import job_config, run_cli, sample_rows, write_csv
from splitwiser.job import run
from splitwiser.merge import merge_tasks
from splitwiser.output import GENERATION_SCHEMA
from test_errors import assert_user_error

ROWS = [{"id": f"r{i}", "age": 60 + i, "weight": 70.5 + i, "site": s, "urgent": i % 2 == 0, "findings": r["findings"],
         "impression": r["impression"]} for i, (s, r) in enumerate(zip(["north", "south", "east", None], sample_rows(4)))]
KEEP = "output.keep_columns=[age,weight,site,urgent]"
TYPES = {"age": pa.int64(), "weight": pa.float64(), "site": pa.string(), "urgent": pa.bool_()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep")
    pq.write_table(pa.Table.from_pylist(ROWS), root / "rows.parquet")
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    write_csv(root / "rows.csv", [{k: "" if v is None else v for k, v in row.items()} for row in ROWS])
    return root


def kept(out, names=("age", "weight", "site", "urgent")):
    table = pq.read_table(out / "generations.parquet")
    return table.schema, {row["id"]: tuple(row[n] for n in names) for row in table.to_pylist()}


@pytest.mark.parametrize("name", ["rows.parquet", "rows.jsonl"])
def test_kept_columns_keep_their_types(inputs, tmp_path, name):
    run(job_config(f"data.path={inputs / name}", f"output.dir={tmp_path}/out", "engine.max_new_tokens=1", KEEP))
    schema, values = kept(tmp_path / "out")
    assert schema.names[:len(GENERATION_SCHEMA)] == GENERATION_SCHEMA.names
    assert {n: schema.field(n).type for n in TYPES} == TYPES
    assert values == {r["id"]: (r["age"], r["weight"], r["site"], r["urgent"]) for r in ROWS}


def test_csv_columns_are_text(inputs, tmp_path):
    """CSV is read as text, so its kept columns are too (`60`, `70.5`, `True`, an empty cell null); a resume with
    other keep_columns writes those, generating nothing."""
    options = [f"data.path={inputs / 'rows.csv'}", f"output.dir={tmp_path}/out", "engine.max_new_tokens=1"]
    run(job_config(*options, KEEP))
    schema, values = kept(tmp_path / "out")
    assert {schema.field(n).type for n in TYPES} == {pa.string()}
    assert values["r0"] == ("60", "70.5", "north", "True") and values["r3"] == ("63", "73.5", None, "False")
    manifest = run(job_config(*options, "output.keep_columns=[site]"))
    assert manifest["runs"][-1]["rows_generated"] == 0
    schema, values = kept(tmp_path / "out", ("site",))
    assert "age" not in schema.names and values["r1"] == ("south",)


def test_merge_carries_kept_columns_and_results(inputs, tmp_path):
    """Two array tasks into one: the kept columns typed, and results.jsonl (output.format=openai_batch over an
    ordinary dataset: chat.completion lines, custom_id the row's id) in the input's order."""
    for part in (0, 1):
        run(job_config(f"data.path={inputs / 'rows.parquet'}", f"output.dir={tmp_path}/task-{part}", "data.parts=2",
                       f"data.part={part}", "engine.max_new_tokens=1", KEEP, "output.format=openai_batch"))
    merge_tasks(str(tmp_path))
    schema, values = kept(tmp_path)
    assert {n: schema.field(n).type for n in TYPES} == TYPES and values["r3"] == (63, 73.5, None, False)
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [r["id"] for r in ROWS]
    assert {r["response"]["body"]["object"] for r in results} == {"chat.completion"}


def test_keep_column_mistakes_are_one_line(inputs, tmp_path):
    assert_user_error(run_cli(f"data.path={inputs / 'rows.csv'}", f"output.dir={tmp_path}/o",
                              "output.keep_columns=[age,height]"),
                      "output.keep_columns: no column height in the dataset; the columns are: id, age, weight, site")
    assert_user_error(run_cli(f"data.path={inputs / 'rows.csv'}", f"output.dir={tmp_path}/o",
                              "output.keep_columns=[generation]"),
                      "output.keep_columns: generation is a column of generations.parquet already")
    assert not (tmp_path / "o").exists()
