"""The benchmark's quick preset runs on CPU, offline, and writes its results, report and plots to a scratch
directory (the project's bench/RESULTS.md only when asked): systems in the benchmark's process and one that runs
as a real job with two worker processes."""

import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_cli
from splitwiser.bench import System
from splitwiser.errors import UserError
from splitwiser.job import git_commit


def test_quick_benchmark_writes_results_report_and_plots():
    record = (ROOT / "bench/RESULTS.md").read_bytes()
    result = run_cli("preset=quick", module="jobs.bench")
    assert result.returncode == 0, result.stderr
    assert (ROOT / "bench/RESULTS.md").read_bytes() == record
    results = Path(result.stderr.strip().splitlines()[-1].split(" wrote ")[1].split(" and ")[0])  # its last line
    scratch = results.parent
    assert scratch.parent == ROOT / "outputs/bench" and results.name.endswith("-quick.parquet")
    rows = pq.read_table(results).to_pylist()
    assert {(r["model"], r["system"], r["mode"]) for r in rows} == {
        ("smollm2_135m", s, mode) for s, mode in (("generate", None), ("continuous", None), ("generate", "colocated"))}
    drawn = [r for r in rows if r["answer_median"]]
    assert len(drawn) == 1 and drawn[0]["generated_tokens"] < 8 * 4 and drawn[0]["batch_size"] == "auto"
    rows = [r for r in rows if not r["answer_median"]]
    assert all(r["generated_tokens"] == 8 * 4 and r["all_lengths_full"] and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["git_commit"] and r["command"].startswith("python -m jobs.bench preset=quick") for r in rows)
    report = (scratch / "RESULTS.md").read_text()
    assert "## smollm2_135m, 4 new tokens" in report
    assert (scratch / "throughput-smollm2_135m-4.png").stat().st_size > 1000
    assert all(len(r["latency_ms"]) == 8 and r["latency_ms"] == sorted(r["latency_ms"]) for r in rows)
    assert (scratch / "latency-smollm2_135m-4.png").stat().st_size > 1000 and "![latency](latency-smollm2_135m-4.png)" in report
    jobs = [r for r in rows if r["mode"] == "colocated"]
    # The job read the same 8 prompts as the bench's own generate, ran 2 workers, and ended in Parquet.
    assert all(r["procs"] == 2 and r["engine"] == "2 x generate (colocated)" and r["mps"].startswith("off")
               and r["job_s"] > r["run_s"] > 0 for r in jobs)
    same = {r["model"]: r["prompt_tokens_mean"] for r in rows if r["mode"] is None}
    assert all(r["prompt_tokens_mean"] == same[r["model"]] for r in jobs)
    assert (scratch / "procs-smollm2_135m-4.png").stat().st_size > 1000 and "![workers](procs-smollm2_135m-4.png)" in report


@pytest.mark.parametrize("header_tokens, headers, mode", [(-1, 1, None), (512, 0, None), (512, 1, "single")])
def test_a_bad_few_shot_header_is_one_line(header_tokens, headers, mode):
    with pytest.raises(UserError, match="header_tokens"):
        System(name="continuous", header_tokens=header_tokens, headers=headers, mode=mode)


def test_the_recorded_commit_says_when_the_code_differs_from_it(tmp_path):
    """A result names the commit of the code that made it: `-dirty` where tracked files were changed since; none
    outside a git checkout."""
    repo, plain = tmp_path / "repo", tmp_path / "plain"
    repo.mkdir(), plain.mkdir()
    git = lambda *args: subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,  # noqa: E731
                                       text=True).stdout.strip()
    git("init", "-q")
    (repo / "engine.py").write_text("fast = True\n")
    git("add", "engine.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "engine")
    (repo / "notes.txt").write_text("untracked")
    assert git_commit(repo) == git("rev-parse", "HEAD")
    (repo / "engine.py").write_text("fast = False\n")
    assert git_commit(repo) == git("rev-parse", "HEAD") + "-dirty"
    assert git_commit(plain) is None
