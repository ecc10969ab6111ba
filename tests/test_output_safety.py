"""The output directory: nothing but the job's own files is ever deleted, one job at a time, and what a
resume takes in is this job's, for the input as it is now (issue 14: overwrite, identity, lock, parts)."""

import errno
import fcntl
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import job_config, kill_when_parts_written, run_cli, sample_rows, write_csv
from splitwiser.errors import UserError
from splitwiser.job import run
from splitwiser.output import atomic_write

FAST = "engine.max_new_tokens=4"


def one_line_error(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


def ids(out, name="generations.parquet") -> list[str]:
    return sorted(pq.read_table(out / name)["id"].to_pylist())


def test_overwrite_never_deletes_files_splitwiser_did_not_write(tmp_path):
    user = tmp_path / "u"
    (user / "sub").mkdir(parents=True)
    (user / "precious.txt").write_text("x")
    data = write_csv(user / "data.csv", sample_rows(2))
    error = one_line_error(run_cli(f"data.path={data}", f"output.dir={user}", "output.overwrite=true", FAST))
    assert "holds files Splitwiser did not write" in error and "data.csv" in error
    assert sorted(p.name for p in user.iterdir()) == ["data.csv", "precious.txt", "sub"]
    home = one_line_error(run_cli(f"data.path={data}", "output.dir=/", "output.overwrite=true", FAST))
    assert "holds files Splitwiser did not write" in home


def test_overwrite_happens_only_after_every_check_passed(tmp_path):
    data = write_csv(tmp_path / "d.csv", sample_rows(2))
    out = tmp_path / "o"
    run(job_config(f"data.path={data}", f"output.dir={out}", FAST))
    before = (out / "generations.parquet").read_bytes()
    typo = run_cli(f"data.path={data}", f"output.dir={out}", "output.overwrite=true", "data.text_column=findngs", FAST)
    assert "no such column" in one_line_error(typo)
    assert (out / "generations.parquet").read_bytes() == before
    manifest = run(job_config(f"data.path={data}", f"output.dir={out}", "output.overwrite=true",
                              "engine.max_new_tokens=3"))
    assert manifest["rows"] == {"input": 2, "ok": 2, "failed": 0} and len(manifest["runs"]) == 1
    assert max(pq.read_table(out / "generations.parquet")["generated_tokens"].to_pylist()) <= 3


def test_a_refused_run_writes_nothing(tmp_path):
    for overrides in (["data.path=nope.csv"], ["data.text_column=nope"], ["model=opt125m"],
                      ["engine.max_new_tokens=100000000"], ["engine.kv_tokens=100000000000"]):
        result = run_cli(*overrides, f"output.dir={tmp_path}/o")
        one_line_error(result)
        assert not (tmp_path / "o").exists(), overrides


def test_max_new_tokens_over_the_context_is_one_line(tmp_path):
    error = one_line_error(run_cli("data.limit=1", "engine.max_new_tokens=9000", f"output.dir={tmp_path}/o"))
    assert "engine.max_new_tokens=9000: the model's context is 8192 tokens" in error


def test_a_killed_first_run_already_names_its_job(tmp_path):
    """The job's identity is on disk before its first part: a resume with other settings is refused even
    when the killed run wrote no manifest, and even when the manifest is deleted."""
    data = write_csv(tmp_path / "d.csv", sample_rows(12))
    out = tmp_path / "o"
    args = [f"data.path={data}", f"output.dir={out}", "engine.batch_size=2", "engine.max_new_tokens=24"]
    assert kill_when_parts_written(out, 1, *args) >= 1
    assert not (out / "manifest.json").exists()
    other = run_cli(*args[:-1], "engine.max_new_tokens=4")
    assert "holds results of a different job (changed: max_new_tokens)" in one_line_error(other)

    manifest = run(job_config(*args))
    assert manifest["rows"] == {"input": 12, "ok": 12, "failed": 0}
    first, second = manifest["runs"]  # the killed run is recorded, unfinished; each run has its own index
    assert first["finished"] is False and second["finished"] is True and "wall_s" not in first
    assert second["rows_skipped_done"] >= 2
    assert set(pq.read_table(out / "timing.parquet")["run"].to_pylist()) == {0, 1}
    (out / "manifest.json").unlink()
    refused = run_cli(*args[:-1], "engine.max_new_tokens=4")
    assert "holds results of a different job" in one_line_error(refused)


def test_the_outputs_follow_the_input_as_it_is_now(tmp_path):
    """Rows removed from the input leave the outputs, a changed text is generated again, a smaller
    data.limit gives a smaller output: rows in = generations + errors, every run."""
    rows = sample_rows(6)
    data = write_csv(tmp_path / "d.csv", rows)
    out = tmp_path / "o"
    common = [f"data.path={data}", f"output.dir={out}", FAST]
    run(job_config(*common))
    old = {r["id"]: r for r in pq.read_table(out / "generations.parquet").to_pylist()}

    changed = [{**rows[0], "findings": "No acute cardiopulmonary process."}, *rows[1:5]]  # rows[5] removed
    write_csv(data, changed)
    manifest = run(job_config(*common))
    new = {r["id"]: r for r in pq.read_table(out / "generations.parquet").to_pylist()}
    assert sorted(new) == sorted(r["id"] for r in changed)
    assert "No acute cardiopulmonary process." in new[rows[0]["id"]]["prompt"]
    assert all(new[r["id"]] == old[r["id"]] for r in rows[1:5])  # kept, not redone
    assert manifest["runs"][-1]["rows_generated"] == 1 and manifest["runs"][-1]["rows_skipped_done"] == 4
    assert manifest["rows"] == {"input": 5, "ok": 5, "failed": 0}

    manifest = run(job_config(*common, "data.limit=2"))
    assert manifest["rows"] == {"input": 2, "ok": 2, "failed": 0} and len(ids(out)) == 2


def test_a_second_job_into_a_locked_directory_is_refused(tmp_path):
    data = write_csv(tmp_path / "d.csv", sample_rows(1))
    out = tmp_path / "o"
    out.mkdir()
    with (out / ".lock").open("w") as lock:  # as a running job holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242")
        lock.flush()
        error = one_line_error(run_cli(f"data.path={data}", f"output.dir={out}", FAST))
    assert "is in use by another job (pid 4242)" in error
    assert run_cli(f"data.path={data}", f"output.dir={out}", FAST).returncode == 0  # released: runs


def test_unreadable_parts_foreign_parts_and_stale_temp_files(tmp_path):
    """A part cut short is moved aside and its rows generated again; a part that another job wrote (a
    worker that outlived it) is never taken in; temporary files of dead runs are removed."""
    data = write_csv(tmp_path / "d.csv", sample_rows(12))
    out = tmp_path / "o"
    args = [f"data.path={data}", f"output.dir={out}", "engine.batch_size=2", "engine.max_new_tokens=24"]
    assert kill_when_parts_written(out, 2, *args) >= 2
    parts = sorted((out / "parts").glob("*.parquet"))
    cut = parts[0].read_bytes()
    parts[0].write_bytes(cut[: len(cut) // 2])
    foreign = pq.read_table(parts[1])
    foreign = foreign.set_column(foreign.schema.get_field_index("generation"), "generation",
                                 pa.array(["FOREIGN"] * foreign.num_rows))
    pq.write_table(foreign.replace_schema_metadata({b"splitwiser.job_id": b"another-job"}), out / "parts" / "f.parquet")
    (out / ".generations.parquet.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"half")

    manifest = run(job_config(*args))
    assert manifest["rows"] == {"input": 12, "ok": 12, "failed": 0}
    assert manifest["runs"][-1]["corrupt_parts_moved_aside"] == [parts[0].name]
    assert (out / "parts" / "corrupt" / parts[0].name).exists()
    assert "FOREIGN" not in pq.read_table(out / "generations.parquet")["generation"].to_pylist()
    assert not list(out.glob(".*.tmp"))
    assert ids(out) == sorted(r["id"] for r in sample_rows(12))
    assert json.loads((out / "job.json").read_text())["runs"][-1]["finished"] is True
    assert sorted(os.listdir(out / "parts")) == ["corrupt", "errors"]


def test_a_write_whose_clean_up_fails_too_says_the_write_error(tmp_path):
    """A file system gone read-only mid-job: the temporary file cannot be removed either (here: it is a directory,
    which unlink refuses). The job's one line is the write's error, naming the path; the old file is intact."""
    target = tmp_path / "part.parquet"
    target.write_text("kept")

    def write(tmp):
        tmp.mkdir()
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with pytest.raises(UserError, match=f"cannot write {target}: Read-only file system"):
        atomic_write(target, write)
    assert target.read_text() == "kept"
