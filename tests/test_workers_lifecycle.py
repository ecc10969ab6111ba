"""Worker processes end with their job, however it ends, and what cannot start is refused in one line."""

import json
import os
import pickle
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, run_cli
from splitwiser.config import EngineConfig
from splitwiser.errors import UserError
from splitwiser.memory import free_memory, kv_slot_bytes
from splitwiser.engine import resolve_engine
from splitwiser.workers import start_workers, worker_context
from test_workers import workers_of


def start_job(log: Path, *overrides: str) -> tuple[subprocess.Popen, str]:
    """Starts `python -m jobs.run overrides`, its output to `log` (a pipe would be held open by the processes
    it starts), with a mark in its environment, which every process it starts inherits (fork server, workers,
    resource tracker): marked(mark) finds them after the job has gone."""
    mark = uuid.uuid4().hex
    with log.open("w") as output:
        job = subprocess.Popen([sys.executable, "-m", "jobs.run", *overrides], cwd=ROOT, stdout=output,
                               stderr=subprocess.STDOUT, env={**os.environ, "SPLITWISER_TEST_MARK": mark})
    return job, mark


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def marked(mark: str) -> list[int]:
    """The live processes whose environment holds the mark."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"SPLITWISER_TEST_MARK={mark}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return [pid for pid in found if alive(pid)]


def wait_until_gone(pids, seconds: float) -> list[int]:
    """The processes among `pids` still alive after `seconds` (returns as soon as none is)."""
    deadline = time.time() + seconds
    while any(map(alive, pids)) and time.time() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def test_workers_die_with_a_killed_job(tmp_path):
    """A SIGKILLed job's workers exit at once (they outlived it by ~14 s, writing parts), and so does its fork
    server (it outlives the job while any worker lives)."""
    out = tmp_path / "out"
    job, mark = start_job(tmp_path / "log", "procs=2", "data.limit=30", "engine.max_new_tokens=16",
                          "engine.batch_size=2", f"output.dir={out}", "output.progress=false")
    deadline = time.time() + 300
    while not list(out.glob("parts/*.parquet")) and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = workers_of(job.pid)
    assert len(workers) == 2, (workers, job.poll())
    job.kill()
    job.wait()
    assert wait_until_gone(workers, 3) == [], "workers outlived their job"
    assert wait_until_gone(marked(mark), 5) == [], "processes outlived their job"


@pytest.mark.parametrize("mode, setting", [("colocated", "procs=100000"),
                                           ("split", "prompt_procs=50000 + token_procs=50000")])
def test_too_many_procs_are_refused_in_one_line(tmp_path, mode, setting):
    """procs=100000 ended in a traceback (too many open files), leaving dozens of workers behind."""
    job, mark = start_job(tmp_path / "log", "procs=100000", f"mode={mode}", "data.limit=4",
                          f"output.dir={tmp_path / 'out'}", "output.progress=false")
    job.wait(timeout=300)
    log = (tmp_path / "log").read_text()
    assert job.returncode == 2 and "Traceback" not in log, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == log.strip().splitlines()[-1:], log
    assert errors[0].startswith(f"error: {setting}: 100000 worker processes need about ")
    assert int(errors[0].rsplit("at most ", 1)[1].split()[0]) < 100000, errors[0]
    assert wait_until_gone(marked(mark), 5) == [], "processes outlived their job"


def sleep_in_worker(rank, *args) -> None:
    time.sleep(600)


class Interrupt:
    """Ctrl-C while this is pickled for a worker's start."""

    def __reduce__(self):
        raise KeyboardInterrupt


@pytest.mark.parametrize("failing", [lambda: None, Interrupt()], ids=["unpicklable", "ctrl-c"])
def test_a_failed_start_ends_the_workers_started_before_it(failing):
    context = worker_context()
    spec = (sleep_in_worker, [], SimpleNamespace(threads=1), ())
    with pytest.raises((pickle.PicklingError, KeyboardInterrupt)):
        start_workers(context, [spec, spec, (*spec[:3], (failing,))], context.Queue())
    assert workers_of(os.getpid()) == []


def test_an_explicit_batch_size_is_capped_at_what_the_requests_use(default_model):
    """An engine never runs more requests at once than it is given, nor decodes them in a wider bucket than
    their power of two (at least 8): slots beyond that only take memory."""
    for batch_size, requests, slots in [(100_000_000, 30, 32), (100, 3, 8), (40, 30, 32), (20, 30, 20), (32, 30, 32)]:
        for kind in ("continuous", "generate"):
            cfg = EngineConfig(kind=kind, batch_size=batch_size)
            assert resolve_engine(default_model, cfg, 256, requests).batch_size == slots, (batch_size, requests, kind)


def test_kv_caches_larger_than_memory_are_refused(default_model):
    """The workers' KV caches together: each one fits, a thousand cannot hold the longest request each."""
    cfg = EngineConfig(batch_size=16)
    assert resolve_engine(default_model, cfg, 8192, requests=16).batch_size == 16
    with pytest.raises(UserError, match=r"^engine.max_new_tokens=64: for the longest request alone \(8192 positions\) the "
                                        r"KV caches of 1000 workers on cpu need 352 GB, [\d,.]+ GB free; lower "
                                        r"engine.max_new_tokens or procs$"):
        resolve_engine(default_model, cfg, 8192, requests=16, share=1000)


def test_a_kv_cache_is_as_large_as_the_memory_allows_and_no_larger(default_model):
    """engine.kv_tokens=auto: what the slots could use of the longest request, within the free memory; an explicit
    size over the memory, or under the longest request, is refused in one line."""
    free_tokens = free_memory(default_model.device) // kv_slot_bytes(default_model.model.config, default_model.dtype, 1)
    assert resolve_engine(default_model, EngineConfig(batch_size=16), 256, requests=16).kv_tokens == 16 * 256
    huge = resolve_engine(default_model, EngineConfig(batch_size=1024), free_tokens // 100, requests=1024)
    assert huge.kv_tokens <= free_tokens and huge.kv_tokens >= free_tokens // 10
    with pytest.raises(UserError, match=r"^engine.kv_tokens=\d+: its KV cache needs [\d,.]+ GB, [\d,.]+ GB free; at "
                                        r"most engine.kv_tokens=\d+ fits$"):
        resolve_engine(default_model, EngineConfig(batch_size=16, kv_tokens=free_tokens * 2), 256, requests=16)
    with pytest.raises(UserError, match=r"^engine.kv_tokens=100: less than the longest request \(its prompt and "
                                        r"engine.max_new_tokens\), 256 positions$"):
        resolve_engine(default_model, EngineConfig(batch_size=16, kv_tokens=100), 256, requests=16)


def test_a_kv_cache_larger_than_memory_is_refused_in_one_line(tmp_path):
    """engine.kv_tokens=10^11 would take petabytes: refused before anything runs."""
    start = time.time()
    result = run_cli("engine.kv_tokens=100000000000", f"output.dir={tmp_path}", "output.progress=false")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == result.stderr.strip().splitlines()[-1:], result.stderr
    assert re.fullmatch(r"error: engine.kv_tokens=100000000000: its KV cache needs [\d,.]+ GB, [\d,.]+ GB free; at most "
                        r"engine.kv_tokens=\d+ fits", errors[0]), errors[0]
    assert time.time() - start < 120


def test_a_batch_size_beyond_the_requests_runs(tmp_path):
    """engine.batch_size=100000000 tried to allocate terabytes; 4 requests use 8 slots."""
    result = run_cli("engine.batch_size=100000000", "data.limit=4", "engine.max_new_tokens=4",
                     f"output.dir={tmp_path}", "output.progress=false")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "manifest.json").read_text())["runs"][-1]["engine"]["batch_size"] == 8
