"""A job at scale on CI's CPU: 100,000 rows through a real job process, on a tiny random model (its
architecture is the embedded model's family, its tokenizer the embedded model's) with one new token each, so that
the time goes to what grows with the rows: reading, preparing, the engine's scheduling, writing, merging, scoring."""

import json
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq

from conftest import ROOT, SAMPLE
from splitwiser.bench import write_workload

ROWS = 100_000


def tiny_llama(directory):
    """A 2-layer Llama config with the embedded model's vocabulary (random weights: timing and bookkeeping only)."""
    config = json.loads((ROOT / "bench" / "shapes" / "llama3.2-1b" / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=49152, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=True)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_hundred_thousand_rows_end_up_once_each_in_bounded_memory(tmp_path, default_model):
    """Every one of 100,000 rows is generated once, under its id; the job process stays under 2 GB; its stages
    cover its wall time from launch to the end. (An engine that stopped after a batch whose every request ended
    at its first token once lost all but 16 rows of such a job.)"""
    data = write_workload(SAMPLE, ROWS, tmp_path / "rows.csv")
    out = tmp_path / "out"
    start, log = time.monotonic(), tmp_path / "job.log"
    with log.open("w") as stderr:
        job = subprocess.Popen([sys.executable, "-m", "jobs.run", f"data.path={data}", "model.weights=random",
                                f"model.path={tiny_llama(tmp_path / 'tiny')}", f"model.tokenizer={default_model.source}",
                                "engine.max_new_tokens=1", f"output.dir={out}", "output.progress=false"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        job.wait()
    elapsed = time.monotonic() - start
    assert job.returncode == 0, log.read_text()[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"input": ROWS, "ok": ROWS, "failed": 0}
    ids = pq.read_table(out / "generations.parquet", columns=["id"])["id"]
    assert pc.count_distinct(ids).as_py() == ROWS and sorted(ids.to_pylist()) == [f"{i:07d}" for i in range(ROWS)]
    assert manifest["quality"]["rows"] == ROWS
    peak_mb = manifest["runs"][-1]["peak_rss_mb"]  # the job process's own (ru_maxrss of a child counts the parent's
    assert sys.platform != "linux" or peak_mb < 2048, f"peak RSS {peak_mb} MB"  # memory it forked from)
    stages = manifest["runs"][-1]["stages"]
    # each stage rounded to the millisecond
    assert sum(stages.values()) - 0.01 <= manifest["wall_s_last_run"] <= elapsed
    print(f"{ROWS} rows: {elapsed:.1f} s, peak RSS {peak_mb:.0f} MB, stages {stages}")
