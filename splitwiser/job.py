"""One job: dataset → Arrow shards → generations → Parquet + manifest.

    from splitwiser.job import run
    manifest = run(job_config)
"""

import contextlib
import logging
import os
import platform
import subprocess
import time
from dataclasses import replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow as pa
import torch

from splitwiser.config import JobConfig, to_plain_dict
from splitwiser.errors import UserError, WorkersFailed
from splitwiser.data import data_path, prepare_requests, read_dataset, write_shards
from splitwiser.engine import ContinuousEngine, make_engine
from splitwiser.models import LoadedModel, load_model, resolve_devices
from splitwiser.mps import MPSState, mps_session
from splitwiser.output import OutputDir, check_free_space
from splitwiser.progress import Progress
from splitwiser.workers import fork_server_running, generate_units, run_colocated, run_split

log = logging.getLogger(__name__)


def fingerprint(job: JobConfig) -> dict:
    """What makes two runs the same job, so that one may resume the other."""
    return {
        "model": job.model.path, "weights": job.model.weights, "dtype": job.model.dtype,
        "tokenizer": job.model.tokenizer, "data": str(data_path(job.data.path)),
        "text_column": job.data.text_column, "part": [job.data.part, job.data.parts], "prompt": to_plain_dict(job.prompt),
        "max_new_tokens": job.engine.max_new_tokens, "ignore_eos": job.engine.ignore_eos,
    }


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:  # e.g. run from a checkout on PYTHONPATH
        return None


def environment(loaded: LoadedModel) -> dict:
    commit = os.environ.get("SPLITWISER_GIT_COMMIT")  # where the code runs from a copy without git history
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
        except OSError:
            commit = None
    device = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": str(loaded.device), "device_name": device, "dtype": str(loaded.dtype).removeprefix("torch."),
        "git_commit": commit, "python": platform.python_version(),
        **{name: installed_version(name) for name in ("splitwiser", "torch", "transformers", "datasets", "pyarrow")},
    }


class Stages:
    """When a run started, and the seconds spent in each of its stages, for the manifest and timing.parquet."""

    def __init__(self) -> None:
        self.started = datetime.now(timezone.utc)
        self.start_ns = time.perf_counter_ns()  # timing.parquet's times are from here
        self.seconds: dict[str, float] = {}
        self.mark = time.perf_counter()

    def wall_s(self) -> float:
        return (time.perf_counter_ns() - self.start_ns) / 1e9

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.mark, 3)
        self.mark = now


# Generation tokens/s of 2 colocated workers with MPS over one process, measured on an H100 (bench/NOTES.md,
# runs 8, 11 and 13: 1.29x, 1.41x, 1.16x); the lowest, erring towards one process.
COLOCATED_GAIN = 1.16
# A one-process job's generation tokens/s over its decode probe's (the prefills, the waves' tails and the host's
# work between them), measured on an H100 with OPT-125m, 64 tokens (bench/NOTES.md, runs 13, 15 and 16:
# 0.55, 0.51, 0.55, 0.51, 0.56, 0.58): taking the probe alone put a 60,000-row job's generation at half its time.
JOB_SHARE_OF_PROBE = 0.55


def seconds_since_process_start() -> float | None:
    """How long this process has run (Linux): Python's start-up and imports, which every worker repeats."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in ticks since boot
    except (OSError, ValueError, IndexError):
        return None


def choose_procs(engine, requests: int, start_up_s: float | None) -> tuple[int, dict]:
    """procs=auto: 2 colocated workers when the time they would save (the generation, estimated from the
    engine's decode probe and JOB_SHARE_OF_PROBE, run COLOCATED_GAIN times faster) is more than `start_up_s`, what starting them
    costs (None: unknown, too much); else 1. Returns (procs, the reasons, for the manifest)."""
    if engine.device.type != "cuda" or not isinstance(engine, ContinuousEngine):
        return 1, {"procs": 1, "why": "workers gain only on a CUDA GPU, measured with engine.kind=continuous"}
    probe = engine.probe_tokens_per_s or engine.probe()
    tokens_per_s = probe[engine.cfg.batch_size]
    generation_s = requests * engine.cfg.max_new_tokens / (tokens_per_s * JOB_SHARE_OF_PROBE)
    saved_s = generation_s * (1 - 1 / COLOCATED_GAIN)
    procs = 2 if start_up_s is not None and saved_s > start_up_s else 1
    return procs, {"procs": procs, "decode_tokens_per_s": round(tokens_per_s), "estimated_generation_s": round(generation_s, 2),
                   "saved_by_2_workers_s": round(saved_s, 2), "worker_start_up_s": start_up_s and round(start_up_s, 2),
                   "assumed_gain": COLOCATED_GAIN}


@contextlib.contextmanager
def mps_blamed_for_dead_workers(mps: MPSState):
    """When every worker died under MPS, say so: a dying MPS server takes all its clients with it."""
    try:
        yield
    except WorkersFailed as e:
        if not mps.active:
            raise
        raise WorkersFailed(f"{e} (MPS was {mps.note}: if its server died, the rerun starts a new one; "
                            "mps=off runs without it)") from None


def run(job: JobConfig) -> dict:
    # What starting workers would cost beyond their engines' warm-up (procs=auto): nothing if the fork
    # server runs already (jobs.run starts it with the process), else about this process's own imports.
    worker_imports_s = 0.0 if fork_server_running() else seconds_since_process_start()
    stages = Stages()
    out = OutputDir(job.output.dir)
    out.check(fingerprint(job), job.output.overwrite)  # refused before anything is read, loaded or written
    rows = read_dataset(job.data)  # before the model: a bad path or column fails in a second
    stages.done("read_s")
    devices = resolve_devices(job.model.device, job.gpus)
    mode = job.run_mode(len(devices))
    auto_procs = job.procs == "auto"
    # MPS before any worker starts (with procs=auto on a GPU, workers may follow): they take its settings
    # before their first CUDA call. The parent's CUDA was initialised by the device check above, so it
    # is not a client itself (seen on the H100: sharing its tensors with the clients works; bench/NOTES.md
    # run 13). One control daemon serves every GPU of the node.
    with mps_session(job.mps, wanted=mode != "single" or (auto_procs and devices[0].type == "cuda")) as mps:
        models = [load_model(replace(job.model, device=str(device))) for device in devices]
        loaded = models[0]  # the tokenizer and context length are the same on every device
        check_max_new_tokens(job.engine.max_new_tokens, loaded.context_length)
        stages.done("load_model_s")
        with out.locked():  # every check has passed: the directory is created (or cleared) and is ours
            return run_locked(job, out, rows, mode, models, mps, stages, worker_imports_s)


def check_max_new_tokens(max_new_tokens: int, context_length: int) -> None:
    if max_new_tokens >= context_length:
        raise UserError(f"engine.max_new_tokens={max_new_tokens}: the model's context is {context_length} tokens, "
                        "prompt and generation together; give fewer")


def run_locked(job: JobConfig, out: OutputDir, rows, mode: str, models: list[LoadedModel], mps: MPSState,
               stages: Stages, worker_imports_s: float | None) -> dict:
    """The part of the job that writes into the output directory, which it holds locked."""
    auto_procs, loaded, devices = job.procs == "auto", models[0], [model.device for model in models]
    rows_in = len(job.data.part_rows(len(rows)))
    runs = out.start_run(fingerprint(job), job.output.overwrite, stages.started.isoformat())
    done = out.done()
    max_prompt = loaded.context_length - job.engine.max_new_tokens
    requests, errors, reused = prepare_requests(rows, job.data, job.prompt, loaded.tokenizer, max_prompt, done)
    log.info("%d rows: %d already done, %d to generate, %d set aside (errors.parquet)",
             rows_in, len(reused), len(requests), len(errors))
    # The least the outputs take: shards of the prompts' token ids, and the generated token ids.
    check_free_space(out.path, 4 * (sum(requests["prompt_tokens"]) + len(requests) * job.engine.max_new_tokens))
    shards = out.path / "shards"
    # Units small enough that every worker gets several: one that finishes early takes more.
    most_procs = 2 if auto_procs else job.procs
    unit_rows = min(job.engine.shard_rows, max(1, -(-len(requests) // (4 * most_procs * len(devices)))))
    unit_count = write_shards(requests, shards, unit_rows)
    max_prompt_tokens = max(requests["prompt_tokens"], default=1)
    stages.done("prepare_s")

    procs, engine_info = (1 if auto_procs else job.procs), {}
    if mode == "single" or auto_procs:  # warmed up before the bar starts, so that its tokens/s is generation's
        warm_up_start = time.perf_counter()
        engine = make_engine(loaded, job.engine, max_prompt_tokens, len(requests))
        if len(requests):
            engine.warm_up()
        engine_info["batch_size"] = engine.cfg.batch_size
        if getattr(engine, "probe_tokens_per_s", None):  # batch_size=auto on a GPU: what it was chosen from
            engine_info["probe_tokens_per_s"] = {str(b): round(v) for b, v in engine.probe_tokens_per_s.items()}
        if auto_procs:
            # Each worker builds and warms up its own engine, as this process just did.
            start_up_s = None if worker_imports_s is None else worker_imports_s + time.perf_counter() - warm_up_start
            procs, engine_info["procs_auto"] = choose_procs(engine, len(requests), start_up_s)
            log.info("procs=auto: %d (%s)", procs, engine_info["procs_auto"])
            if procs > 1 or len(devices) > 1:
                mode = "colocated"
                del engine, engine_info["batch_size"]  # the workers build their own engines
                torch.cuda.empty_cache()  # and size their KV caches by the free memory: give this one's back
        stages.done("warm_up_s")
    if mode == "single":
        engine_info["kind"] = type(engine).__name__
    else:  # each worker builds and warms up its own engine: part of generate_s here
        engine_info["kind"] = (f"{procs} x {job.engine.kind} (colocated)" if mode == "colocated" else
                               f"{job.prompt_procs} prompt + {job.token_procs} token workers (split)")
        if len(devices) > 1:
            engine_info["kind"] += f" on each of {len(devices)} devices"
    with Progress(len(requests), job.output.progress) as progress, mps_blamed_for_dead_workers(mps):
        if mode == "single":
            generated = generate_units(engine, shards, list(range(unit_count)), unit_count, out, worker=0,
                                       run_index=len(runs) - 1, job_start_ns=stages.start_ns, progress=progress)
            oom_splits = engine.oom_splits
        elif unit_count:
            work = dict(shards=shards, unit_count=unit_count, out=out, run_index=len(runs) - 1,
                        job_start_ns=stages.start_ns)
            if mode == "colocated":
                totals = run_colocated(models, job.engine, procs, max_prompt_tokens, len(requests),
                                       progress, **work)
            else:
                totals = run_split(models, job.engine, job.prompt_procs, job.token_procs, max_prompt_tokens,
                                   len(requests), progress, **work)
            generated, oom_splits = totals["generated_tokens"], totals["oom_splits"]
            engine_info["batch_size"] = totals["batch_size"]  # of all the decoding workers together
        else:
            generated = oom_splits = 0
    stages.done("generate_s")
    generate_s = stages.seconds["generate_s"]

    wall_s = stages.wall_s()
    runs = out.finish_run({
        "wall_s": round(wall_s, 3), "stages": stages.seconds,
        "engine": engine_info, "devices": [str(device) for device in devices], "procs": procs, "mode": mode,
        "mps": mps.note,
        "rows_generated": len(requests), "rows_skipped_done": len(reused), "generated_tokens": generated,
        "cpu_threads": torch.get_num_threads(), "corrupt_parts_moved_aside": out.moved_aside,
        "oom_splits": oom_splits,  # batches run as halves because they ran out of memory (engine.memory_cap_mb)
        "generated_tokens_per_s": round(generated / generate_s, 1) if generate_s > 0 else None,
        "job_tokens_per_s": round(generated / wall_s, 1),
    })
    manifest = {
        "fingerprint": fingerprint(job),
        "config": to_plain_dict(job),
        "weights": job.model.weights,  # "random": timing only, the generations are meaningless
        "model_source": loaded.source,
        "environment": environment(loaded),
        "rows": {"input": rows_in},
        "wall_s_last_run": round(wall_s, 3),
        "wall_s_finished_runs": round(sum(r.get("wall_s", 0) for r in runs), 3),
        "runs": runs,  # every run of this job, as it started: a killed one shows finished: false
    }
    generated_ids = requests.select_columns(["id", "prompt"])[:]
    wanted = pa.table({"id": generated_ids["id"] + reused, "prompt": generated_ids["prompt"] + [done[i] for i in reused]})
    return out.finalize(errors.with_format("arrow")[:], wanted, manifest)
