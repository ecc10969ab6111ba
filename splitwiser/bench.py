"""The benchmark: one workload (radiology findings → impression) through each system, on one device in
one run, so that ratios between rows are fair.

Systems:
- generate: transformers `generate`, batch by batch (batch 20 is the paper's baseline);
- generate_static: the same with `cache_implementation="static"` (transformers compiles the decode step);
- generate_batch: transformers' own continuous batching;
- continuous: Splitwiser's engine (KV slots, continuous batching, CUDA graphs).
In the bench's own process (measure), each is warmed up on one batch first (compilation, graph
capture: reported as warmup_s), then timed on the whole request set. With a `mode`, generate or
continuous runs as a real job instead (measure_job: `python -m jobs.run`, `procs` worker processes
sharing one model, MPS off or on): the paper's N x generate, and Splitwiser's colocated and split modes.
"""

import json
import logging
import math
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq
import torch
from datasets import Dataset
from transformers import GenerationConfig

from splitwiser.config import DataConfig, EngineConfig, PromptConfig, SamplingConfig
from splitwiser.errors import UserError
from splitwiser.data import read_dataset
from splitwiser.engine import Choice, ContinuousEngine, GenerateEngine, make_engine
from splitwiser.models import LoadedModel
from splitwiser.plan import longest_prompts, slot_length
from splitwiser.prepare import prepare_requests
from splitwiser.request import Generation, Request

log = logging.getLogger(__name__)


@dataclass
class System:
    name: str  # generate | generate_static | generate_batch | continuous
    batch_size: int | str = 256  # a job may leave it to the job: auto
    requests: int | None = None  # fewer than the preset's, for the slow baselines
    cuda_graphs: bool = True
    attention: str = "auto"  # continuous: auto | live | sdpa
    repeats: int = 1  # timed runs; the median is reported (short runs are noisy)
    # A job (`python -m jobs.run`) instead of the bench's process: single | colocated | split, with `procs`
    # worker processes and mps=off|on|auto. name is the engine: generate or continuous.
    mode: str | None = None
    procs: int = 1
    mps: str = "auto"
    temperature: float = 0.0  # continuous: sampled (sampler.py) instead of greedy, with top_p and top_k
    top_p: float = 1.0
    top_k: int = 0
    long_rows: int = 0  # in the bench's process: this many rows of ~3,000 tokens among the requests (a long tail)
    share_prefix: bool = True  # continuous: engine.share_prefix
    compact: bool = True  # continuous: engine.compact
    # continuous, in the bench's process: > 0, each answer ends at a length drawn from a lognormal of this median and
    # answer_spread (its sigma; 0: every answer this long), at most answer_max and max_new_tokens (so that a larger
    # max_new_tokens meets the same answers), as a model's EOS ends it. The
    # length rides on the request's own max_new_tokens, which the engine uses only to stop it: its KV blocks come
    # as it grows, its slot and admission do not depend on it. 0: every answer is max_new_tokens long.
    answer_median: int = 0
    answer_spread: float = 0.75
    answer_max: int = 512
    # in the bench's process: > 0, each prompt starts with one of `headers` headers this many tokens long (few-shot
    # examples: other requests' prompts in a row), request i with header i % headers
    header_tokens: int = 0
    headers: int = 1
    # continuous, in the bench's process: every answer matches this JSON schema (a file; sampling.json_schema), and
    # ends with EOS where it is complete (or at max_new_tokens): the cost of constrained decoding
    json_schema: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and (self.mode not in ("single", "colocated", "split")
                                      or self.name not in ("generate", "continuous")):
            raise UserError(f"system {self.name} mode={self.mode}: a job runs generate or continuous, in mode "
                            "single, colocated or split")
        if self.mode is None and self.name != "continuous" and not isinstance(self.batch_size, int):
            raise UserError(f"system {self.name}: batch_size={self.batch_size} is for jobs and continuous; give a number")
        if self.answer_median and (self.mode is not None or self.name != "continuous"):
            raise UserError(f"system {self.name}: answer_median is for continuous in the bench's process")
        if self.header_tokens and self.mode is not None:
            raise UserError(f"system {self.name}: header_tokens is for the bench's process")
        if self.header_tokens < 0 or self.headers < 1:
            raise UserError(f"system {self.name}: header_tokens={self.header_tokens} headers={self.headers}: "
                            "give header_tokens >= 0 and headers >= 1")


def with_answer_lengths(requests: list[Request], system: System, max_new_tokens: int) -> list[Request]:
    """The requests, each with its answer length drawn (seeded) from a lognormal: System.answer_median."""
    draw = random.Random(0)
    lengths = (round(draw.lognormvariate(math.log(system.answer_median), system.answer_spread)) for _ in requests)
    return [replace(r, max_new_tokens=min(max_new_tokens, system.answer_max, max(1, n)))
            for r, n in zip(requests, lengths)]


def with_headers(requests: list[Request], system: System) -> list[Request]:
    """The requests, each prompt after one of System.headers few-shot headers (System.header_tokens)."""
    if not system.header_tokens:
        return requests
    examples = [token for r in requests for token in r.input_ids]
    headers = [examples[h * system.header_tokens:(h + 1) * system.header_tokens] for h in range(system.headers)]
    return [replace(r, input_ids=[*headers[i % system.headers], *r.input_ids],
                    prompt_tokens=system.header_tokens + r.prompt_tokens) for i, r in enumerate(requests)]


class GenerateBatchEngine:
    """transformers' continuous batching (`generate_batch`), behind the engines' interface."""

    def __init__(self, loaded: LoadedModel, cfg: EngineConfig):
        self.model, self.cfg = loaded.model, cfg
        self.config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                       eos_token_id=None if cfg.ignore_eos else loaded.tokenizer.eos_token_id,
                                       pad_token_id=loaded.tokenizer.pad_token_id)

    def warm_up(self) -> None:
        """generate_batch warms itself up (its own CUDA graphs) on every call."""

    def run(self, requests):
        requests = list(requests)
        start = time.perf_counter_ns()
        outputs = self.model.generate_batch(inputs=[r.input_ids for r in requests], generation_config=self.config,
                                            progress_bar=False)
        end = time.perf_counter_ns()
        for request, output in zip(requests, sorted(outputs.values(), key=lambda o: int(o.request_id.split("_")[-1]))):
            yield Generation(request, list(output.generated_tokens), enqueue_ns=start, prefill_start_ns=start,
                             first_token_ns=end, finish_ns=end)


def make_system(system: System, loaded: LoadedModel, max_new_tokens: int, requests: list[Request]):
    cfg = EngineConfig(kind="generate" if system.name != "continuous" else "continuous", batch_size=system.batch_size,
                       max_new_tokens=max_new_tokens, ignore_eos=system.json_schema is None, cuda_graphs=system.cuda_graphs,
                       attention=system.attention, share_prefix=system.share_prefix, compact=system.compact)
    if system.name == "generate":
        return GenerateEngine(loaded, cfg)
    if system.name == "generate_static":
        return GenerateEngine(loaded, cfg, cache_implementation="static")
    if system.name == "generate_batch":
        return GenerateBatchEngine(loaded, cfg)
    if system.name == "continuous":
        sampling = SamplingConfig(temperature=system.temperature, top_p=system.top_p, top_k=system.top_k,
                                  json_schema=system.json_schema)
        length = slot_length(max(r.prompt_tokens for r in requests), max_new_tokens)
        longest = longest_prompts([r.prompt_tokens for r in requests], cfg)
        choice = Choice(sampling, not sampling.greedy, sampling.grammar is not None)
        return make_engine(loaded, cfg, length, len(requests), choice, longest)
    raise ValueError(f"unknown system {system.name}")


def write_workload(sample: Path, requests: int, path: Path) -> Path:
    """The sample's rows shuffled (arrival order is not length order) and cycled to `requests` rows, with ids
    in that order: the one dataset that every system reads, in the bench's process or as a job."""
    data = DataConfig(path=str(sample))
    rows = read_dataset(data).shuffle(seed=0)
    rows = rows.select([i % len(rows) for i in range(requests)]).remove_columns(data.id_column)
    rows.add_column(data.id_column, [f"{i:07d}" for i in range(requests)]).to_csv(str(path), index=False)
    return path


def write_long_rows(sample: Path, rows: int, path: Path) -> Path:
    """`rows` reports of ~3,000 tokens, each the findings of 50 sample reports in a row (from a different start)."""
    reports = read_dataset(DataConfig(path=str(sample)))
    findings = reports["findings"]
    long = [" ".join(findings[(start + i) % len(findings)] for i in range(50)) for start in range(rows)]
    columns = {"id": [f"long{i}" for i in range(rows)], "findings": long, "impression": reports["impression"][:rows]}
    Dataset.from_dict(columns).to_csv(str(path), index=False)
    return path


def with_long_rows(requests: list[Request], long: list[Request]) -> list[Request]:
    """The long requests spread evenly among the others, as a long tail falls in a real dataset."""
    mixed = list(requests)
    for n, request in enumerate(long, 1):
        mixed.insert(n * len(mixed) // (len(long) + 1), request)
    return mixed


def workload(loaded: LoadedModel, path: Path, prompt: PromptConfig) -> list[Request]:
    """The workload's requests, built by the job's own pipeline, in the file's order."""
    prepared = prepare_requests(read_dataset(DataConfig(path=str(path))), DataConfig(path=str(path)), prompt,
                                loaded.tokenizer, loaded.context_length, done={}).requests
    return Request.from_columns(prepared.sort("id")[:])


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def system_columns(system: System, max_new_tokens: int) -> dict:
    """What a result row says of the system it measured (a failed one's row too)."""
    return {"system": system.name, "mode": system.mode, "procs": system.procs, "batch_size": str(system.batch_size),
            "cuda_graphs": system.cuda_graphs, "attention": system.attention, "max_new_tokens": max_new_tokens,
            "temperature": system.temperature, "top_p": system.top_p, "top_k": system.top_k,
            "long_rows": system.long_rows, "share_prefix": system.share_prefix, "compact": system.compact,
            "answer_median": system.answer_median, "answer_spread": system.answer_spread,
            "answer_max": system.answer_max, "header_tokens": system.header_tokens, "headers": system.headers,
            "json_schema": system.json_schema}


def summary(system: System, max_new_tokens: int, lengths: list[int], run_s: float, latency_ms: list[float],
            ttft_ms: list[float], warmup_s: float, peak_memory_gb: float | None) -> dict:
    """One result row: latency and time to first token count from the run's start (every request is queued
    at once, as in a batch job)."""
    return {
        **system_columns(system, max_new_tokens), "requests": len(lengths), "generated_tokens": sum(lengths),
        "all_lengths_full": all(n == max_new_tokens for n in lengths),
        "warmup_s": round(warmup_s, 3), "run_s": round(run_s, 3), "tokens_per_s": round(sum(lengths) / run_s, 1),
        "latency_p50_ms": round(percentile(latency_ms, 50), 1), "latency_p99_ms": round(percentile(latency_ms, 99), 1),
        # the share of the run that its last 10% of requests to finish took (the tail: a few long answers left)
        "last_tenth_share": round(1 - percentile(latency_ms, 90) / max(latency_ms), 3),
        "ttft_p50_ms": round(percentile(ttft_ms, 50), 1), "ttft_p99_ms": round(percentile(ttft_ms, 99), 1),
        "peak_memory_gb": peak_memory_gb,
        "latency_ms": sorted(round(ms, 2) for ms in latency_ms),  # every request's, for the CDF plot
    }


def measure(system: System, loaded: LoadedModel, requests: list[Request], max_new_tokens: int) -> dict:
    """The system in the bench's process: warmed up on one batch, then timed on every request."""
    requests = requests[:system.requests] if system.requests else requests
    if system.answer_median:
        requests = with_answer_lengths(requests, system, max_new_tokens)
    cuda = loaded.device.type == "cuda"
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    engine = make_system(system, loaded, max_new_tokens, requests)
    engine.warm_up()  # every CUDA graph captured, kernels compiled
    list(engine.run(requests[:engine.cfg.batch_size]))  # warm-up: compilation, allocator
    if isinstance(engine, ContinuousEngine) and engine.blocks is not None:
        engine.blocks.forget()  # the timed run computes its prefixes as a job's first run does
    synchronize()
    warmup_s = time.perf_counter() - start
    runs = []
    for _ in range(system.repeats):
        run_start = time.perf_counter_ns()
        results = list(engine.run(requests))
        synchronize()
        runs.append(((time.perf_counter_ns() - run_start) / 1e9, run_start, results))
    run_s, run_start, results = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run
    kv = {"kv_tokens": engine.kv_tokens, "kv_peak_tokens": engine.kv_peak_tokens,
          "batch_size_run": engine.cfg.batch_size, "moved": engine.moved,
          "preempted": engine.preempted, "cached_tokens": engine.cached_tokens, "decode_steps": engine.decode_steps,
          "constraint_s": round(engine.constraint_s, 3)} if hasattr(engine, "kv_tokens") else {}
    del engine
    row = summary(system, max_new_tokens, [len(g.token_ids) for g in results], run_s,
                  [(g.finish_ns - run_start) / 1e6 for g in results], [(g.first_token_ns - run_start) / 1e6 for g in results],
                  warmup_s, round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None)
    return {**row, **kv, "runs_s": [round(r[0], 3) for r in runs]}


class DeviceMemoryPeak:
    """The most memory in use on a CUDA device (by every process) while the block runs, beyond what was in use
    at its start: sampled every 20 ms, since the job's workers are other processes."""

    def __init__(self, device: torch.device):
        self.device, self.peak_gb = device, None
        self.stop = threading.Event()

    def used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def sample(self, baseline: int) -> None:
        peak = 0
        while not self.stop.wait(0.02):
            peak = max(peak, self.used() - baseline)
        self.peak_gb = round(peak / 1e9, 3)

    def __enter__(self) -> "DeviceMemoryPeak":
        if self.device.type == "cuda":
            self.thread = threading.Thread(target=self.sample, args=(self.used(),), daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.stop.set()
            self.thread.join()


def measure_job(system: System, job_overrides: list[str], data: Path, max_new_tokens: int, out: Path,
                device: torch.device) -> dict:
    """The system as a real job, `python -m jobs.run` with its own worker processes (and MPS daemon):
    tokens/s over the span from the first prefill to the last token (what the workers do once started),
    as the bench's process times its run; job_s from launch to Parquet, Python's start-up included."""
    command = [sys.executable, "-m", "jobs.run", *job_overrides, f"data.path={data}", f"engine.kind={system.name}",
               f"engine.batch_size={system.batch_size}", f"engine.max_new_tokens={max_new_tokens}",
               "engine.ignore_eos=true", f"engine.cuda_graphs={system.cuda_graphs}", f"engine.attention={system.attention}",
               f"engine.share_prefix={system.share_prefix}",
               f"mode={system.mode}", f"procs={system.procs}", f"mps={system.mps}", f"output.dir={out}",
               "output.overwrite=true", "output.progress=false",
               "data.reference_column=null"]  # random weights: ROUGE would score noise, and its time is no inference's
    if system.requests:
        command.append(f"data.limit={system.requests}")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the job sizes its KV cache by the free memory
    with DeviceMemoryPeak(device) as memory:
        start = time.perf_counter()
        job = subprocess.run(command, cwd=Path(__file__).parents[1], capture_output=True, text=True)
        job_s = time.perf_counter() - start
    if job.returncode != 0:
        raise RuntimeError(f"the job failed: {(job.stderr.strip().splitlines() or ['no output'])[-1]}")
    run = json.loads((out / "manifest.json").read_text())["runs"][-1]
    timing = pq.read_table(out / "timing.parquet").to_pylist()
    lengths = pq.read_table(out / "generations.parquet", columns=["generated_tokens"])["generated_tokens"].to_pylist()
    first = min(t["prefill_start_ms"] for t in timing)
    run_s = (max(t["finish_ms"] for t in timing) - first) / 1e3
    row = summary(system, max_new_tokens, lengths, run_s, [t["finish_ms"] - first for t in timing],
                  [t["first_token_ms"] - first for t in timing], job_s - run_s, memory.peak_gb)
    # warmup_s here: all but the generation span (start-up, model, data, warm-up, and the final writes).
    return {**row, "job_s": round(job_s, 2), "mps": run["mps"], "engine": run["engine"]["kind"]}
