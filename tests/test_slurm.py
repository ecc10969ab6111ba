"""The sbatch scripts on a real one-node SLURM cluster (slurm/local-cluster.sh: Debian's slurm-wlm,
started as root on this machine), with the real default model on CPU.

Skipped, with the reason, where the cluster cannot start (not root, no apt); in CI (CI=true) that is
a failure instead. (The model cache on a cluster's shared file system, SPLITWISER_CACHE, needs no cluster.)
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, sample_rows, write_csv
from splitwiser.config import ModelConfig
from splitwiser.models import load_model, model_cache_dir

SMALL = ["engine.max_new_tokens=4", "output.progress=false"]
# The scripts ask for a real node's resources; this machine has 2 cores and no GPU (the cluster
# declares a fake one, so --gres=gpu:1 is kept as written).
RESOURCES = ["--cpus-per-task=1", "--mem=2G"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_GPUS": "1"}
    try:
        if os.geteuid() != 0:
            raise RuntimeError("the local cluster needs root")
        start = subprocess.run(["bash", "slurm/local-cluster.sh", "start", str(directory)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
        if start.returncode != 0:
            raise RuntimeError(f"slurm/local-cluster.sh failed: {start.stderr[-2000:]}")
    except (RuntimeError, OSError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM is required in CI: {e}")
        pytest.skip(f"no local SLURM cluster: {e}")
    yield Cluster(directory / "slurm.conf", tmp_path_factory.mktemp("outputs"))
    subprocess.run(["bash", "slurm/local-cluster.sh", "stop", str(directory)], cwd=ROOT, timeout=120)


class Cluster:
    def __init__(self, conf: Path, outputs: Path):
        self.outputs = outputs
        self.env = {**os.environ, "SLURM_CONF": str(conf), "SPLITWISER_OUTPUTS": str(outputs),
                    "SPLITWISER_PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def command(self, *args: str, **kwargs) -> str:
        result = subprocess.run(args, cwd=ROOT, env={**self.env, **kwargs}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
        return result.stdout.strip()

    def sbatch(self, script: str, *overrides: str, options: tuple[str, ...] = (), **env: str) -> str:
        log = self.outputs / "slurm-%x-%j.out"
        return self.command("sbatch", "--parsable", *RESOURCES, f"--output={log}", *options, script, *overrides, **env)

    def job(self, job_id: str) -> dict:
        fields = self.command("scontrol", "show", "job", "-o", job_id).split()
        return dict(field.split("=", 1) for field in fields if "=" in field)

    def wait(self, job_id: str, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if job["JobState"] in until:
                return job
            time.sleep(1)
        raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout}s")

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in self.outputs.glob("*.out"))


def ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"])["id"].to_pylist()


def test_array_tasks_and_merge_give_every_row_once(cluster, messy_csv):
    result = cluster.command("bash", "slurm/submit-array.sh", "2", f"data.path={messy_csv}", *SMALL,
                             SPLITWISER_SBATCH=" ".join([*RESOURCES, f"--output={cluster.outputs}/%x-%A_%a.out"]))
    words = result.split()  # array job A (2 tasks) and merge job M: results in DIR
    array, merge = words[2], words[8].rstrip(":")
    root = cluster.outputs / f"array-{array}"
    assert cluster.wait(merge)["JobState"] == "COMPLETED", cluster.logs()

    # messy_csv: 6 good rows, then a duplicate of the first, a missing id, an empty and a blank text.
    # The duplicate sits in the other task's part: it is still caught, since ids are checked over the whole file.
    assert sorted(ids(root / "generations.parquet")) == sorted(r["id"] for r in sample_rows(6))
    errors = pq.read_table(root / "errors.parquet").to_pylist()
    assert len(errors) == 4 and any(e["error"].startswith("duplicate id") for e in errors)
    for task in (0, 1):
        assert (root / f"task-{task}" / "manifest.json").exists()
    assert len(ids(root / "task-0" / "generations.parquet")) + len(ids(root / "task-1" / "generations.parquet")) == 6


def test_time_limit_signal_requeues_and_the_job_resumes(cluster, tmp_path):
    data = write_csv(tmp_path / "d.csv", sample_rows(40))
    job_id = cluster.sbatch("slurm/run.sbatch", f"data.path={data}", "engine.batch_size=4",
                            "engine.max_new_tokens=16", "output.progress=false")
    out = cluster.outputs / f"slurm-{job_id}"
    deadline = time.time() + 300
    while not list((out / "parts").glob("*.parquet")) and time.time() < deadline:
        time.sleep(0.5)
    # What --signal=B:USR1@120 sends two minutes before the time limit: the script stops the job and requeues it.
    cluster.command("scancel", "--signal=USR1", "--batch", job_id)
    requeued = cluster.wait(job_id, until=("PENDING",), timeout=120)
    assert requeued["Restarts"] == "1"
    kept = len(ids_in_parts(out))
    assert 0 < kept < 40
    # SLURM holds a requeued job for AuthInfo's cred_expire (10 s on the local cluster), while the node
    # refuses the job id's old credential: starting it sooner (StartTime=now) fails its launch.
    assert cluster.wait(job_id)["JobState"] == "COMPLETED", cluster.logs()

    assert sorted(ids(out / "generations.parquet")) == sorted(r["id"] for r in sample_rows(40))
    assert "requeueing job" in cluster.logs()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][-1]["rows_skipped_done"] == kept


def ids_in_parts(out: Path) -> list[str]:
    return [i for part in (out / "parts").glob("*.parquet") for i in ids(part)]


def test_nightly_job_does_only_new_and_changed_rows(cluster, tmp_path):
    rows = sample_rows(12)
    data = tmp_path / "reports.csv"
    nightly = cluster.outputs / "nightly"
    overrides = [f"data.path={data}", f"output.dir={nightly}", *SMALL]

    def night() -> list[str]:
        job_id = cluster.sbatch("slurm/nightly.sbatch", *overrides)
        assert cluster.wait(job_id)["JobState"] == "COMPLETED", cluster.logs()
        return sorted(p.name for p in nightly.iterdir() if p.is_dir())

    write_csv(data, rows[:8])
    first = night()
    assert len(first) == 1 and sorted(ids(nightly / first[0] / "generations.parquet")) == [r["id"] for r in rows[:8]]

    rows[0] = {**rows[0], "findings": rows[0]["findings"] + " Addendum: no change."}  # a corrected report
    write_csv(data, rows)  # and 4 new ones
    second = night()
    assert len(second) == 2
    assert sorted(ids(nightly / second[-1] / "generations.parquet")) == sorted([rows[0]["id"]] + [r["id"] for r in rows[8:]])

    assert night() == second  # nothing new: no partition
    assert "nothing new" in cluster.logs()
    shutil.rmtree(nightly)


# A CPU partition's command line: --gres=none replaces the header's --gres=gpu:1 (README, "SLURM and the nightly job").
CPU = ("--gres=none", "--partition=cpu")


def test_a_cpu_partition_job_asks_for_no_gpu(cluster, tmp_path):
    data = write_csv(tmp_path / "d.csv", sample_rows(2))
    job_id = cluster.sbatch("slurm/run.sbatch", "model.device=cpu", f"data.path={data}", *SMALL, options=CPU)
    job = cluster.wait(job_id)
    assert job["JobState"] == "COMPLETED", cluster.logs()
    assert job["Partition"] == "cpu" and "gpu" not in job.get("TresPerNode", "") + job["TRES"]
    assert sorted(ids(cluster.outputs / f"slurm-{job_id}" / "generations.parquet")) == [r["id"] for r in sample_rows(2)]


def test_the_next_night_is_submitted_with_splitwiser_sbatch(cluster, tmp_path):
    # Its data is missing: the night fails at once, after it has submitted the next one.
    options = " ".join([*CPU, *RESOURCES, f"--output={cluster.outputs}/%x-%j.out"])
    job_id = cluster.sbatch("slurm/nightly.sbatch", f"data.path={tmp_path / 'missing.csv'}",
                            f"output.dir={tmp_path / 'nightly'}", options=CPU,
                            SPLITWISER_NIGHTLY_AT="02:00", SPLITWISER_SBATCH=options)
    assert cluster.wait(job_id)["JobState"] == "FAILED"
    [next_night] = [j for j in cluster.command("squeue", "-h", "-o", "%i", "--states=PENDING").split() if j != job_id]
    try:
        job = cluster.job(next_night)
        assert job["Partition"] == "cpu" and "gpu" not in job.get("TresPerNode", "") + job["TRES"]
        assert job["StartTime"].endswith("T02:00:00") and job["Command"].endswith("slurm/nightly.sbatch")
    finally:
        cluster.command("scancel", next_night)


def test_splitwiser_cache_puts_the_converted_model_where_every_node_finds_it(tmp_path, monkeypatch, default_model):
    shared = tmp_path / "shared"  # a shared file system's directory, holding the conversion (here: a link to it)
    converted = Path(default_model.source)
    (shared / "gguf").mkdir(parents=True)
    (shared / "gguf" / converted.name).symlink_to(converted)
    monkeypatch.setenv("SPLITWISER_CACHE", str(shared))
    assert load_model(ModelConfig(device="cpu")).source == str(shared / "gguf" / converted.name)
    assert model_cache_dir(ModelConfig(cache_dir=str(tmp_path / "own"))) == tmp_path / "own", "model.cache_dir wins"
