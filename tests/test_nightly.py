"""The nightly job's recovery and the array merge's checks, without a cluster (tests/test_slurm.py
runs both through the sbatch scripts)."""

import json
from datetime import date

import pyarrow.parquet as pq
import pytest

from conftest import job_config, kill_when_parts_written, run_cli, sample_rows, write_csv
from splitwiser.errors import UserError
from splitwiser.job import run
from splitwiser.merge import merge_tasks
from splitwiser.nightly import latest, nightly
from test_constrained import URGENT


def test_a_killed_night_is_finished_by_the_next_run(tmp_path):
    data = write_csv(tmp_path / "reports.csv", sample_rows(10))
    root = tmp_path / "nightly"
    overrides = [f"data.path={data}", f"output.dir={root}", "engine.batch_size=2", "engine.max_new_tokens=16"]
    survived = kill_when_parts_written(root, 1, *overrides, "output.progress=false",
                                       module="jobs.nightly")
    assert survived >= 1 and not (root / "ledger.parquet").exists()
    [partition] = [p for p in root.iterdir() if p.is_dir()]  # beside it: the root's .lock

    manifests = nightly(job_config(*overrides), date(2026, 11, 24))
    assert len(manifests) == 1, "the unfinished partition is resumed, and no row is new"
    assert manifests[0]["runs"][-1]["rows_skipped_done"] == 2 * survived
    generated = pq.read_table(partition / "generations.parquet")["id"].to_pylist()
    assert sorted(generated) == sorted(r["id"] for r in sample_rows(10))
    assert pq.read_table(root / "ledger.parquet").num_rows == 10
    assert nightly(job_config(*overrides), date(2026, 11, 24)) == []


def test_merge_refuses_a_part_that_is_missing(tmp_path):
    common = ["data.limit=6", "engine.max_new_tokens=2", "data.parts=2"]
    run(job_config(*common, "data.part=0", f"output.dir={tmp_path / 'task-0'}"))
    with pytest.raises(UserError, match=r"parts \[1\] of 2 have no task directory"):
        merge_tasks(str(tmp_path))
    (tmp_path / "task-1").mkdir()
    with pytest.raises(UserError, match="task-1: the task has not finished"):
        merge_tasks(str(tmp_path))
    with pytest.raises(UserError, match="data.part=2: must be 0 to data.parts-1"):
        job_config("data.part=2", "data.parts=2")


def test_latest_has_each_id_once_from_the_last_night_that_generated_it(tmp_path):
    rows, data, root = sample_rows(4), tmp_path / "reports.csv", tmp_path / "nightly"
    overrides = [f"data.path={data}", f"output.dir={root}", "engine.max_new_tokens=2"]
    night = lambda day: nightly(job_config(*overrides), date(2026, 11, day))  # noqa: E731
    write_csv(data, rows)
    assert len(night(24)) == 1
    changed = {**rows[1], "findings": rows[1]["findings"] + " Addendum: no change."}
    write_csv(data, [rows[0], changed, *rows[2:]])
    assert len(night(25)) == 1

    result = run_cli(f"dir={root}", f"out={tmp_path / 'latest.parquet'}", module="jobs.latest")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{tmp_path / 'latest.parquet'}: 4 ids")
    table = pq.read_table(tmp_path / "latest.parquet")
    assert sorted(table["id"].to_pylist()) == sorted(r["id"] for r in rows), "each id once"
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert [by_id[r["id"]]["partition"] for r in rows] == ["2026-11-24", "2026-11-25", "2026-11-24", "2026-11-24"]
    assert "Addendum" in by_id[rows[1]["id"]]["prompt"] and by_id[rows[1]["id"]]["generation"]

    # The report changed back is new again; a report whose new text fails keeps its earlier generation.
    write_csv(data, [rows[0], rows[1], {**rows[2], "findings": " "}, rows[3]])
    assert len(night(26)) == 1
    written = latest(str(root))
    assert written == {"path": str(root / "latest.parquet"), "ids": 4, "partitions": 3, "superseded": 1}
    by_id = {r["id"]: r for r in pq.read_table(root / "latest.parquet").to_pylist()}
    assert [by_id[r["id"]]["partition"] for r in rows] == ["2026-11-24", "2026-11-26", "2026-11-24", "2026-11-24"]
    assert "Addendum" not in by_id[rows[1]["id"]]["prompt"]


def test_latest_refuses_a_directory_that_is_no_nightly_root(tmp_path):
    with pytest.raises(UserError, match=r"^dir=\S+/missing: no such directory$"):
        latest(str(tmp_path / "missing"))
    with pytest.raises(UserError, match=r"is no nightly root: it has no ledger.parquet"):
        latest(str(tmp_path))
    (tmp_path / "generations.parquet").touch()
    with pytest.raises(UserError, match=r"is no nightly root: it holds one job's outputs"):
        latest(str(tmp_path))


def test_constrained_nights_generate_only_changed_rows_and_keep_parsed_answers(tmp_path):
    """sampling.json_schema through the nightly job: the second night generates the changed report alone, and
    latest.parquet holds every id's answer with its parsed value."""
    schema = tmp_path / "urgent.json"
    schema.write_text(json.dumps(URGENT))
    rows, data, root = sample_rows(3), tmp_path / "reports.csv", tmp_path / "nightly"
    overrides = [f"data.path={data}", f"output.dir={root}", "engine.max_new_tokens=16", f"sampling.json_schema={schema}"]
    write_csv(data, rows)
    [first] = nightly(job_config(*overrides), date(2026, 11, 24))
    write_csv(data, [{**rows[0], "findings": rows[0]["findings"] + " Addendum: no change."}, *rows[1:]])
    [second] = nightly(job_config(*overrides), date(2026, 11, 25))
    assert first["rows"]["ok"] == 3 and second["rows"] == {"input": 1, "ok": 1, "failed": 0}
    table = pq.read_table(latest(str(root))["path"])
    assert table.num_rows == 3 and "parsed" in table.column_names
    for row in table.to_pylist():
        assert row["parsed"] == json.loads(row["generation"]) and isinstance(row["parsed"]["urgent"], bool)
