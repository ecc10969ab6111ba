"""The benchmark's report: a markdown table per model and output length, a throughput plot, a latency
CDF and, for the systems that ran as jobs, tokens/s against worker processes; and a job's timeline
(write_timeline)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ["system", "mode", "procs", "mps", "batch_size", "cuda_graphs", "attention", "temperature", "top_p", "top_k",
           "compact", "answer_median", "json_schema", "cached_tokens", "constraint_s", "decode_steps",
           "requests", "generated_tokens", "tokens_per_s", "vs_paper", "warmup_s", "run_s", "job_s", "latency_p50_ms",
           "latency_p99_ms", "last_tenth_share", "ttft_p50_ms", "peak_memory_gb"]


def mps_state(row: dict) -> str:
    """"on" or "off" for a job (its manifest says why, e.g. "off (one process)"), "" in the bench's process."""
    return (row.get("mps") or "").split(" ")[0]


def engine_label(row: dict) -> str:
    return f"{row['system']} " + ("auto batch" if row["batch_size"] == "auto" else f"b{row['batch_size']}")


def label(row: dict) -> str:
    name = engine_label(row)
    if row["system"] == "continuous":
        name += f" {row.get('attention', 'sdpa')}" + ("" if row.get("cuda_graphs", True) else " eager")
        if row.get("temperature"):
            name += f" sampled T={row['temperature']}" + (f" top_p={row['top_p']}" if row.get("top_p", 1) < 1 else "")
            name += f" top_k={row['top_k']}" if row.get("top_k") else ""
        name += f" +{row['long_rows']} long rows" if row.get("long_rows") else ""
        if row.get("header_tokens"):
            name += f" {row.get('headers', 1)}x{row['header_tokens']}-token header"
        name += " no prefix cache" if row.get("share_prefix") is False else ""
        name += " no compaction" if row.get("compact") is False else ""
        if row.get("answer_median"):
            name += f" answers ~{row['answer_median']}" + ("" if row.get("answer_spread") else " each")
        name += f" constrained by {Path(row['json_schema']).name}" if row.get("json_schema") else ""
    if row.get("mode"):
        name += f" {row['mode']} x{row['procs']}" + (" MPS" if mps_state(row) == "on" else "")
    return name


def write_report(rows: list[dict], path: Path, results: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    lines = [
        "# Benchmark results", "",
        f"`{first['command']}` on {first['device_name']}, {first['date']}; commit {first['git_commit']}; "
        f"torch {first['torch']}, transformers {first['transformers']}; data in `{results}`.",
        "", "Random weights, EOS ignored (every request generates max_new_tokens), greedy unless the row has a temperature; "
        "`answers ~N`: each answer ends at a length drawn from a lognormal of median N (at most max_new_tokens), which "
        "the engine is not told. `last_tenth_share`: the share of the run its last 10% of requests to finish took. "
        "`vs_paper`: tokens/s over the paper's baseline (`generate` batch 20) in the same table. "
        "Systems with a `mode` ran as real jobs (`python -m jobs.run`: `procs` worker processes sharing "
        "one model, MPS on or off); the others in the benchmark's own process. `run_s`: the run, or for a "
        "job the span from its first prefill to its last token. `warmup_s`: warm-up, or for a job all but "
        "that span (start-up, model, data, warm-up, final writes). `job_s`: a job's launch to Parquet; in the bench's process, warm-up plus the run "
        "scaled to the preset's request count (what one job would take after model load). Latency and "
        "time to first token count from the run's start: every request is there at once, as in a batch "
        "job. `peak_memory_gb`: this process's allocations, or for a job the whole device's beyond what "
        "was in use before it (every worker's CUDA context included).", "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["max_new_tokens"]), []).append(row)
    for (model, new_tokens), group in groups.items():
        ok = [r for r in group if "error" not in r or r.get("error") is None]
        paper = next((r["tokens_per_s"] for r in ok if r["system"] == "generate" and str(r["batch_size"]) == "20"
                      and not r.get("mode")), None)
        full = max(r.get("requests", 0) for r in ok) if ok else 0
        lines += [f"## {model}, {new_tokens} new tokens, prompts of {group[0]['prompt_tokens_mean']} tokens on average",
                  "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
        for row in group:
            if row.get("error"):
                lines.append(f"| {row['system']} | {row.get('mode') or ''} | {row.get('procs', 1)} | | {row['batch_size']} "
                             f"| failed: {row['error']} |")
                continue
            derived = {"vs_paper": f"{row['tokens_per_s'] / paper:.1f}x" if paper else "",
                       "mode": row.get("mode") or "", "mps": mps_state(row),
                       "job_s": row.get("job_s") or round(row["warmup_s"] + row["run_s"] * full / row["requests"], 2)}
            lines.append("| " + " | ".join(str(derived.get(c, row.get(c, ""))) for c in COLUMNS) + " |")
        lines.append("")
        stem = f"{model.replace(':', '-')}-{new_tokens}"  # NAME:fp8: no colon in a file's name
        if ok:
            lines += [f"![throughput]({write_throughput_plot(ok, path.parent / f'throughput-{stem}.png').name})",
                      ""]
        if any(r.get("latency_ms") for r in ok):
            lines += [f"![latency]({write_latency_cdf(ok, path.parent / f'latency-{stem}.png').name})", ""]
        if any(r.get("procs", 1) > 1 for r in ok):
            lines += [f"![workers]({write_procs_plot(ok, path.parent / f'procs-{stem}.png').name})", ""]
    path.write_text("\n".join(lines))


def save_plot(figure, axes, rows: list[dict], path: Path) -> Path:
    """Titles a plot of one model and output length with the device, and writes it."""
    axes.set_title(f"{rows[0]['model']}, {rows[0]['max_new_tokens']} new tokens, {rows[0]['device_name']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_throughput_plot(rows: list[dict], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    axes.barh([label(r) for r in rows], [r["tokens_per_s"] for r in rows], color="tab:blue")
    axes.invert_yaxis()  # the grid order, top to bottom
    axes.set_xscale("log")
    axes.set_xlabel("generated tokens/s (log scale)")
    return save_plot(figure, axes, rows, path)


def write_latency_cdf(rows: list[dict], path: Path) -> Path:
    """Each system's request latencies (from the run's start, every request queued at once) as a CDF."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for row in rows:
        latencies = [ms / 1e3 for ms in row.get("latency_ms") or []]
        if latencies:
            axes.step(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))], where="post",
                      label=f"{label(row)} ({row['requests']} req)")
    axes.set_xscale("log")
    axes.set_xlabel("seconds from the run's start to the request's last token (log scale)")
    axes.set_ylabel("fraction of requests finished")
    axes.legend(fontsize=7, loc="lower right")
    return save_plot(figure, axes, rows, path)


def write_procs_plot(rows: list[dict], path: Path) -> Path:
    """Tokens/s against worker processes, one line per engine x mode x MPS, from the systems that ran as
    jobs; a one-process job (mode=single) starts every line of its engine."""
    jobs = [r for r in rows if r.get("mode")]
    lines: dict[tuple, list[dict]] = {}
    for row in jobs:
        if row["mode"] != "single":
            lines.setdefault((row["system"], row["batch_size"], row["mode"], mps_state(row)), []).append(row)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for (system, batch_size, mode, mps), points in lines.items():
        single = [r for r in jobs if r["mode"] == "single" and (r["system"], r["batch_size"]) == (system, batch_size)]
        points = sorted(single + points, key=lambda r: r["procs"])
        axes.plot([r["procs"] for r in points], [r["tokens_per_s"] for r in points], marker="o",
                  linestyle="-" if mps == "on" else "--", label=f"{engine_label(points[-1])} {mode}, MPS {mps}")
    axes.set_xscale("log", base=2)
    procs = sorted({r["procs"] for r in jobs})
    axes.set_xticks(procs, [str(n) for n in procs])
    axes.set_yscale("log")
    axes.set_xlabel("worker processes on the GPU")
    axes.set_ylabel("generated tokens/s (log scale)")
    axes.legend(fontsize=7)
    return save_plot(figure, axes, rows, path)


def write_timeline(out_dir: Path, path: Path, run: int | None = None) -> None:
    """A job's timeline (timing.parquet): one lane per worker, each request's prefill (from its start to
    its first token, on the worker that prefilled it) and decode (to its last token, on the worker that
    decoded it). Spans overlap within a lane: a continuous engine runs many requests at once."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    timing = pq.read_table(Path(out_dir) / "timing.parquet")
    run = pc.max(timing["run"]).as_py() if run is None else run
    rows = timing.filter(pc.equal(timing["run"], run)).to_pylist()
    gpu_of = {r[key]: r["gpu"] for r in rows for key in ("worker", "prefill_worker")}
    workers = sorted(gpu_of, key=lambda worker: (gpu_of[worker] or 0, worker))  # grouped by GPU
    lane = {worker: i for i, worker in enumerate(workers)}
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(workers)))
    s = 1e-3  # ms → s
    for worker in workers:
        prefill = [(r["prefill_start_ms"] * s, (r["first_token_ms"] - r["prefill_start_ms"]) * s)
                   for r in rows if r["prefill_worker"] == worker]
        decode = [(r["first_token_ms"] * s, (r["finish_ms"] - r["first_token_ms"]) * s)
                  for r in rows if r["worker"] == worker]
        ax.broken_barh(decode, (lane[worker] - 0.35, 0.3), color="tab:blue", alpha=0.15)
        ax.broken_barh(prefill, (lane[worker] + 0.05, 0.3), color="tab:orange", alpha=0.3)
    several_gpus = len(set(gpu_of.values())) > 1
    ax.set_yticks(range(len(workers)), [f"GPU {gpu_of[w]} worker {w}" if several_gpus else f"worker {w}" for w in workers])
    ax.set_xlabel("seconds since the job started")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:orange"), plt.Rectangle((0, 0), 1, 1, color="tab:blue")],
              labels=["prefill", "decode"], loc="upper right")
    ax.set_title(f"{Path(out_dir).name}: run {run}, {len(rows)} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
