import os

# Before torch loads: the in-process jobs' threads sleep while they wait, as jobs.run's do (a CI machine shared
# with other work made spinning threads several times slower)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import csv  # noqa: E402
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from splitwiser.config import ModelConfig, register_configs, to_job_config
from splitwiser.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "radiology.csv"
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network; hub paths must fail at once
register_configs()


def job_config(*overrides: str):
    """The job config exactly as `python -m jobs.run OVERRIDES` composes it, with the bar off."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_job_config(compose("config", overrides=["output.progress=false", *overrides]))


def run_cli(*overrides: str, module: str = "jobs.run", timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def kill_when_parts_written(out: Path, count: int, *overrides: str, module: str = "jobs.run") -> int:
    """Starts `python -m module overrides`, SIGKILLs it once `out` (or a partition in it) holds `count` part
    files; returns how many part files survived."""
    job = subprocess.Popen([sys.executable, "-m", module, *overrides], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    parts = lambda: list(out.glob("parts/*.parquet")) + list(out.glob("*/parts/*.parquet"))  # noqa: E731
    while len(parts()) < count and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    job.send_signal(signal.SIGKILL)
    job.wait()
    return len(parts())


def sample_rows(n: int) -> list[dict]:
    with SAMPLE.open() as f:
        return list(csv.DictReader(f))[:n]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def default_model():
    """The real embedded model (SmolLM2-135M-Instruct), converted once and cached."""
    return load_model(ModelConfig())


@pytest.fixture
def messy_csv(tmp_path) -> Path:
    """Six good rows and four that must go to errors.parquet."""
    rows = sample_rows(6)
    rows += [
        {**rows[0], "impression": "dup"},  # duplicate id
        {**rows[1], "id": ""},  # missing id
        {**rows[2], "id": "EMPTY-1", "findings": ""},
        {**rows[3], "id": "BLANK-1", "findings": "   \n "},
    ]
    return write_csv(tmp_path / "messy.csv", rows)
