"""The benchmark's quick preset runs on CPU and writes its results, report and plots: systems in the
benchmark's process and one that runs as a real job with two worker processes."""

import pyarrow.parquet as pq

from conftest import run_cli


def test_quick_benchmark_writes_results_report_and_plots(tmp_path, default_model):
    result = run_cli("preset=quick", f"results_dir={tmp_path}/results", f"report={tmp_path}/RESULTS.md",
                     f"tokenizer={default_model.source}", module="jobs.bench")
    assert result.returncode == 0, result.stderr
    [results] = (tmp_path / "results").glob("*-quick.parquet")
    rows = pq.read_table(results).to_pylist()
    assert {(r["model"], r["system"], r["mode"]) for r in rows} == {
        (m, s, mode) for m in ("opt125m", "smollm2_135m")
        for s, mode in (("generate", None), ("continuous", None), ("generate", "colocated"))}
    assert all(r["generated_tokens"] == 8 * 4 and r["all_lengths_full"] and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["git_commit"] and r["command"].startswith("python -m jobs.bench preset=quick") for r in rows)
    report = (tmp_path / "RESULTS.md").read_text()
    assert "## opt125m, 4 new tokens" in report and "## smollm2_135m, 4 new tokens" in report
    assert (tmp_path / "throughput-opt125m-4.png").stat().st_size > 1000
    assert all(len(r["latency_ms"]) == 8 and r["latency_ms"] == sorted(r["latency_ms"]) for r in rows)
    assert (tmp_path / "latency-opt125m-4.png").stat().st_size > 1000 and "![latency](latency-opt125m-4.png)" in report
    jobs = [r for r in rows if r["mode"] == "colocated"]
    # The job read the same 8 prompts as the bench's own generate, ran 2 workers, and ended in Parquet.
    assert all(r["procs"] == 2 and r["engine"] == "2 x generate (colocated)" and r["mps"].startswith("off")
               and r["job_s"] > r["run_s"] > 0 for r in jobs)
    same = {r["model"]: r["prompt_tokens_mean"] for r in rows if r["mode"] is None}
    assert all(r["prompt_tokens_mean"] == same[r["model"]] for r in jobs)
    assert (tmp_path / "procs-opt125m-4.png").stat().st_size > 1000 and "![workers](procs-opt125m-4.png)" in report
