"""A user's first runs (issue 19): concurrent first runs, CPU threads, config mistakes, Ctrl-C, progress output."""

import fcntl
import hashlib
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_cli
from jobs import cpu_threads
from splitwiser.config import ModelConfig
from splitwiser.errors import UserError
from splitwiser.models import locate

TINY = ("data.limit=2", "engine.max_new_tokens=2")


# jobs.run with a log record at exit, as torch writes one (its FakeTensor cache stats) from an atexit hook
LATE_RECORD = ("import atexit, logging, runpy, sys; "
               "atexit.register(lambda: logging.getLogger('a_library').info('cache stats')); "
               "sys.argv[0] = 'jobs.run'; runpy.run_module('jobs.run', run_name='__main__')")


def job(*args: str, env: dict | None = None, prefix: tuple = (), late_record: bool = False) -> subprocess.Popen:
    """A real `[PREFIX] python -m jobs.run ARGS` in the background, its stderr piped; the environment without
    OMP_NUM_THREADS (the job decides), with ENV. late_record: a library logs a record as the process exits."""
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    python = [sys.executable, "-c", LATE_RECORD] if late_record else [sys.executable, "-m", "jobs.run"]
    return subprocess.Popen([*prefix, *python, *args], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**environment, **(env or {})},
                            preexec_fn=interruptible)


def interruptible() -> None:
    """SIGINT as a terminal's job has it: pytest run in the background of a shell (`... &`) ignores it, and a child
    would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(process: subprocess.Popen) -> str:
    stderr = process.communicate(timeout=600)[1]
    assert process.returncode == 0, stderr
    return stderr


def test_concurrent_first_runs_convert_the_model_once(tmp_path):
    cache = tmp_path / "cache"  # empty: every run is a first run, each would convert the GGUF file (~25 s)
    gguf = Path(locate(ModelConfig().path))
    with gguf.open("rb") as f:
        key = hashlib.file_digest(f, "sha256").hexdigest()[:12]
    killed = cache / "gguf" / f".{gguf.stem}-{key}.converting-killed"  # what a conversion killed midway leaves
    killed.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half")
    runs = [job(f"model.cache_dir={cache}", "data.limit=1", "engine.max_new_tokens=2", f"output.dir={tmp_path}/o{i}",
                "engine.cpu_threads=1")  # two jobs at once on a small CPU
            for i in range(2)]
    logs = "".join(finish(run) for run in runs)
    assert logs.count("converting SmolLM2-135M-Instruct.Q4_1.gguf once") == 1, logs
    assert "waiting for another process converting SmolLM2-135M-Instruct.Q4_1.gguf" in logs, logs
    assert not list(cache.glob("gguf/.*converting-*"))


@pytest.mark.parametrize("requested, environment, affinity, expected", [
    (3, {"OMP_NUM_THREADS": "5", "SLURM_CPUS_PER_TASK": "1"}, {0, 1}, (3, "engine.cpu_threads")),
    (None, {"OMP_NUM_THREADS": "5", "SLURM_CPUS_PER_TASK": "1"}, {0, 1}, (5, "OMP_NUM_THREADS")),
    (None, {"SLURM_CPUS_PER_TASK": "2"}, {0, 1, 2, 3}, (2, "SLURM_CPUS_PER_TASK")),
    (None, {"SLURM_CPUS_PER_TASK": "8"}, {0, 1, 2, 3}, (4, "the CPUs this process may use")),
    (None, {}, {5, 7}, (2, "the CPUs this process may use")),
])
def test_cpu_threads(monkeypatch, requested, environment, affinity, expected):
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity)
    assert cpu_threads(requested) == expected


def test_omp_num_threads_that_is_not_a_number(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(UserError, match="OMP_NUM_THREADS=many: must be a number of threads"):
        cpu_threads(None)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: every way gives 1 thread")
def test_a_job_uses_the_cpus_it_is_given(tmp_path):
    if shutil.which("taskset"):
        run = job(*TINY, f"output.dir={tmp_path}/o", prefix=("taskset", "-c", "0"))
        source = "the CPUs this process may use"
    else:
        run = job(*TINY, f"output.dir={tmp_path}/o", env={"SLURM_CPUS_PER_TASK": "1"})
        source = "SLURM_CPUS_PER_TASK"
    assert f"cpu threads: 1 (from {source})" in finish(run)


def test_torch_in_a_job_process_takes_its_thread_count(monkeypatch):
    # set_up_job_process decides before torch is imported; torch (and the fork server's workers) read it then.
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code = ("from jobs import set_up_job_process; from splitwiser.config import JobConfig; "
            "set_up_job_process(JobConfig()); import torch; print(torch.get_num_threads())")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout == "1\n"


def assert_one_line_error(result, message: str) -> None:
    """stderr is one line, `error: ...` with `message` in it; exit status 2."""
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("override, message", [
    ("data.limit=abc", "data.limit: Value 'abc' of type 'str' could not be converted to Integer"),
    ("engine.max_new_tokens=2.5", "engine.max_new_tokens: Value '2.5' of type 'float' could not be converted to Int"),
    ("engine.nope=1", "engine.nope: no such key; the keys there are: kind, batch_size, max_new_tokens,"),
    ("data.limit=[1", "data.limit=[1: no viable alternative at input '[1'"),
    ("mps=sometimes", "mps=sometimes: no such choice; the choices are: auto, off, on"),
    ("engine.cpu_threads=0", "engine.cpu_threads=0: must be at least 1"),
])
def test_config_mistakes_in_one_line(override, message):
    assert_one_line_error(run_cli(override), message)


@pytest.mark.parametrize("module, overrides, message", [
    ("jobs.nightly", ["data.limit=abc"], "data.limit: Value 'abc' of type 'str' could not be converted to Integer"),
    ("jobs.merge", ["dirs=x"], "dirs: no such key; the keys there are: dir"),
    ("jobs.merge", [], "dir: Missing mandatory value: dir"),
    ("jobs.bench", ["preset=huge"], "preset=huge: no such choice; the choices are: "
     + ", ".join(sorted(path.stem for path in (ROOT / "conf" / "preset").glob("*.yaml")))),
])
def test_every_command_says_config_mistakes_in_one_line(module, overrides, message):
    assert_one_line_error(run_cli(*overrides, module=module), message)


def test_a_library_logging_at_exit_comes_before_the_error_line():
    run = job("data.path=/nonexistent.csv", late_record=True)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode == 2 and stderr.strip().splitlines()[-1].startswith("error: data.path="), stderr


def test_multirun_and_help_still_work(tmp_path):
    result = run_cli("--multirun", "data.limit=2", "engine.max_new_tokens=1,2", f"hydra.sweep.dir={tmp_path}/sweep",
                     f"output.dir={tmp_path}/o${{engine.max_new_tokens}}")
    assert result.returncode == 0, result.stderr
    assert all(pq.read_table(tmp_path / f"o{n}" / "generations.parquet").num_rows == 2 for n in (1, 2))
    result = run_cli("--help")
    assert result.returncode == 0 and "model: opt125m, smollm2_135m" in result.stdout, result.stdout


def assert_stopped(run: subprocess.Popen, stderr: str, status: int, said: str, out) -> None:
    assert run.returncode == status and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (f"{said}: the finished rows are kept in {out}; "
                                                "run the same command again to resume"), stderr


@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGHUP, 129, "hung up")])
def test_a_signal_mid_generation_says_so_in_one_line_and_the_rerun_resumes(tmp_path, signum, status, said):
    """Ctrl-C, and a terminal or ssh session closed under the job (SIGHUP)."""
    out = tmp_path / "o"
    command = ("data.limit=40", "engine.max_new_tokens=32", f"output.dir={out}")
    run = job(*command)
    deadline = time.time() + 60
    while not list(out.glob("parts/*.parquet")) and time.time() < deadline and run.poll() is None:
        time.sleep(0.2)
    run.send_signal(signum)
    assert_stopped(run, run.communicate(timeout=120)[1], status, said, out)
    finish(job(*command))
    ids = pq.read_table(out / "generations.parquet")["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 40


# A log line of each stage before generation (start-up: torch's import follows; the model's load; preparing and
# warming up), and a signal sent there: each signal once, each stage once.
STAGES = [("cpu threads:", signal.SIGTERM, 143, "terminated"), ("MPS off", signal.SIGHUP, 129, "hung up"),
          ("rows: ", signal.SIGINT, 130, "interrupted")]


@pytest.mark.parametrize("stage, signum, status, said", STAGES)
def test_a_signal_at_any_stage_says_so_in_one_line(tmp_path, stage, signum, status, said):
    """The job's line is the last, also where a library logs at exit (torch's FakeTensor cache stats)."""
    run = job(*TINY, f"output.dir={tmp_path}/o", late_record=True)
    stderr = next(line for line in run.stderr if stage in line)
    run.send_signal(signum)
    assert_stopped(run, stderr + run.communicate(timeout=120)[1], status, said, tmp_path / "o")


PROGRESS = """
import logging, sys, time
from splitwiser.progress import Progress
logging.basicConfig(level=logging.INFO, format="%(message)s")
total = int(sys.argv[1])
with Progress(total, True, every_s=0.2) as progress:
    for _ in range(total):
        time.sleep(0.15)
        progress(1, 8)
"""


def progress(total: int, stderr) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROGRESS, str(total)], cwd=ROOT, stderr=stderr)


def test_progress_in_a_log_file_is_plain_lines_and_one_final_line(tmp_path):
    with (tmp_path / "log").open("w") as log:
        assert progress(6, log).wait() == 0
    lines = (tmp_path / "log").read_text().splitlines()
    assert "\r" not in "".join(lines) and len(lines) >= 2
    assert all(line.startswith("rows ") and ", eta " in line for line in lines[:-1]), lines
    assert lines[-1].startswith("rows 6/6 (100%), ") and " tok/s, in 00:0" in lines[-1], lines


def test_no_progress_when_there_is_nothing_to_do():
    run = progress(0, subprocess.PIPE)
    assert run.communicate()[1] == b"" and run.returncode == 0


def on_a_terminal(total: int, columns: int) -> str:
    """What the progress of `total` rows shows on a terminal `columns` wide."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    run = progress(total, terminal)
    os.close(terminal)
    shown = b""
    while chunk := read_or_none(controller):
        shown += chunk
    os.close(controller)
    assert run.wait() == 0
    return shown.decode()


def read_or_none(fd: int) -> bytes | None:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the other side is closed
        return None


def test_progress_on_a_terminal_is_one_bar():
    shown = on_a_terminal(3, columns=100)
    assert shown.count("\n") == 1 and shown.endswith("\n"), repr(shown)
    final = shown.rstrip().split("\r")[-1]
    assert "3/3" in final and "tok/s" in final and len(final) <= 100, repr(shown)


def test_progress_on_a_terminal_without_a_width_is_plain_lines():
    lines = on_a_terminal(3, columns=0).splitlines()
    assert lines and all(line.startswith("rows ") for line in lines), lines
    assert lines[-1].startswith("rows 3/3 (100%)"), lines
