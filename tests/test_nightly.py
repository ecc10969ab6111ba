"""The nightly job's recovery and the array merge's checks, without a cluster (tests/test_slurm.py
runs both through the sbatch scripts)."""

from datetime import date

import pyarrow.parquet as pq
import pytest

from conftest import job_config, kill_when_parts_written, sample_rows, write_csv
from splitwiser.errors import UserError
from splitwiser.job import run
from splitwiser.merge import merge_tasks
from splitwiser.nightly import nightly


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
