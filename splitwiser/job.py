"""One job, start to end: read the data, plan the run, load the model, then, holding the output directory,
prepare the requests, generate, and write the merged outputs and the manifest.

    from splitwiser.job import run
    manifest = run(job_config)
"""

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow as pa
import torch
from datasets import Dataset

from splitwiser import openai_batch, parsed
from splitwiser.colocated import generate_units, run_colocated
from splitwiser.config import JobConfig, SamplingConfig, to_plain_dict
from splitwiser.data import data_path, kept_column, read_dataset
from splitwiser.engine import Choice, make_engine
from splitwiser.errors import UserError, WorkersFailed
from splitwiser.models import LoadedModel, load_model, resolve_devices
from splitwiser.mps import MPSState, mps_session
from splitwiser.output import GENERATION_SCHEMA, OutputDir, check_free_space, write_json
from splitwiser.plan import Plan, choose_procs, plan_run, seconds_since_process_start
from splitwiser.prepare import Prepared, prepare_requests, row_ids, uses_chat, write_shards
from splitwiser.progress import Progress
from splitwiser.score import METRICS, score_output
from splitwiser.split import run_split
from splitwiser.workers import Totals, Work, fork_server_running

log = logging.getLogger(__name__)


def choice_of(job: JobConfig) -> Choice:
    return Choice(job.sampling, job.sampled, job.constrained, job.prompt.thinking is True)


def parsed_of(job: JobConfig) -> Callable[[pa.Table], pa.Table] | None:
    """sampling.json_schema: what adds the answers' values to generations.parquet (parsed.with_parsed)."""
    if not job.sampling.json_schema:
        return None
    return partial(parsed.with_parsed, schema=job.sampling.schema, expand=job.output.expand_json)


def fingerprint(job: JobConfig) -> dict:
    """What makes two runs the same job, so that one may resume the other."""
    return {
        "model": job.model.path, "weights": job.model.weights, "dtype": job.model.dtype,
        "tokenizer": job.model.tokenizer, "data": str(data_path(job.data.path)),
        "text_column": job.data.text_column, "part": [job.data.part, job.data.parts], "prompt": _prompt(job),
        "max_new_tokens": job.engine.max_new_tokens, "ignore_eos": job.engine.ignore_eos,
        **_changed_sampling(job),  # none: as jobs were before sampling
        **({"messages_column": job.data.messages_column} if job.data.messages_column else {}),
        **({"quantization": job.model.quantization} if job.model.quantization else {}),
    }


def _prompt(job: JobConfig) -> dict:
    """The prompt settings that are set (an optional one left unset, as prompt.thinking: as jobs were before it)."""
    return {k: v for k, v in to_plain_dict(job.prompt).items() if v is not None}


def _changed_sampling(job: JobConfig) -> dict:
    """The sampling settings and per-row columns that differ from the defaults, as fingerprint entries; of a job
    that samples no row, only those that change greedy outputs (a seed or top_p changes nothing there)."""
    defaults = to_plain_dict(SamplingConfig())
    greedy_settings = ("repetition_penalty", "n", "stop", "logprobs", "json_schema", "regex", "choice")
    changed = {k: v for k, v in to_plain_dict(job.sampling).items()
               if v != defaults[k] and (job.sampled or k in greedy_settings)}
    if job.sampling.json_schema:  # the schema itself: a file's may change under the same path
        changed["json_schema"] = hashlib.sha256(job.sampling.grammar.encode()).hexdigest()
    per_row = {k: getattr(job.data, k) for k in ("max_new_tokens_column", "temperature_column", "json_schema_column")
               if getattr(job.data, k)}
    return ({"sampling": changed} if changed else {}) | per_row


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:  # e.g. run from a checkout on PYTHONPATH
        return None


def git_commit(checkout: Path = Path(__file__).parent) -> str | None:
    """The checkout's commit, `-dirty` after it where tracked files differ from it (the code that ran is not that
    commit's); None outside a git checkout."""
    git = partial(subprocess.run, capture_output=True, text=True, cwd=checkout, timeout=5)
    try:
        commit = git(["git", "rev-parse", "HEAD"]).stdout.strip()
        changed = git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not commit:
        return None
    return commit + ("-dirty" if changed else "")


def environment(loaded: LoadedModel) -> dict:
    commit = os.environ.get("SPLITWISER_GIT_COMMIT") or git_commit()  # the variable: a copy without git history
    device = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": str(loaded.device), "device_name": device, "dtype": str(loaded.dtype).removeprefix("torch."),
        "git_commit": commit, "python": platform.python_version(),
        **{name: installed_version(name) for name in ("splitwiser", "torch", "transformers", "datasets", "pyarrow")},
    }


class Stages:
    """When a run started, and the seconds spent in each of its stages, for the manifest and timing.parquet.
    from_launch: the run is its process's (jobs.run), whose time counts from the launch: Python's start-up, the
    imports and the config are its first stage (launch_s)."""

    def __init__(self, from_launch: bool = False) -> None:
        self.started = datetime.now(timezone.utc)
        self.start_ns = time.perf_counter_ns()  # timing.parquet's times are from here
        launch_s = seconds_since_process_start() if from_launch else None
        self.seconds: dict[str, float] = {} if launch_s is None else {"launch_s": round(launch_s, 3)}
        self.before_s = launch_s or 0.0
        self.mark = time.perf_counter()

    def wall_s(self) -> float:
        return self.before_s + (time.perf_counter_ns() - self.start_ns) / 1e9

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.mark, 3)
        self.mark = now


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


def run(job: JobConfig, from_launch: bool = False) -> dict:
    """Runs the job; returns its manifest. Everything that can refuse it is checked before the output directory
    is created or changed. from_launch: the process runs this job alone (jobs.run), its wall time counts from its
    launch (Stages)."""
    # What starting workers would cost beyond their engines' warm-up (procs=auto): nothing if the fork
    # server runs already (jobs.run starts it with the process), else about this process's own imports.
    worker_imports_s = 0.0 if fork_server_running() else seconds_since_process_start()
    stages = Stages(from_launch)
    job, out, rows, plan = checked_inputs(job)
    stages.done("read_s")
    # MPS before any worker starts: they take its settings before their first CUDA call. One control daemon
    # serves every GPU of the node.
    with mps_session(job.mps, wanted=plan.wants_mps) as mps:
        models = [load_model(replace(job.model, device=str(device))) for device in plan.devices]
        check_max_new_tokens(job.engine.max_new_tokens, models[0].context_length)
        stages.done("load_model_s")
        with out.locked():  # every check has passed: the directory is created (or cleared) and is ours
            return Run(job, out, models, mps, stages, worker_imports_s)(rows, plan)


def checked_inputs(job: JobConfig) -> tuple[JobConfig, OutputDir, Dataset, Plan]:
    """The job (an OpenAI batch file's columns filled in), its output directory (checked, nothing written), its
    rows and its plan: what can refuse a job fails here, in a second, before the model loads."""
    job = openai_batch.configure(job)  # an OpenAI batch file: its requests' columns
    check_kept(job.output.keep_columns)
    if job.output.expand_json and job.sampling.json_schema:
        parsed.check_expand(job.sampling.schema, [*GENERATION_SCHEMA.names, *METRICS, *job.output.keep_columns])
    out = OutputDir(job.output.dir)
    out.check(fingerprint(job), job.output.overwrite)
    rows = read_dataset(job.data, job.prompt, job.output.keep_columns, job.sampling)
    return job, out, rows, plan_run(job, resolve_devices(job.model.device, job.gpus))


def estimate(job: JobConfig) -> dict:
    """dry_run=true: what the job would generate, and about how long that takes, with nothing written: its rows
    (those a rerun would reuse apart), their prompt tokens, the tokens to generate at most (every answer to its
    max_new_tokens), and the time those take at the decode rate the engine measures at its batch size on this
    device (a probe of a few steps: answers that end sooner take less; prefill and a job's start not counted)."""
    start = time.perf_counter()
    job, out, rows, plan = checked_inputs(job)
    loaded = load_model(replace(job.model, device=str(plan.devices[0])))
    check_max_new_tokens(job.engine.max_new_tokens, loaded.context_length)
    prepared = prepare_requests(rows, job.data, job.prompt, loaded.tokenizer,
                                loaded.context_length - job.engine.max_new_tokens, out.done(), job.sampling.n,
                                job.engine.max_new_tokens)
    requests = prepared.requests
    plan = plan.for_requests(requests, job.engine)
    engine = make_engine(loaded, job.engine, plan.slot_length, len(requests), choice_of(job),
                         plan.prompt_lengths)
    tokens = sum(n or job.engine.max_new_tokens for n in requests["max_new_tokens"][:])  # None: the job's
    rate = decode_rate(engine) if len(requests) else None
    return {"rows": len(job.data.part_rows(len(rows))), "requests": len(requests), "reused": len(prepared.reused),
            "errors": len(prepared.errors), "prompt_tokens": sum(requests["prompt_tokens"][:]),
            "max_new_tokens": tokens, "device": str(loaded.device), "batch_size": engine.cfg.batch_size,
            "decode_tokens_per_s": rate and round(rate), "generate_s_at_most_tokens": rate and round(tokens / rate, 1),
            "estimate_took_s": round(time.perf_counter() - start, 1)}


def decode_rate(engine) -> float | None:
    """Decode tokens/s at the engine's batch size (its probe's bucket for it; the probe runs now where
    batch_size=auto has not run it), None for an engine without a probe (engine.kind=generate)."""
    if not hasattr(engine, "probe"):
        return None
    rates = engine.probe_tokens_per_s or engine.probe()
    return rates[min((bucket for bucket in rates if bucket >= engine.cfg.batch_size), default=max(rates))]


def peak_rss_mb() -> float | None:
    """This process's peak resident memory since it started its program (Linux's VmHWM), None elsewhere."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((round(int(line.split()[1]) / 1024, 1) for line in lines if line.startswith("VmHWM:")), None)


def check_kept(keep_columns: list[str]) -> None:
    """output.keep_columns may not name a column that generations.parquet has of its own."""
    own = [name for name in keep_columns if name in GENERATION_SCHEMA.names or name in METRICS]
    if own:
        raise UserError(f"output.keep_columns: {own[0]} is a column of generations.parquet already "
                        f"({', '.join([*GENERATION_SCHEMA.names, *METRICS])})")


def check_max_new_tokens(max_new_tokens: int, context_length: int) -> None:
    if max_new_tokens >= context_length:
        raise UserError(f"engine.max_new_tokens={max_new_tokens}: the model's context is {context_length} tokens, "
                        "prompt and generation together; give fewer")


class Run:
    """One run of a job in its output directory, which it holds locked: the steps that write there."""

    def __init__(self, job: JobConfig, out: OutputDir, models: list[LoadedModel], mps: MPSState, stages: Stages,
                 worker_imports_s: float | None):
        self.job, self.out, self.models, self.mps, self.stages = job, out, models, mps, stages
        self.worker_imports_s = worker_imports_s
        self.index = len(out.start_run(fingerprint(job), job.output.overwrite, stages.started.isoformat())) - 1
        self.prompts_done = out.done()  # (id, sample) → the prompt of its generation on disk
        self.probe: dict[int, float] | None = None  # engine.batch_size=auto on a GPU: the decode probe it chose from

    def __call__(self, rows, plan: Plan) -> dict:
        try:
            prepared = self.prepare(rows)
            plan = plan.for_requests(prepared.requests, self.job.engine)
            work = self.work(prepared, plan)
        except UserError:  # refused before any generation (a disk too small): the requests written go
            shutil.rmtree(self.out.shards, ignore_errors=True)
            raise
        self.stages.done("prepare_s")
        engine, plan = self.warm_up(plan, work.requests)
        totals = self.generate(plan, engine, work)
        self.stages.done("generate_s")
        return self.finish(rows, plan, prepared, totals, engine)

    def prepare(self, rows) -> Prepared:
        """The rows of this part as requests, less those already done, and the errors."""
        job, loaded = self.job, self.models[0]
        max_prompt = loaded.context_length - job.engine.max_new_tokens
        rows_here = len(job.data.part_rows(len(rows)))
        # The least the requests take, before they are written: the part's texts and its generated tokens' ids.
        check_free_space(self.out.path,
                         rows.data.nbytes * rows_here // len(rows) + 4 * rows_here * job.engine.max_new_tokens)
        shutil.rmtree(self.out.shards, ignore_errors=True)
        self.out.shards.mkdir()
        prepared = prepare_requests(rows, job.data, job.prompt, loaded.tokenizer, max_prompt, self.prompts_done,
                                    job.sampling.n, job.engine.max_new_tokens, self.out.shards / "prepared.arrow")
        log.info("%d rows: %d already done, %d to generate, %d set aside (errors.parquet)",
                 rows_here, len(prepared.reused), len(prepared.requests), len(prepared.errors))
        return prepared

    def work(self, prepared: Prepared, plan: Plan) -> Work:
        """The requests as Arrow shards of work units, and what the engines need to know about them."""
        requests, cfg = prepared.requests, self.job.engine
        # The least the outputs take: shards of the prompts' token ids, and the generated token ids.
        check_free_space(self.out.path, 4 * (sum(requests["prompt_tokens"][:]) + len(requests) * cfg.max_new_tokens))
        shards = self.out.shards / "requests"
        return Work(cfg=cfg, slot_length=plan.slot_length, choice=choice_of(self.job),
                    requests=len(requests), threads=torch.get_num_threads(),
                    shards=shards, unit_count=write_shards(requests, shards, plan.unit_rows), out=self.out,
                    run_index=self.index, job_start_ns=self.stages.start_ns, prompt_lengths=plan.prompt_lengths)

    def warm_up(self, plan: Plan, requests: int):
        """mode=single's engine, warmed up before the progress bar starts (so that its tokens/s is the generation's);
        with procs=auto, the probe that decides whether workers run instead (they build their own engines)."""
        if plan.mode != "single" and plan.procs_auto is None:
            return None, plan
        start = time.perf_counter()
        engine = make_engine(self.models[0], self.job.engine, plan.slot_length, requests,
                             choice_of(self.job), plan.prompt_lengths)
        if requests:
            engine.warm_up()
        self.probe = getattr(engine, "probe_tokens_per_s", None)
        if plan.procs_auto is not None:
            # Each worker would build and warm up its own engine, as this process just did.
            start_up_s = None if self.worker_imports_s is None else self.worker_imports_s + time.perf_counter() - start
            plan = plan.with_procs(*choose_procs(engine, requests, start_up_s))
            log.info("procs=auto: %d (%s)", plan.procs, plan.procs_auto)
            if plan.mode != "single":
                engine = None
                torch.cuda.empty_cache()  # the workers size their KV caches by the free memory: give this one's back
        self.stages.done("warm_up_s")
        return engine, plan

    def generate(self, plan: Plan, engine, work: Work) -> Totals:
        """Every work unit through the engine (mode=single) or the workers, with a progress bar."""
        with Progress(work.requests, self.job.output.progress) as progress, mps_blamed_for_dead_workers(self.mps):
            if plan.mode == "single":
                tokens = generate_units(engine, work, range(work.unit_count), worker=0, progress=progress)
                return Totals(tokens, engine.oom_splits, engine.cfg.batch_size, getattr(engine, "fallback_from", None),
                              getattr(engine, "kv_tokens", 0), getattr(engine, "kv_peak_tokens", 0))
            if not work.unit_count:
                return Totals()
            return {"colocated": run_colocated, "split": run_split}[plan.mode](self.models, plan, work, progress)

    def finish(self, rows, plan: Plan, prepared: Prepared, totals: Totals, engine) -> dict:
        """Records the run in job.json, merges the outputs, writes the manifest, scores every row kept against its
        reference (those of earlier runs too: a resumed job ends with all its rows scored), then records the run's
        wall time with all that in it (finish_s); returns the manifest."""
        manifest = self.merge_and_score(rows, plan, prepared, totals, engine)
        self.stages.done("finish_s")
        wall_s = self.stages.wall_s()
        runs = self.out.finish_run({"wall_s": round(wall_s, 3), "stages": self.stages.seconds,
                                    "job_tokens_per_s": round(totals.generated_tokens / wall_s, 1),
                                    "peak_rss_mb": peak_rss_mb()})
        manifest |= {"wall_s_last_run": round(wall_s, 3), "runs": runs,
                     "wall_s_finished_runs": round(sum(r.get("wall_s", 0) for r in runs), 3)}
        write_json(manifest, self.out.manifest_path)
        return manifest

    def merge_and_score(self, rows, plan: Plan, prepared: Prepared, totals: Totals, engine) -> dict:
        """The run's record in job.json (as it stands before this), the merged outputs, the manifest, the scores."""
        wall_s = self.stages.wall_s()
        runs = self.out.finish_run(self.record(plan, prepared, totals, engine, wall_s))
        job, loaded = self.job, self.models[0]
        manifest = {
            "fingerprint": fingerprint(job),
            "config": to_plain_dict(job),
            "weights": job.model.weights,  # "random": timing only, the generations are meaningless
            "model_source": loaded.source,
            "environment": environment(loaded),
            "rows": {"input": len(job.data.part_rows(len(rows))), **({"samples_per_row": job.sampling.n}
                                                                      if job.sampling.n > 1 else {})},
            "wall_s_last_run": round(wall_s, 3),
            "wall_s_finished_runs": round(sum(r.get("wall_s", 0) for r in runs), 3),
            "runs": runs,  # every run of this job, as it started: a killed one shows finished: false
        }
        generated = prepared.requests.select_columns(["id", "sample", "prompt"])[:]
        wanted = pa.table({"id": generated["id"] + [i for i, _ in prepared.reused],
                           "sample": generated["sample"] + [sample for _, sample in prepared.reused],
                           "prompt": generated["prompt"] + [self.prompts_done[key] for key in prepared.reused]})
        manifest = self.out.finalize(prepared.errors.with_format("arrow")[:], wanted, manifest, self.kept(rows),
                                     parsed_of(job))
        if job.output.format == "openai_batch":
            self.write_results(rows)
        return score_output(self.out.path, torch.get_num_threads()) if job.data.reference_column else manifest

    def kept(self, rows) -> pa.Table | None:
        """output.keep_columns' values of the input's rows, by the rows' ids (for OutputDir.finalize)."""
        keep = self.job.output.keep_columns
        if not keep:
            return None
        table = rows.select_columns([kept_column(name) for name in keep]).with_format("arrow")[:]
        ids, _ = row_ids(rows, self.job.data.id_column)
        return pa.table({"id": ids, **{name: table[kept_column(name)] for name in keep}})

    def write_results(self, rows) -> None:
        """output.format=openai_batch: results.jsonl, a line per row of this part, in the input's order."""
        job, part = self.job, self.job.data.part_rows(len(rows))
        names, written = row_ids(rows, job.data.id_column)
        if job.data.messages_column:  # a conversation's JSON text is a list; a raw prompt's, a string
            chat = [not (text or "[").startswith('"') for text in rows[job.data.messages_column][part.start:part.stop]]
        else:
            chat = [uses_chat(job.prompt, self.models[0].tokenizer)] * len(part)
        requests = list(zip(names[part.start:part.stop], written[part.start:part.stop], chat))
        openai_batch.write_results(self.out.path, requests, job.model.name, fingerprint(job), self.out.job_id)

    def record(self, plan: Plan, prepared: Prepared, totals: Totals, engine, wall_s: float) -> dict:
        """This run's figures, for job.json and the manifest's runs."""
        generate_s = self.stages.seconds["generate_s"]
        kind = type(engine).__name__ if plan.mode == "single" else plan.engine_kind(self.job.engine.kind)
        ran = {"batch_size": totals.batch_size} if totals.batch_size is not None else {}  # no engine ran: none
        ran |= {"fallback_from": totals.fallback_from} if totals.fallback_from else {}
        # the KV cache's size and the most of it the requests held at once, in tokens
        ran |= {"kv_tokens": totals.kv_tokens, "kv_peak_tokens": totals.kv_peak_tokens} if totals.kv_tokens else {}
        probe = {"probe_tokens_per_s": {str(b): round(v) for b, v in self.probe.items()}} if self.probe else {}
        return {
            "wall_s": round(wall_s, 3), "stages": self.stages.seconds, **plan.record(),
            "engine": {"kind": kind, **ran, **probe}, "mps": self.mps.note,
            "rows_generated": len(prepared.requests), "rows_skipped_done": len(prepared.reused),
            "generated_tokens": totals.generated_tokens, "cpu_threads": torch.get_num_threads(),
            "corrupt_parts_moved_aside": self.out.moved_aside,
            "oom_splits": totals.oom_splits,  # batches run as halves because they ran out of memory
            "generated_tokens_per_s": round(totals.generated_tokens / generate_s, 1) if generate_s > 0 else None,
            "job_tokens_per_s": round(totals.generated_tokens / wall_s, 1),
        }
