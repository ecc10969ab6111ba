"""The benchmark: one workload (radiology findings → impression) through each system, in one
process on one device, so that ratios between rows are fair.

Systems:
- generate: transformers `generate`, batch by batch (batch 20 is the paper's baseline);
- generate_static: the same with `cache_implementation="static"` (transformers compiles the decode step);
- generate_batch: transformers' own continuous batching;
- continuous: Splitwiser's engine (KV slots, continuous batching, CUDA graphs).
Each is warmed up on one batch first (compilation, graph capture: reported as warmup_s), then
timed on the whole request set.
"""

import logging
import statistics
import time
from dataclasses import dataclass
from itertools import cycle, islice

import torch
from transformers import GenerationConfig

from splitwiser.config import DataConfig, EngineConfig, PromptConfig
from splitwiser.data import prepare_requests, read_dataset
from splitwiser.engine import ContinuousEngine, Generation, GenerateEngine
from splitwiser.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class System:
    name: str  # generate | generate_static | generate_batch | continuous
    batch_size: int = 256
    requests: int | None = None  # fewer than the preset's, for the slow baselines
    cuda_graphs: bool = True
    attention: str = "auto"  # continuous: auto | live | sdpa
    repeats: int = 1  # timed runs; the median is reported (short runs are noisy)


class GenerateBatchEngine:
    """transformers' continuous batching (`generate_batch`), behind the engines' interface."""

    def __init__(self, loaded: LoadedModel, cfg: EngineConfig):
        self.model, self.cfg = loaded.model, cfg
        self.config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                       eos_token_id=None if cfg.ignore_eos else loaded.tokenizer.eos_token_id,
                                       pad_token_id=loaded.tokenizer.pad_token_id)

    def warm_up(self) -> None:
        """generate_batch warms itself up (its own CUDA graphs) on every call."""

    def run(self, prompts):
        prompts = list(prompts)
        start = time.perf_counter_ns()
        outputs = self.model.generate_batch(inputs=prompts, generation_config=self.config, progress_bar=False)
        end = time.perf_counter_ns()
        for index, output in enumerate(sorted(outputs.values(), key=lambda o: int(o.request_id.split("_")[-1]))):
            yield index, Generation(list(output.generated_tokens), enqueue_ns=start, prefill_start_ns=start,
                                    first_token_ns=end, finish_ns=end)


def make_system(system: System, loaded: LoadedModel, max_new_tokens: int, max_prompt_tokens: int):
    cfg = EngineConfig(kind="generate" if system.name != "continuous" else "continuous", batch_size=system.batch_size,
                       max_new_tokens=max_new_tokens, ignore_eos=True, cuda_graphs=system.cuda_graphs,
                       attention=system.attention)
    if system.name == "generate":
        return GenerateEngine(loaded, cfg)
    if system.name == "generate_static":
        return GenerateEngine(loaded, cfg, cache_implementation="static")
    if system.name == "generate_batch":
        return GenerateBatchEngine(loaded, cfg)
    if system.name == "continuous":
        return ContinuousEngine(loaded, cfg, max_prompt_tokens)
    raise ValueError(f"unknown system {system.name}")


def workload(loaded: LoadedModel, data: DataConfig, prompt: PromptConfig, requests: int) -> list[list[int]]:
    """The sample's prompts, built by the job's own pipeline, cycled to `requests` prompts."""
    prepared, _ = prepare_requests(read_dataset(data), data, prompt, loaded.tokenizer,
                                   loaded.context_length, done_ids=set())
    prompts = prepared.shuffle(seed=0)["input_ids"]  # arrival order is not length order
    return list(islice(cycle(prompts), requests))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure(system: System, loaded: LoadedModel, prompts: list[list[int]], max_new_tokens: int) -> dict:
    prompts = prompts[:system.requests] if system.requests else prompts
    cuda = loaded.device.type == "cuda"
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    engine = make_system(system, loaded, max_new_tokens, max(len(p) for p in prompts))
    engine.warm_up()  # every CUDA graph captured, kernels compiled
    list(engine.run(prompts[:system.batch_size]))  # warm-up: compilation, allocator
    synchronize()
    warmup_s = time.perf_counter() - start
    runs = []
    for _ in range(system.repeats):
        run_start = time.perf_counter_ns()
        results = [generation for _, generation in engine.run(prompts)]
        synchronize()
        runs.append(((time.perf_counter_ns() - run_start) / 1e9, run_start, results))
    run_s, run_start, results = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run
    tokens = sum(len(g.token_ids) for g in results)
    latency = [(g.finish_ns - run_start) / 1e6 for g in results]  # every request is there at the start
    ttft = [(g.first_token_ns - run_start) / 1e6 for g in results]
    del engine
    return {
        "system": system.name, "batch_size": system.batch_size, "cuda_graphs": system.cuda_graphs,
        "attention": system.attention, "requests": len(prompts), "max_new_tokens": max_new_tokens, "generated_tokens": tokens,
        "all_lengths_full": all(len(g.token_ids) == max_new_tokens for g in results),
        "warmup_s": round(warmup_s, 3), "run_s": round(run_s, 3), "runs_s": [round(r[0], 3) for r in runs], "tokens_per_s": round(tokens / run_s, 1),
        "latency_p50_ms": round(percentile(latency, 50), 1), "latency_p99_ms": round(percentile(latency, 99), 1),
        "ttft_p50_ms": round(percentile(ttft, 50), 1), "ttft_p99_ms": round(percentile(ttft, 99), 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
        "latency_ms": sorted(round(ms, 2) for ms in latency),  # every request's, for the CDF plot
    }
