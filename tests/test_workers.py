"""procs=N worker processes over one shared model (CPU: shared memory), on the real model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, job_config, sample_rows, write_csv
from splitwiser.job import run
from splitwiser.report import write_timeline


def children_of(pid: int) -> list[int]:
    """Live child processes, less multiprocessing's resource tracker (it lives as long as its parent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z" and b"resource_tracker" not in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return found


def workers_of(pid: int) -> list[int]:
    """The worker processes of a job running in process `pid`, in start order: the children of its fork
    server (which, like the resource tracker, lives as long as the job's process)."""
    servers = [child for child in children_of(pid) if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes()]
    return sorted(worker for server in servers for worker in children_of(server))


def left_behind(pid: int) -> list[int]:
    """Processes a finished job leaves: any child but the fork server, and any worker."""
    return [c for c in children_of(pid) if b"forkserver" not in Path(f"/proc/{c}/cmdline").read_bytes()] + workers_of(pid)


def outputs(out: Path) -> dict[str, list[int]]:
    table = pq.read_table(out / "generations.parquet")
    return dict(zip(table["id"].to_pylist(), table["output_token_ids"].to_pylist()))


@pytest.fixture(scope="module")
def single_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run(job_config("data.limit=8", f"output.dir={out}", "engine.max_new_tokens=8"))
    return outputs(out)


@pytest.mark.parametrize("mode", ["colocated", "split"])
@pytest.mark.parametrize("procs", [1, 2, 3])
def test_workers_give_the_single_process_outputs(tmp_path, single_outputs, procs, mode):
    manifest = run(job_config("data.limit=8", f"output.dir={tmp_path}", "engine.max_new_tokens=8",
                              f"procs={procs}", f"mode={mode}", "engine.batch_size=2"))
    assert outputs(tmp_path) == single_outputs
    assert manifest["rows"] == {"input": 8, "ok": 8, "failed": 0}
    last = manifest["runs"][-1]
    # split runs at least one prompt and one token worker: procs=1 becomes 1 + 1
    workers = max(procs, 2) if mode == "split" else procs
    assert last["mode"] == mode and last["procs"] == workers
    assert last["mps"] == "off (no CUDA GPU)"
    assert last["generated_tokens"] == sum(map(len, single_outputs.values()))
    # Which workers wrote the rows depends on who started first: a short job may go to one alone.
    decoders = range(workers // 2, workers) if mode == "split" else range(workers)
    writers = set(pq.read_table(tmp_path / "generations.parquet")["worker"].to_pylist())
    assert writers <= set(decoders)
    assert last["engine"]["batch_size"] == 2 * len(decoders)  # each decoding worker's engine.batch_size, summed
    write_timeline(tmp_path, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
    assert not left_behind(os.getpid()), "worker processes left behind"


def kill_a_worker_mid_run(*overrides: str, worker: int) -> tuple[int, str]:
    """Runs `jobs.run overrides` (2 worker processes), SIGKILLs worker `worker` (0: started first) once
    the first part file exists; returns the job's exit status and log."""
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output.dir=")))
    job = subprocess.Popen([sys.executable, "-m", "jobs.run", *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "parts").glob("*.parquet"))) < 1:
        time.sleep(0.1)
    workers = workers_of(job.pid)
    assert len(workers) == 2, workers
    os.kill(workers[worker], signal.SIGKILL)
    log, _ = job.communicate(timeout=600)
    return job.returncode, log


def test_a_killed_worker_loses_no_rows(tmp_path):
    """SIGKILL one worker mid-run: its units go back to the queue, every row ends up once."""
    data = write_csv(tmp_path / "d.csv", sample_rows(16))
    out = tmp_path / "out"
    code, log = kill_a_worker_mid_run(f"data.path={data}", f"output.dir={out}", "procs=2", "engine.batch_size=2",
                                      "engine.max_new_tokens=24", "output.progress=false", worker=0)
    assert code == 0, log
    assert "goes back in the queue" in log or "go back in the queue" in log
    generations = pq.read_table(out / "generations.parquet")
    assert sorted(generations["id"].to_pylist()) == sorted(r["id"] for r in sample_rows(16))
    assert 1 in generations["worker"].to_pylist()  # the survivor took over
    assert json.loads((out / "manifest.json").read_text())["rows"] == {"input": 16, "ok": 16, "failed": 0}


def test_a_killed_split_worker_stops_the_job_and_a_rerun_completes(tmp_path):
    """mode=split keeps handed-over requests in a token worker's KV slots: its death stops the job with a
    clear line; what is on disk stays, and the rerun does the rest."""
    data = write_csv(tmp_path / "d.csv", sample_rows(16))
    out = tmp_path / "out"
    args = [f"data.path={data}", f"output.dir={out}", "procs=2", "mode=split", "engine.batch_size=2",
            "engine.max_new_tokens=24", "output.progress=false"]
    code, log = kill_a_worker_mid_run(*args, worker=1)  # the token worker: started second
    assert code == 1 and "Traceback" not in log, log
    assert "error: mode=split: worker 1 exited with code -9" in log
    kept = {i for part in (out / "parts").glob("*.parquet") for i in pq.read_table(part)["id"].to_pylist()}
    assert kept, "the token worker had written a part before it was killed"

    manifest = run(job_config(*args))
    assert sorted(outputs(out)) == sorted(r["id"] for r in sample_rows(16))
    assert manifest["rows"] == {"input": 16, "ok": 16, "failed": 0}
    assert manifest["runs"][-1]["rows_skipped_done"] == len(kept)


def test_mps_on_without_a_gpu_fails_at_start(tmp_path):
    from conftest import run_cli
    result = run_cli("procs=2", "mps=on", f"output.dir={tmp_path}", "data.limit=2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: mps=on but MPS cannot run here: no CUDA GPU; use mps=auto or mps=off")
    assert not list(tmp_path.rglob("*.parquet"))


def test_single_mode_with_several_procs_is_refused(tmp_path):
    from conftest import run_cli
    result = run_cli("procs=2", "mode=single", f"output.dir={tmp_path}")
    assert result.returncode == 2
    assert "mode=single runs one process, procs=2; use mode=colocated" in result.stderr
