"""Files that fail under a job (issue 29): the output directory read-only from the start, turned read-only or
removed while the job runs; the input's directory read-only; the model's files cut short, corrupt or removed,
before the job or while it runs. Every time the job ends in one line `error: ...` naming the path and the cause,
without a traceback; the rows reported done are readable, and the rerun, once the cause is gone, completes with
every row once.

A read-only file system is a read-only bind mount (`mount --bind -o ro`), as a disk the kernel remounts read-only
after an error: the tests run as root, for whom chmod stops no write. Like tests/test_faults.py's small disk it
needs root: without it the tests skip (in CI, where they run as root, they fail)."""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, job_config, run_cli, sample_rows, write_csv
from splitwiser.config import ModelConfig
from splitwiser.errors import UserError
from splitwiser.job import run
from splitwiser.models import load_model, locate

ROWS = 6
FAST = ["engine.max_new_tokens=8", "engine.batch_size=2"]  # a part file every 2 rows: the job is caught midway


def mount_read_only(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(directory)], capture_output=True,
                          text=True)


@contextlib.contextmanager
def read_only(directory: Path):
    """`directory` on a read-only file system while the block runs (a bind mount of itself over itself)."""
    mounted = mount_read_only(directory)
    assert mounted.returncode == 0, mounted.stderr
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)  # -l: a reader that lingers does not fail it


@pytest.fixture(scope="module", autouse=True)
def can_mount(tmp_path_factory):
    probe = tmp_path_factory.mktemp("probe")
    mounted = mount_read_only(probe)
    if mounted.returncode != 0:
        message = f"cannot bind-mount a directory read-only: {mounted.stderr.strip()}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    subprocess.run(["umount", str(probe)], check=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "d.csv", sample_rows(ROWS))


@pytest.fixture(scope="module")
def model_dir(default_model) -> Path:
    """The converted default model: config.json, tokenizer files and model.safetensors."""
    return Path(default_model.source)


def model_copy(model_dir: Path, to: Path, copied=("model.safetensors",)) -> Path:
    """A model directory of links to model_dir's files, but for `copied`: their own copies, free to be broken."""
    to.mkdir()
    for file in model_dir.iterdir():
        (shutil.copyfile if file.name in copied else os.link)(file, to / file.name)
    return to


def one_line_error(stderr: str, status: int, returncode: int) -> str:
    assert returncode == status and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr
    return last


def start_job(*overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.run", *overrides], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for_a_part(job: subprocess.Popen, out: Path) -> None:
    deadline = time.time() + 300
    while not list(out.glob("parts/*.parquet")) and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be caught midway"


def rows_in_parts(out: Path) -> int:
    return sum(pq.read_table(p).num_rows for p in out.glob("parts/*.parquet"))  # every part readable


def all_rows_once(out: Path) -> bool:
    return sorted(pq.read_table(out / "generations.parquet")["id"].to_pylist()) == sorted(
        r["id"] for r in sample_rows(ROWS))


# The output directory


def test_a_read_only_output_dir_is_refused_before_any_work(tmp_path, data):
    with read_only(tmp_path):
        result = run_cli(f"data.path={data}", f"output.dir={tmp_path}", *FAST)
        last = one_line_error(result.stderr, 2, result.returncode)
        assert last == f"error: output.dir={tmp_path} is not writable: {tmp_path} is on a read-only file system"
        said = f"output.dir={tmp_path}/o is not writable: {tmp_path} is on a read-only file system"
        with pytest.raises(UserError, match="^" + re.escape(said)):
            run(job_config(f"data.path={data}", f"output.dir={tmp_path}/o", *FAST))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("workers", [[], ["procs=2"]], ids=["one-process", "two-workers"])
def test_an_output_dir_turned_read_only_mid_job_stops_it_and_the_rerun_resumes(tmp_path, data, workers):
    """The one line is the same with worker processes: theirs, not "all workers exited"."""
    out = tmp_path / "o"
    args = [f"data.path={data}", f"output.dir={out}", *FAST, *workers]
    job = start_job(*args)
    wait_for_a_part(job, out)
    with read_only(out):
        _, stderr = job.communicate(timeout=300)
        last = one_line_error(stderr, 2, job.returncode)
        assert re.fullmatch(f"error: cannot write {re.escape(str(out))}/[^ ]+: Read-only file system; the files "
                            "written before are intact: .* rerun the job to resume", last), last
        kept = rows_in_parts(out)
        assert 2 <= kept < ROWS and not list(out.rglob("*.tmp"))
    manifest = run(job_config(*args))
    assert manifest["runs"][0]["finished"] is False and manifest["runs"][-1]["rows_skipped_done"] == kept
    assert manifest["rows"] == {"input": ROWS, "ok": ROWS, "failed": 0} and all_rows_once(out)


@pytest.mark.parametrize("workers", [[], ["procs=2"]], ids=["one-process", "two-workers"])
def test_an_output_dir_removed_mid_job_ends_in_one_line_and_a_rerun_starts_over(tmp_path, data, workers):
    out = tmp_path / "o"
    args = [f"data.path={data}", f"output.dir={out}", *FAST, *workers]
    job = start_job(*args)
    wait_for_a_part(job, out)
    while out.exists():  # rm -rf: the job may be writing a part meanwhile
        shutil.rmtree(out, ignore_errors=True)
    _, stderr = job.communicate(timeout=300)
    last = one_line_error(stderr, 2, job.returncode)
    assert f"{out} was removed while the job ran" in last and "rerun the job" in last, last
    assert not out.exists()
    manifest = run(job_config(*args))
    assert manifest["runs"][-1]["rows_skipped_done"] == 0
    assert manifest["rows"] == {"input": ROWS, "ok": ROWS, "failed": 0} and all_rows_once(out)


# The input


def test_an_input_dir_read_only_is_only_read(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_csv(inputs / "d.csv", sample_rows(4))
    with read_only(inputs):
        manifest = run(job_config(f"data.path={inputs / 'd.csv'}", f"output.dir={tmp_path / 'o'}", *FAST))
    assert manifest["rows"] == {"input": 4, "ok": 4, "failed": 0}
    assert [p.name for p in inputs.iterdir()] == ["d.csv"]  # nothing written beside the input


# The model's files


def test_a_model_whose_weights_are_cut_short_is_refused_in_one_line(tmp_path, data, model_dir):
    model = model_copy(model_dir, tmp_path / "m", copied=())
    (model / "model.safetensors").unlink()  # a copy that stopped after 1 MB
    with (model_dir / "model.safetensors").open("rb") as f:
        (model / "model.safetensors").write_bytes(f.read(2**20))
    result = run_cli(f"data.path={data}", f"model.path={model}", f"output.dir={tmp_path}/o", *FAST)
    last = one_line_error(result.stderr, 2, result.returncode)
    assert f"{model}/model.safetensors is cut short or corrupt: Error while deserializing header" in last, last
    assert not (tmp_path / "o").exists()


def test_a_corrupt_config_json_is_refused_in_one_line(tmp_path, data, model_dir):
    model = model_copy(model_dir, tmp_path / "m", copied=())
    (model / "config.json").unlink()
    (model / "config.json").write_text('{"model_type": "llama", hidden_size: 576')
    result = run_cli(f"data.path={data}", f"model.path={model}", f"output.dir={tmp_path}/o", *FAST)
    last = one_line_error(result.stderr, 2, result.returncode)
    assert f"{model}/config.json is not valid JSON (cut short or corrupt?)" in last, last
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("broken, said", [
    ("tokenizer.json", "tokenizer.json is not valid JSON (cut short or corrupt?)"),
    ("-config.json", "config.json: no such file"),
    ("-tokenizer.json", "no tokenizer file in"),
    ("-model.safetensors", "no file named model.safetensors"),
])
def test_every_model_file_cut_short_or_missing_is_named(tmp_path, model_dir, broken, said):
    """name: that file cut to half its size; -name: that file removed."""
    model = model_copy(model_dir, tmp_path / "m", copied=())
    name = broken.removeprefix("-")
    (model / name).unlink()
    if not broken.startswith("-"):
        with (model_dir / name).open("rb") as f:
            whole = os.fstat(f.fileno()).st_size
            (model / name).write_bytes(f.read(whole // 2))
    with pytest.raises(UserError) as refused:
        load_model(ModelConfig(path=str(model)))
    message = str(refused.value)
    assert message.startswith(f"model.path={model} could not be loaded: ") and said in message, message


def test_a_gguf_file_cut_short_is_named(tmp_path):
    whole = Path(locate(ModelConfig().path))
    cut = tmp_path / whole.name
    with whole.open("rb") as f:
        cut.write_bytes(f.read(2**20))
    said = f"model.path: {cut} could not be read (cut short or corrupt?): "
    with pytest.raises(UserError, match="^" + re.escape(said)):
        load_model(ModelConfig(path=str(cut), cache_dir=str(tmp_path / "cache")))


def test_model_files_cut_short_and_removed_mid_job_do_not_stop_it(tmp_path, data, model_dir):
    """Loaded, the weights are the job's own: on the CPU they were memory-mapped from model.safetensors, and
    the file cut short killed the job with SIGBUS, without a word."""
    model = model_copy(model_dir, tmp_path / "m")
    out = tmp_path / "o"
    job = start_job(f"data.path={data}", f"model.path={model}", f"output.dir={out}", *FAST)
    wait_for_a_part(job, out)
    os.truncate(model / "model.safetensors", (model / "model.safetensors").stat().st_size // 2)
    for name in ("config.json", "tokenizer.json"):
        (model / name).unlink()
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    assert all_rows_once(out)
    shutil.rmtree(model)  # 500 MB
