"""Greedy generation engines. One call: a stream of tokenized prompts in, finished generations out.

    engine = make_engine(loaded, cfg, max_prompt_tokens)
    for index, generation in engine.run(prompts):   # prompts: iterable of token-id lists
        ...                                          # yielded as each request finishes

- `ContinuousEngine` (engine.kind=continuous, the default): a KV cache allocated once as slots,
  continuous batching (new prompts are prefilled into free slots between decode steps, so prefill
  and decode overlap in one process), and on CUDA the decode step replayed as a CUDA graph.
- `GenerateEngine` (engine.kind=generate): transformers' `generate`, batch by batch. The
  reference for correctness and the paper's baseline.
Both give the tokens `model.generate(do_sample=False)` gives each prompt alone.
"""

import heapq
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count, islice

import torch

from splitwiser.config import EngineConfig
from splitwiser.models import LoadedModel
from splitwiser.runner import SlotRunner, UnsupportedModel

log = logging.getLogger(__name__)


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, EOS included when the model stopped
    finish_reason: str = "length"  # "stop" (EOS) or "length" (max_new_tokens)
    batch: int = 0  # the generate batch, or the prefill group the request entered with
    batch_size: int = 0
    enqueue_ns: int = 0  # time.perf_counter_ns() clock
    prefill_start_ns: int = 0
    first_token_ns: int = 0
    finish_ns: int = 0


def eos_ids(loaded: LoadedModel) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


class StepClock:
    """Streamer that records when each decode step's tokens exist (generate puts the prompt first)."""

    def __init__(self) -> None:
        self.step_ns: list[int] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self.seen_prompt:
            self.step_ns.append(time.perf_counter_ns())
        self.seen_prompt = True

    def end(self) -> None:
        pass


class GenerateEngine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig, **generate_kwargs):
        self.model, self.tokenizer, self.device, self.cfg = loaded.model, loaded.tokenizer, loaded.device, cfg
        self.eos_ids = eos_ids(loaded)
        self.generate_kwargs = generate_kwargs  # e.g. cache_implementation="static" (the benchmark's baseline)

    def run(self, prompts: Iterable[list[int]]) -> Iterator[tuple[int, Generation]]:
        source = iter(prompts)
        index = 0
        for number in count():
            batch = list(islice(source, self.cfg.batch_size))
            if not batch:
                return
            for generation in self.generate_batch(batch, number):
                yield index, generation
                index += 1

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], number: int) -> list[Generation]:
        enqueue = time.perf_counter_ns()
        batch = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(self.device)
        clock = StepClock()
        start = time.perf_counter_ns()
        output = self.model.generate(
            **batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=None if self.cfg.ignore_eos else sorted(self.eos_ids), streamer=clock,
            **self.generate_kwargs,
        )
        results = []
        for tokens in output[:, batch["input_ids"].shape[1]:].tolist():
            length, reason = len(tokens), "length"
            stop = None if self.cfg.ignore_eos else next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            if stop is not None:  # generate pads rows that finished early
                length, reason = stop + 1, "stop"
            results.append(Generation(tokens[:length], reason, number, len(prompts), enqueue, start,
                                      clock.step_ns[0], clock.step_ns[length - 1]))
        return results


@dataclass
class Running:
    """A request that holds a KV slot."""
    index: int
    generation: Generation
    length: int  # tokens in the sequence so far, prompt and generated: the last one sits at length - 1


class ContinuousEngine:
    # Admit new prompts once this fraction of the slots is free (or nothing is running): fewer,
    # larger prefills, each one launch-bound like a decode step.
    ADMIT_FRACTION = 1 / 8

    def __init__(self, loaded: LoadedModel, cfg: EngineConfig, max_prompt_tokens: int):
        self.cfg, self.device, self.tokenizer = cfg, loaded.device, loaded.tokenizer
        self.eos_ids = set() if cfg.ignore_eos else eos_ids(loaded)
        self.runner = SlotRunner(loaded.model, slots=cfg.batch_size, max_len=max_prompt_tokens + cfg.max_new_tokens)
        self.tokens = torch.zeros(cfg.batch_size, dtype=torch.long, device=self.device)  # decode inputs, per slot
        self.positions = torch.zeros(cfg.batch_size, dtype=torch.long, device=self.device)
        self.use_graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.prefill_groups = 0

    def run(self, prompts: Iterable[list[int]]) -> Iterator[tuple[int, Generation]]:
        source = enumerate(prompts)
        waiting: deque[tuple[int, list[int], int]] = deque()
        free = list(range(self.cfg.batch_size))  # a heap: the lowest free slot first keeps decode batches small
        running: dict[int, Running] = {}
        admit_at = max(1, int(self.cfg.batch_size * self.ADMIT_FRACTION))
        while True:
            for index, prompt in islice(source, len(free) - len(waiting)):
                waiting.append((index, prompt, time.perf_counter_ns()))
            if waiting and (len(free) >= admit_at or not running):
                admitted = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                yield from self._prefill(admitted, free, running)
            if not running:
                if waiting:
                    continue
                return
            yield from self._decode_step(free, running)

    def _prefill(self, admitted, free, running) -> Iterator[tuple[int, Generation]]:
        """Prefills the admitted prompts in groups of at most engine.prefill_tokens padded tokens."""
        admitted.sort(key=lambda item: len(item[1]))
        group: list = []
        for item in admitted + [None]:
            longest = len(item[1]) if item else 0
            if group and (item is None or (len(group) + 1) * max(longest, len(group[-1][1])) > self.cfg.prefill_tokens):
                yield from self._prefill_group(group, free, running)
                group = []
            if item:
                group.append(item)

    def _prefill_group(self, group, free, running) -> Iterator[tuple[int, Generation]]:
        start = time.perf_counter_ns()
        slots = [heapq.heappop(free) for _ in group]
        lengths = [len(prompt) for _, prompt, _ in group]
        padded = torch.zeros(len(group), max(lengths), dtype=torch.long)
        for row, (_, prompt, _) in enumerate(group):
            padded[row, :len(prompt)] = torch.tensor(prompt)
        slot_ids = torch.tensor(slots, device=self.device)
        first = self.runner.prefill(padded.to(self.device), torch.tensor(lengths, device=self.device), slot_ids)
        self.tokens[slot_ids] = first
        first_tokens, now = first.tolist(), time.perf_counter_ns()
        self.prefill_groups += 1
        for slot, (index, _, enqueued), length, token in zip(slots, group, lengths, first_tokens):
            generation = Generation([], batch=self.prefill_groups - 1, batch_size=len(group),
                                    enqueue_ns=enqueued, prefill_start_ns=start, first_token_ns=now)
            running[slot] = Running(index, generation, length=length)
            yield from self._append(slot, token, now, free, running)

    def _append(self, slot: int, token: int, now: int, free, running) -> Iterator[tuple[int, Generation]]:
        request = running[slot]
        generation = request.generation
        generation.token_ids.append(token)
        request.length += 1
        stopped = token in self.eos_ids
        if stopped or len(generation.token_ids) == self.cfg.max_new_tokens:
            generation.finish_reason, generation.finish_ns = ("stop" if stopped else "length"), now
            del running[slot]
            heapq.heappush(free, slot)
            yield request.index, generation

    def _decode_step(self, free, running) -> Iterator[tuple[int, Generation]]:
        batch = self._bucket(max(running) + 1)
        positions = [0] * batch  # free slots inside the batch compute on position 0, harmlessly
        for slot, request in running.items():
            positions[slot] = request.length - 1
        self.positions[:batch].copy_(torch.tensor(positions), non_blocking=True)
        next_tokens = self._decode(batch)
        self.tokens[:batch].copy_(next_tokens)
        tokens, now = next_tokens.tolist(), time.perf_counter_ns()
        for slot in list(running):
            yield from self._append(slot, tokens[slot], now, free, running)

    def _bucket(self, needed: int) -> int:
        """Decode batch sizes come in powers of two (one CUDA graph each), capped at the slot count."""
        return min(self.cfg.batch_size, max(8, 1 << (needed - 1).bit_length()))

    def _decode(self, batch: int) -> torch.Tensor:
        if not self.use_graphs:
            return self.runner.decode(self.tokens[:batch], self.positions[:batch])
        if batch not in self.graphs:
            self.graphs[batch] = self._capture(batch)
        graph, output = self.graphs[batch]
        graph.replay()
        return output

    def _capture(self, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream, as CUDA graph capture requires. Running the step early is
        # harmless: it writes the same keys/values the replay that follows writes.
        inputs = (self.tokens[:batch], self.positions[:batch])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.runner.decode(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            output = self.runner.decode(*inputs)
        return graph, output


def make_engine(loaded: LoadedModel, cfg: EngineConfig, max_prompt_tokens: int):
    if cfg.kind == "generate":
        return GenerateEngine(loaded, cfg)
    try:
        return ContinuousEngine(loaded, cfg, max_prompt_tokens)
    except UnsupportedModel as e:
        log.warning("engine.kind=continuous does not support this model (%s): using engine.kind=generate", e)
        return GenerateEngine(loaded, cfg)
