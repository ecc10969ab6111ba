"""Faults met while generating (out of memory, a full disk): the job goes on or stops cleanly, and every
row ends up once, as a generation or as an error with its reason."""

import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, job_config, run_cli, sample_rows, write_csv
from splitwiser.job import run


def outputs(out) -> dict[str, list[int]]:
    table = pq.read_table(out / "generations.parquet")
    return dict(zip(table["id"].to_pylist(), table["output_token_ids"].to_pylist()))


def errors(out) -> dict[str, str]:
    table = pq.read_table(out / "errors.parquet")
    return dict(zip(table["id"].to_pylist(), table["error"].to_pylist()))


@pytest.fixture(scope="module")
def long_row_csv(tmp_path_factory):
    """Eight sample rows and one whose prompt (~1,650 tokens) is far longer than the others (~100)."""
    rows = sample_rows(8)
    rows.append({**rows[0], "id": "LONG-1", "findings": " ".join([rows[0]["findings"]] * 20)})
    return write_csv(tmp_path_factory.mktemp("data") / "long.csv", rows)


@pytest.fixture(scope="module")
def uncapped(long_row_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("uncapped")
    run(job_config(f"data.path={long_row_csv}", f"output.dir={out}", "engine.max_new_tokens=8"))
    return outputs(out)


# Caps (MB of estimated forward memory, runner.forward_bytes) that a batch of the short prompts exceeds
# (workers get units of 2 rows), one short prompt fits, and the long prompt does not fit even alone.
# generate's estimate includes its KV cache.
@pytest.mark.parametrize("engine, overrides", [
    ("continuous", ["engine.memory_cap_mb=8"]),
    ("generate", ["engine.memory_cap_mb=24"]),
    ("continuous", ["engine.memory_cap_mb=4", "procs=2"]),
    ("continuous", ["engine.memory_cap_mb=4", "mode=split", "procs=2"]),
])
def test_out_of_memory_splits_the_batch_and_sets_aside_what_never_fits(tmp_path, long_row_csv, uncapped, engine,
                                                                       overrides):
    manifest = run(job_config(f"data.path={long_row_csv}", f"output.dir={tmp_path}", "engine.max_new_tokens=8",
                              f"engine.kind={engine}", "engine.batch_size=8", *overrides))
    assert manifest["runs"][0]["oom_splits"] >= 1
    assert manifest["rows"] == {"input": 9, "ok": 8, "failed": 1}
    reason = errors(tmp_path)["LONG-1"]
    assert reason.startswith("out of memory with its ") and "-token prompt alone" in reason, reason
    assert "engine.memory_cap_mb=" in reason
    assert outputs(tmp_path) == {k: v for k, v in uncapped.items() if k != "LONG-1"}
    assert not list((tmp_path / "parts").rglob("*.parquet"))


def test_a_rerun_without_the_cap_generates_what_did_not_fit(tmp_path, long_row_csv, uncapped):
    common = [f"data.path={long_row_csv}", f"output.dir={tmp_path}", "engine.max_new_tokens=8"]
    run(job_config(*common, "engine.memory_cap_mb=8"))
    assert set(errors(tmp_path)) == {"LONG-1"}
    manifest = run(job_config(*common))
    assert manifest["runs"][1]["rows_generated"] == 1 and manifest["runs"][1]["rows_skipped_done"] == 8
    assert manifest["rows"] == {"input": 9, "ok": 9, "failed": 0}
    assert errors(tmp_path) == {} and outputs(tmp_path) == uncapped
    assert json.loads((tmp_path / "manifest.json").read_text())["rows"]["failed"] == 0


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1 MB: a disk that really fills up (root only; in CI, where the tests run as root, required)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"cannot mount a small tmpfs: {mounted.stderr.strip()}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk) -> None:
    try:
        with open(disk / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:  # no space left
        pass


def test_a_disk_too_small_for_the_outputs_is_refused_before_any_work(tmp_path, small_disk):
    data = write_csv(tmp_path / "d.csv", sample_rows(40))
    (small_disk / "other-files").write_bytes(b"\0" * (1024 - 16) * 1024)  # 16 KB left
    result = run_cli(f"data.path={data}", f"output.dir={small_disk}/o", "engine.max_new_tokens=64")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "the job's outputs need at least" in result.stderr.strip().splitlines()[-1]
    assert not (small_disk / "o" / "shards").exists()


def test_a_full_disk_stops_the_job_cleanly_and_a_rerun_resumes(tmp_path, small_disk):
    """The disk fills up while the job runs: one clear line, every part file already written is intact,
    and once there is room again the rerun finishes the rest."""
    data = write_csv(tmp_path / "d.csv", sample_rows(40))
    out = small_disk / "o"
    args = [f"data.path={data}", f"output.dir={out}", "engine.max_new_tokens=16", "engine.batch_size=4"]
    job = subprocess.Popen([sys.executable, "-m", "jobs.run", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(list(out.glob("parts/*.parquet"))) < 2 and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    fill(small_disk)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 2 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert "No space left on device" in last and "rerun the job to resume" in last, last

    parts = list(out.glob("parts/*.parquet"))
    kept = sum(pq.read_table(p).num_rows for p in parts)  # every part readable: none half-written
    assert 8 <= kept < 40
    assert not list(out.rglob("*.tmp"))
    (small_disk / "filler").unlink()

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][0]["finished"] is False  # the run the full disk stopped
    assert manifest["runs"][-1]["rows_skipped_done"] == kept
    assert manifest["rows"] == {"input": 40, "ok": 40, "failed": 0}
    assert sorted(pq.read_table(out / "generations.parquet")["id"].to_pylist()) == sorted(r["id"] for r in sample_rows(40))
