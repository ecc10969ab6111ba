"""Faults only a GPU can show: a real out-of-memory, and the MPS server dying mid-job. Skipped without a GPU.

On the device: SPLITWISER_MODEL_DIR=<dir with config.json + tokenizer> python -m pytest tests/test_gpu_faults.py
"""

import json
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig

from conftest import ROOT, run_cli, sample_rows, write_csv
from splitwiser.memory import kv_slot_bytes
from test_gpu import model_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
RANDOM_FP16 = ["model.weights=random", "model.dtype=float16", "prompt.style=plain", "engine.ignore_eos=true",
               "output.progress=false"]


def test_a_batch_too_big_for_the_gpu_is_split_and_every_row_generated(tmp_path):
    """transformers' generate over a batch whose KV cache alone is 1.5x the GPU's memory: it runs out of
    memory for real, the batch is split until it fits, and every row is generated."""
    findings = " ".join(row["findings"] for row in sample_rows(12))  # ~1,000 tokens
    per_row = kv_slot_bytes(AutoConfig.from_pretrained(model_dir()), torch.float16, 1100)
    rows = int(1.5 * torch.cuda.mem_get_info()[1] / per_row)
    data = write_csv(tmp_path / "long.csv", [{"id": f"L{i}", "findings": findings} for i in range(rows)])
    result = run_cli(f"model.path={model_dir()}", *RANDOM_FP16, f"data.path={data}", "data.reference_column=null",
                     "engine.kind=generate", f"engine.batch_size={rows}", "engine.max_new_tokens=16",
                     f"output.dir={tmp_path}/o")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    run = manifest["runs"][0]
    print(f"{rows} rows in one generate batch: {run['oom_splits']} splits, {run['stages']['generate_s']} s;",
          next(line for line in result.stderr.splitlines() if "out of memory" in line))
    assert f"out of memory on a batch of {rows}" in result.stderr
    assert run["oom_splits"] >= 1 and manifest["rows"] == {"input": rows, "ok": rows, "failed": 0}
    assert run["generated_tokens"] == 16 * rows


def test_the_mps_server_dying_mid_job_ends_it_clearly_and_a_rerun_resumes(tmp_path):
    subprocess.run([sys.executable, "data/make_radiology.py", "--rows", "3000", "--out", str(tmp_path / "d.csv")],
                   cwd=ROOT, check=True, capture_output=True)
    args = [f"model.path={model_dir()}", *RANDOM_FP16, f"data.path={tmp_path}/d.csv", "engine.max_new_tokens=64",
            "engine.batch_size=32", "procs=2", f"output.dir={tmp_path}/o"]
    job = subprocess.Popen([sys.executable, "-m", "jobs.run", *args, "mps=on"], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(list(tmp_path.glob("o/parts/*.parquet"))) < 4 and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed = subprocess.run(["pkill", "-9", "-f", "[n]vidia-cuda-mps-server"])
    try:
        _, stderr = job.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        job.send_signal(signal.SIGKILL)
        _, stderr = job.communicate()
        pytest.fail(f"the job hung after the MPS server died:\n{stderr[-3000:]}")
    print(f"MPS server killed (pkill {killed.returncode}); job exit {job.returncode}; its stderr:\n{stderr[-6000:]}")
    assert killed.returncode == 0
    kept = sum(pq.read_table(p).num_rows for p in tmp_path.glob("o/parts/*.parquet"))
    if job.returncode == 0:  # the control daemon started a new server and the workers went on
        assert json.loads((tmp_path / "o" / "manifest.json").read_text())["rows"]["ok"] == 3000
        return
    # The job's own last line (PyTorch may add an exit warning of its own after it, about the dead workers)
    error = next(line for line in reversed(stderr.splitlines()) if line.startswith("error: "))
    assert "rerun the job to resume" in error and "MPS was on" in error, error
    rerun = run_cli(*args, "mps=auto")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    print(f"rerun: {manifest['runs'][-1]['rows_skipped_done']} rows kept from the killed run ({kept} in its parts)")
    assert manifest["rows"] == {"input": 3000, "ok": 3000, "failed": 0}
    assert manifest["runs"][-1]["rows_skipped_done"] >= kept
