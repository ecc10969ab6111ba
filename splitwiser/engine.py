"""Generation engines. One call: a stream of Requests in, their Generations out, each as it finishes.

    engine = make_engine(loaded, cfg, slot_length, requests)
    engine.warm_up()                                 # optional: compile and capture before timing
    for generation in engine.run(requests):         # requests: an iterable of request.Request
        ...                                          # generation.request is the request it answers

- `ContinuousEngine` (engine.kind=continuous, the default): a KV cache allocated once in blocks, each
  request taking them as it grows (blocks.KVBlocks; where they run out, the newest requests are preempted and
  recomputed later: scheduler.Slots.growth), a prefix cache (a prompt's first blocks read from the cache where an
  earlier prompt computed the same tokens), continuous batching (new prompts are prefilled into free slots
  between decode steps, so prefill and decode overlap in one process), the running requests kept in the
  lowest slots (scheduler.Slots) so that each decode step is as wide as the bucket of how many run, on CUDA the
  decode step replayed as a CUDA graph, and one step in flight: the host takes a step's tokens in (and ends its
  finished requests) while the device computes the next.
- `GenerateEngine` (engine.kind=generate): transformers' `generate`, batch by batch. The
  reference for correctness and the paper's baseline.
Both give the tokens `model.generate(do_sample=False)` gives each prompt alone. A batch (prefill group,
generate batch) that runs out of memory is run as halves (split_on_oom); a prompt that does not fit
even alone comes out as a Generation with an `error`.
"""

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import count, islice

import torch

from splitwiser import reasoning, sampler
from splitwiser.blocks import KVBlocks, block_keys, needed
from splitwiser.config import EngineConfig, SamplingConfig
from splitwiser.errors import UnsupportedModel, UserError
from splitwiser.grammar import Grammars, allowed, incomplete
from splitwiser.memory import forward_bytes, free_memory, gigabytes, kv_slot_bytes, step_bytes
from splitwiser.plan import MAX_SLOTS
from splitwiser.models import LoadedModel
from splitwiser.request import Generation, Request
from splitwiser.sampler import request_key
from splitwiser.scheduler import Slots, decode_bucket, decode_width
from splitwiser.stop import stop_table, stopped
from splitwiser.runner import BLOCK_TOKENS, KVPool, SlotRunner, allocate_kv

log = logging.getLogger(__name__)


def check_memory_cap(cap_mb: int | None, model, sequences: int, tokens: int, cached_tokens: int = 0) -> None:
    """Raises torch.OutOfMemoryError, as the device would, for a forward estimated over engine.memory_cap_mb."""
    if cap_mb is None:
        return
    param = next(model.parameters())
    need = forward_bytes(model.config, param.dtype, sequences, tokens, cached_tokens)
    if need > cap_mb * 2**20:
        raise torch.OutOfMemoryError(f"{sequences} x {tokens} tokens need about {need / 2**20:.0f} MB, over "
                                     f"engine.memory_cap_mb={cap_mb}")


@dataclass
class OutOfMemory:
    """split_on_oom's result for an item that did not fit in memory even alone."""
    reason: str

    def error(self, prompt_tokens: int) -> str:
        return f"out of memory with its {prompt_tokens}-token prompt alone: {self.reason}"


def split_on_oom(run: Callable[[list], list], items: list) -> tuple[list, int]:
    """run(items) → (one result per item, how many times a batch was split). A batch that runs out of
    memory is split in halves, each run on its own (and so on); an item that does not fit even alone
    gets OutOfMemory as its result."""
    try:
        return run(items), 0
    except torch.OutOfMemoryError as error:
        reason = str(error).strip().splitlines()[0]
    # Out of the except block, the traceback (and the failed forward's tensors) is gone: free the cache.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(items) == 1:
        log.warning("out of memory on one request alone: it goes to errors.parquet (%s)", reason)
        return [OutOfMemory(reason)], 0
    log.warning("out of memory on a batch of %d: running it as two halves (%s)", len(items), reason)
    (first, first_splits), (second, second_splits) = (split_on_oom(run, items[:len(items) // 2]),
                                                      split_on_oom(run, items[len(items) // 2:]))
    return first + second, 1 + first_splits + second_splits


def eos_ids(loaded: LoadedModel) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    # Ids past the tokenizer's (a shape's config run with another model's tokenizer) end no text it can read
    return {i for i in ids if i < len(loaded.tokenizer)} or {loaded.tokenizer.eos_token_id} - {None}


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
        self.oom_splits = 0  # batches split because they ran out of memory
        self.fallback_from: str | None = None  # why engine.kind=continuous fell back to this engine

    def warm_up(self) -> None:
        """Nothing to prepare: generate compiles (static cache) on its first call."""

    def run(self, requests: Iterable[Request]) -> Iterator[Generation]:
        source = iter(requests)
        for number in count():
            batch = list(islice(source, self.cfg.batch_size))
            if not batch:
                return
            results, splits = split_on_oom(lambda requests: self.generate_batch(requests, number), batch)
            self.oom_splits += splits
            for request, result in zip(batch, results):
                if isinstance(result, OutOfMemory):
                    result = Generation(request, error=result.error(request.prompt_tokens))
                yield result

    @torch.inference_mode()
    def generate_batch(self, requests: list[Request], number: int) -> list[Generation]:
        enqueue = time.perf_counter_ns()
        prompts = {"input_ids": [request.input_ids for request in requests]}
        batch = self.tokenizer.pad(prompts, padding=True, return_tensors="pt").to(self.device)
        length = batch["input_ids"].shape[1]
        check_memory_cap(self.cfg.memory_cap_mb, self.model, len(requests), length, length + self.cfg.max_new_tokens)
        clock = StepClock()
        start = time.perf_counter_ns()
        output = self.model.generate(
            **batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=None if self.cfg.ignore_eos else sorted(self.eos_ids), streamer=clock,
            **self.generate_kwargs,
        )
        results = []
        for request, tokens in zip(requests, output[:, batch["input_ids"].shape[1]:].tolist()):
            length, reason = len(tokens), "length"
            stop = None if self.cfg.ignore_eos else next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            if stop is not None:  # generate pads rows that finished early
                length, reason = stop + 1, "stop"
            results.append(Generation(request, tokens[:length], reason, number, len(requests), enqueue, start,
                                      clock.step_ns[0], clock.step_ns[length - 1]))
        return results


def prefill_group_size(lengths: list[int], prefill_tokens: int) -> int:
    """How many of the prompts of `lengths` (shortest first) one prefill takes: as many as fit engine.prefill_tokens
    padded to the longest of them, at least one."""
    size = 1
    while size < len(lengths) and (size + 1) * lengths[size] <= prefill_tokens:
        size += 1
    return size


@dataclass
class FirstToken:
    """What a prefill gives a request: its first token, and that token's log-probability (sampling.logprobs)."""
    token: int
    logprob: float | None = None


@dataclass(frozen=True)
class Choice:
    """How an engine chooses tokens: the sampling settings, whether any row may be sampled (JobConfig.sampled: a row
    of data.temperature_column may be, with sampling.temperature=0), and whether any row's answer is constrained
    (JobConfig.constrained: a row of data.json_schema_column may be, without sampling.json_schema), and whether the
    model thinks first (prompt.thinking=true: a constraint applies to the answer after its thinking, reasoning.py)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sampled: bool = False
    constrained: bool = False
    thinking: bool = False

    def temperature(self, request: Request) -> float:
        return self.sampling.temperature if request.temperature is None else request.temperature

    def key(self, request: Request) -> int:
        return request_key(self.sampling, request.id, request.sample)


def grammars_of(loaded: LoadedModel, choice: Choice) -> Grammars | None:
    """A constrained job's matchers on the model's vocabulary (None for a job without constraints)."""
    if not choice.constrained:
        return None
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    thinking_end = reasoning.end_token(loaded.tokenizer) if choice.thinking else None
    return Grammars(loaded.tokenizer, eos_ids(loaded), vocab, choice.sampling.grammar, thinking_end)


def prefill_group(runner: SlotRunner, requests: list[Request], slots: list[int], memory_cap_mb: int | None,
                  choice: Choice, grammars: Grammars | None, start: int = 0) -> tuple[list[FirstToken | OutOfMemory], int]:
    """Prefills the requests' prompts into `slots` of the runner's KV pool (from token `start`: the ones before are
    cached blocks the slots' table rows point at) → (the first token of each, or the error of a prompt that ran
    out of memory even alone; how many times the group was split). grammars: a constrained job's."""
    return split_on_oom(lambda items: _prefill_slots(runner, *zip(*items), memory_cap_mb, choice, grammars, start),
                        list(zip(requests, slots)))


def _prefill_slots(runner: SlotRunner, requests: tuple[Request], slots: tuple[int], memory_cap_mb,
                   choice: Choice, grammars: Grammars | None, start: int) -> list[FirstToken]:
    lengths = [request.prompt_tokens - start for request in requests]
    check_memory_cap(memory_cap_mb, runner.arch.model, len(requests), max(lengths), start)
    padded = torch.zeros(len(requests), max(lengths), dtype=torch.long)
    for row, request in enumerate(requests):
        padded[row, :lengths[row]] = torch.tensor(request.input_ids[start:])
    device = runner.device
    logits = runner.prefill(padded.to(device), torch.tensor(lengths, device=device), torch.tensor(slots, device=device),
                            start)
    keys = torch.tensor([choice.key(r) for r in requests], device=device)
    temperature = torch.tensor([choice.temperature(r) for r in requests], device=device) if choice.sampled else None
    seen = prompt_tokens_seen(requests, logits.shape[-1]).to(device) if choice.sampling.repetition_penalty != 1 else None
    choosing = logits
    if grammars is not None:
        choosing = allowed(logits, grammars.masks([grammars.of(r) for r in requests]).to(device))
    tokens = sampler.next_tokens(choosing, choice.sampling, keys, torch.zeros_like(keys), temperature, seen)
    logprobs = sampler.token_logprobs(logits, tokens).tolist() if choice.sampling.logprobs else [None] * len(requests)
    # .tolist() waits for the prefill: in mode=split the keys are in the slots before a token worker hears of them
    return [FirstToken(token, logprob) for token, logprob in zip(tokens.tolist(), logprobs)]


def prompt_tokens_seen(requests: tuple[Request], vocab: int) -> torch.Tensor:
    """[G, vocab] whether each token is in each prompt (the repetition penalty's tokens seen so far)."""
    seen = torch.zeros(len(requests), vocab, dtype=torch.bool)
    for row, request in enumerate(requests):
        seen[row, torch.tensor(request.input_ids)] = True
    return seen


@dataclass
class Handoff:
    """mode=split: a group of requests a prompt worker prefilled into a token worker's KV slots."""
    slots: list[int]
    first_tokens: list[FirstToken]
    generations: list[Generation]  # their requests (without input_ids: a token worker needs none), timing so far


def kv_tokens(cfg: EngineConfig, slot_length: int) -> int:
    """engine.kv_tokens as a number (resolve_engine sizes auto to the memory; unresolved, auto is what every
    slot could use)."""
    return cfg.batch_size * slot_length if cfg.kv_tokens == "auto" else cfg.kv_tokens


@dataclass(eq=False)  # compared and hashed by identity: a scheduling pass sorts thousands into groups
class Admitted:
    """A request admitted to the engine, before its prefill (ContinuousEngine._admitted)."""
    generation: Generation
    prompt: Request  # what its prefill computes
    positions: int  # the KV positions it holds as it starts
    keys: list[bytes]  # its prompt's full blocks' keys (blocks.block_keys; none without the prefix cache)
    cached: list[int]  # the cached blocks it starts with, held for it


@dataclass
class InFlight:
    """A decode step the host has not taken in yet (ContinuousEngine._land): its results' copies back (pinned
    memory), the event after which they are there, and the requests it ran (slot → generation, as it was launched)."""
    tokens: torch.Tensor  # [slots] each slot's new token
    finished: torch.Tensor  # [slots] whether it ended the slot's request
    logprobs: torch.Tensor | None  # [slots] the new token's log-probability (sampling.logprobs)
    copied: torch.cuda.Event | None
    ran: list[tuple[int, Generation]]


class ContinuousEngine:
    # Admit new prompts once this fraction of the slots (and of the KV blocks) is free, or nothing is running:
    # fewer, larger prefills, each one launch-bound like a decode step.
    ADMIT_FRACTION = 1 / 8

    def __init__(self, loaded: LoadedModel, cfg: EngineConfig, slot_length: int, kv: KVPool | None = None,
                 choice: Choice = Choice()):
        """kv: mode=split's pool, shared with prompt workers, each slot's blocks fixed; without it the engine
        allocates engine.kv_tokens in blocks and gives them out per request."""
        self.cfg, self.device, self.tokenizer, self.choice = cfg, loaded.device, loaded.tokenizer, choice
        slots, device = cfg.batch_size, loaded.device
        paged = kv is None
        if paged:
            kv = allocate_kv(loaded.model, slots, slot_length, needed(kv_tokens(cfg, slot_length)))
        self.runner = SlotRunner(loaded.model, slots=slots, max_len=slot_length, live_attention=cfg.attention != "sdpa",
                                 kv=kv)
        self.blocks = KVBlocks(kv, cache=cfg.share_prefix) if paged else None
        self.kv_tokens = kv.spare * BLOCK_TOKENS  # the KV cache's size
        # Per-slot state lives on the device, so that a decode step (bookkeeping included) is one CUDA graph and the
        # host reads back only each slot's new token and whether it finished (_send_back).
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # last token: the next input
        # where that token sits; a free slot is parked (_park)
        self.parked = 0 if paged else self.runner.max_len - 1
        self.positions = torch.full((slots,), self.parked, dtype=torch.long, device=device)
        self.generated = torch.zeros(slots, dtype=torch.long, device=device)
        self.keys = torch.zeros(slots, dtype=torch.long, device=device)  # each request's sampling key
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.finished = torch.zeros(slots, dtype=torch.bool, device=device)
        self.output = torch.zeros(slots, cfg.max_new_tokens, dtype=torch.long, device=device)  # for stop strings
        # each request's own max_new_tokens
        self.limit = torch.full((slots,), cfg.max_new_tokens, dtype=torch.long, device=device)
        self.eos_ids = set() if cfg.ignore_eos else eos_ids(loaded)
        self._sampling_state(loaded, slots)
        self.eos = torch.tensor(sorted(self.eos_ids) or [-1], device=device)
        self.use_graphs = cfg.cuda_graphs and device.type == "cuda"
        self.graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}  # _launch
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # The host takes a step's tokens in while the device computes the next one: each running request's tokens
        # and log-probabilities grow on the host (Generation.token_ids), from copies of each step's results into
        # two pinned buffers, in turn.
        self.copies = [self._host_copies(slots) for _ in range(2)]
        self.in_flight: InFlight | None = None
        self.done: list[Generation] = []  # requests that ended, not yet handed out
        self.prefill_groups = 0
        self.oom_splits = 0  # prefill groups split because they ran out of memory
        self.moved = 0  # requests moved to a lower slot (engine.compact)
        self.preempted = 0  # requests stopped for want of KV blocks, and started again
        self.cached_tokens = 0  # prompt tokens read from the prefix cache instead of computed
        self.decode_steps = 0
        self.constraint_s = 0.0  # host time making token masks and advancing matchers (a constrained job)
        self.probe_tokens_per_s: dict[int, float] | None = None  # make_engine's probe (batch_size=auto)

    def _sampling_state(self, loaded: LoadedModel, slots: int) -> None:
        """The per-slot state of the sampling options in use (None where not in use): each one's temperature,
        its tokens' log-probabilities, the tokens it has seen (repetition penalty), and the stop strings' table."""
        sampling, device = self.choice.sampling, loaded.device
        vocab = loaded.model.get_output_embeddings().weight.shape[0]
        self.temperature = torch.zeros(slots, device=device) if self.choice.sampled else None
        self.logprobs = torch.zeros(slots, device=device) if sampling.logprobs else None  # of each step's tokens
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device) \
            if sampling.repetition_penalty != 1 else None
        self.stops = stop_table(loaded.tokenizer, sampling.stop, vocab, device)
        # A constrained job's: each running request's grammar matcher (None: unconstrained), and the token masks they
        # give a step, made on the host (pinned) and copied to the device
        self.grammars = grammars_of(loaded, self.choice)
        self.matchers: list = [None] * slots
        if self.grammars is not None:
            self.masks_host = self.grammars.bitmask(slots, pin=device.type == "cuda")
            self.masks = self.masks_host.to(device)

    def run(self, requests: Iterable[Request]) -> Iterator[Generation]:
        source, read_all = iter(requests), False
        waiting: deque[Generation] = deque()  # admitted to the engine, not yet prefilled
        slots = Slots(self.cfg.batch_size)
        admit_at = max(1, int(self.cfg.batch_size * self.ADMIT_FRACTION))
        while True:
            wanted = max(0, len(slots.free) - len(waiting))
            fresh = list(islice(source, wanted))
            read_all |= len(fresh) < wanted
            waiting.extend(Generation(request, enqueue_ns=time.perf_counter_ns()) for request in fresh)
            if waiting and (len(slots.free) >= admit_at and self._blocks_free() >= self.ADMIT_FRACTION
                            or not slots.running):
                for group, start in self._prefill_groups(self._admit(waiting, slots)):
                    self._prefill(group, start, slots)
                    yield from self._handed_out()
            self._grow(slots, waiting)
            # every request may have ended at its first token, or in the step _grow landed to preempt: more may come
            if not slots.running:
                yield from self._handed_out()
                if waiting or not read_all:
                    continue
                return
            if self.cfg.compact:
                self._move(slots.compaction())
            self._decode(slots.width(), slots.running, slots.release)
            slots.advance()
            yield from self._handed_out()

    def run_handed_over(self, receive: Callable[[bool], list[Handoff] | None],
                        release: Callable[[int], None]) -> Iterator[Generation]:
        """The token side of mode=split: decodes requests that prompt workers prefilled into this engine's
        (shared) KV slots. receive(wait) returns the new handoffs ([] when none, if not wait), or None
        once no more will come; release(slot) gives a finished request's slot back to the prompt workers."""
        running: dict[int, Generation] = {}
        more = True
        while more or running:
            handoffs = receive(not running) if more else []
            if handoffs is None:
                more, handoffs = False, []
            for handoff in handoffs:
                running.update(zip(handoff.slots, handoff.generations))
                self._start(handoff.slots, handoff.first_tokens, handoff.generations, running, release)
            if running:
                self._decode(decode_width(running, self.cfg.batch_size), running, release)
                # at once: a slot released here is prefilled by a prompt worker (another process) while no step of
                # this engine is in flight, which would write the old request's next key into it
                self._land(running, release)
            yield from self._handed_out()

    @property
    def kv_peak_tokens(self) -> int:
        """The most KV positions requests held at once (mode=split's fixed slots: all of them)."""
        return self.kv_tokens if self.blocks is None else self.blocks.peak * BLOCK_TOKENS

    def _blocks_free(self) -> float:
        """The share of the KV blocks that no request holds (1 where each slot has its own)."""
        return 1.0 if self.blocks is None else self.blocks.available() / self.blocks.kv.spare

    def _admit(self, waiting: deque[Generation], slots: Slots) -> list[Admitted]:
        """The waiting requests that start now, first come first served (a preempted one first): one per free slot,
        while the available KV blocks hold their prompts (but the cached blocks they start with) and leave one block
        for each running request to grow into."""
        admitted: list[Admitted] = []
        new_blocks = 0  # the admitted requests' blocks beyond their cached ones
        while waiting and len(admitted) < len(slots.free):
            start = self._admitted(waiting[0])
            new_blocks += needed(start.positions) - len(start.cached)
            left = self.blocks.available() - new_blocks  # available: what matching left
            if left < (len(slots.running) + len(admitted) if slots.running or admitted else 0):
                self.blocks.drop(start.cached)
                break
            admitted.append(start)
            waiting.popleft()
        if not admitted and not self.blocks.held:  # no request holds blocks: it would wait for ever
            request = waiting[0].request
            raise UserError(f"engine.kv_tokens={self.kv_tokens}: less than request {request.id} needs, "
                            f"{request.prompt_tokens + 1} positions to start")
        return admitted

    def _admitted(self, generation: Generation) -> Admitted:
        """A request as it is admitted: what its prefill computes (its prompt, and after a preemption the tokens it
        had but the last, which is its next input as before), the positions it holds as it starts (those and the
        next token's), and the cached blocks it starts with, held from now on."""
        prompt = generation.request
        if generation.token_ids:
            ids = [*prompt.input_ids, *generation.token_ids[:-1]]
            prompt = replace(prompt, input_ids=ids, prompt_tokens=len(ids))
        keys = block_keys(prompt.input_ids) if self.blocks.cache else []
        # at least the last prompt token is computed: its logits give the next token
        return Admitted(generation, prompt, prompt.prompt_tokens + 1, keys,
                        self.blocks.match(keys, (prompt.prompt_tokens - 1) // BLOCK_TOKENS))

    def _prefill_groups(self, admitted: list[Admitted]) -> Iterator[tuple[list[Admitted], int]]:
        """Splits the admitted requests (shortest first) into groups of at most engine.prefill_tokens padded tokens
        whose prefills start at one position (after the cached blocks they start with): (a group, that position).
        Before each group the others look again for cached blocks: those the groups before computed (the first
        requests of a run with a shared header compute it; the others read it)."""
        pending = sorted(admitted, key=lambda a: a.positions)
        while pending:
            for a in pending:
                a.cached += self.blocks.match(a.keys, (a.prompt.prompt_tokens - 1) // BLOCK_TOKENS, len(a.cached))
            group, start = self._next_group(pending)
            taken = set(group)
            pending = [a for a in pending if a not in taken]
            yield group, start * BLOCK_TOKENS

    def _next_group(self, pending: list[Admitted]) -> tuple[list[Admitted], int]:
        """The next prefill group of the pending requests and the cached blocks its prefill starts after: the
        shortest requests, from the blocks all of them have cached (one that has more computes those again: each
        prefill costs a launch-bound pass, a few blocks little), or, where the KV blocks left cannot hold those
        again, the shortest requests with as many cached as the shortest one."""
        group, start = self._group_of(pending)
        again = [block for a in group for block in a.cached[start:]]
        freed = sum(self.blocks.refs[block] == 1 for block in again)  # held by none but their request
        wanted = sum(needed(a.positions) - len(a.cached) for a in pending)
        if len(again) - freed > self.blocks.available() - wanted:
            group, start = self._group_of([a for a in pending if len(a.cached) == len(pending[0].cached)])
        for a in group:
            self.blocks.drop(a.cached[start:])
            del a.cached[start:]
        return group, start

    def _group_of(self, candidates: list[Admitted]) -> tuple[list[Admitted], int]:
        """As many of the candidates (shortest first) as fit engine.prefill_tokens padded from the blocks all of them
        have cached, and how many blocks that is."""
        size = len(candidates)
        while True:
            start = min(len(a.cached) for a in candidates[:size])
            fit = prefill_group_size([a.prompt.prompt_tokens - start * BLOCK_TOKENS for a in candidates[:size]],
                                     self.cfg.prefill_tokens)
            if fit == size:
                return candidates[:size], start
            size = fit

    def _prefill(self, admitted: list[Admitted], start_at: int, free: Slots) -> None:
        """Prefills the group into free slots (from position start_at: cached blocks hold those before) and makes
        them running; the requests that did not fit in memory, or ended at their first token, are done. A preempted
        request keeps the tokens it had: its prefill recomputes their KV, and its next input is its last token, as
        before."""
        start = time.perf_counter_ns()
        slots = [free.take() for _ in admitted]
        group, prompts = [a.generation for a in admitted], [a.prompt for a in admitted]
        self.blocks.give(slots, [a.positions for a in admitted], [a.cached for a in admitted])
        firsts, splits = prefill_group(self.runner, prompts, slots, self.cfg.memory_cap_mb, self.choice, self.grammars,
                                       start_at)
        self.oom_splits += splits
        for slot, a, first in zip(slots, admitted, firsts):
            if not isinstance(first, OutOfMemory):
                self.blocks.remember(slot, a.keys)
        self.cached_tokens += start_at * len(admitted)
        now = time.perf_counter_ns()
        started = []
        for slot, generation, prompt, first in zip(slots, group, prompts, firsts):
            if not generation.token_ids:  # its first prefill
                generation.batch, generation.batch_size, generation.prefill_start_ns = self.prefill_groups, len(group), start
                generation.first_token_ns = generation.finish_ns = now
            if isinstance(first, OutOfMemory):
                self._release([slot], free.release)
                generation.error, generation.finish_ns = first.error(generation.request.prompt_tokens), now
                self.done.append(generation)
            else:
                if generation.token_ids:  # preempted before: its next input is the token it had
                    first = FirstToken(generation.token_ids[-1], generation.logprobs and generation.logprobs[-1])
                free.start(slot, generation, prompt.prompt_tokens)
                started.append((slot, first, prompt, generation))
        if started:
            slots, firsts, prompts, generations = map(list, zip(*started))
            self._start(slots, firsts, generations, free.running, free.release, prompts)
        self.prefill_groups += 1

    def _start(self, slots: list[int], first_tokens: list[FirstToken], generations: list[Generation],
               running: dict[int, Generation], release: Callable[[int], None],
               requests: list[Request] | None = None) -> None:
        """Makes prefilled slots running (`running` has them): their first token is the next input, at the position
        after the prompt (`requests`: what was prefilled, where not the generations' requests); a request that ends
        at its first token is done. A preempted request starts again with the tokens it had."""
        requests = requests or [g.request for g in generations]
        for generation, first in zip(generations, first_tokens):
            if not generation.token_ids:
                generation.token_ids = [first.token]
                generation.logprobs = None if self.logprobs is None else [first.logprob]
        on_device = partial(torch.tensor, device=self.device)
        slot_ids, first = on_device(slots), on_device([f.token for f in first_tokens])
        self.tokens[slot_ids] = first
        self.positions[slot_ids] = on_device([r.prompt_tokens for r in requests])
        self.keys[slot_ids] = on_device([self.choice.key(r) for r in requests])
        self.limit[slot_ids] = on_device([r.max_new_tokens or self.cfg.max_new_tokens for r in requests])
        if self.temperature is not None:
            self.temperature[slot_ids] = on_device([self.choice.temperature(r) for r in requests])
        if self.seen is not None:
            self.seen[slot_ids] = False
            for slot, request in zip(slots, requests):
                self.seen[slot, on_device(request.input_ids)] = True
            self.seen[slot_ids, first] = True
        self.generated[slot_ids] = 1
        self.output[slot_ids, 0] = first
        for slot, generation in zip(slots, generations):
            self._constrain(slot, generation.request, generation.token_ids)
            if len(generation.token_ids) > 1:  # resumed: its tokens back in its output row
                self.output[slot, :len(generation.token_ids)] = on_device(generation.token_ids)
                self.generated[slot] = len(generation.token_ids)
        ended = torch.isin(first, self.eos) | (self.limit[slot_ids] == 1) | self._stopped(slot_ids)
        self.active[slot_ids] = ~ended
        self._finish([slot for slot, end in zip(slots, ended.tolist()) if end], running, release)

    def _constrain(self, slot: int, request: Request, tokens: list[int]) -> None:
        """A constrained request's matcher in its slot, after its tokens so far."""
        if self.grammars is not None:
            self.matchers[slot] = self.grammars.of(request, tokens)

    def _stopped(self, slots: torch.Tensor | slice) -> torch.Tensor | bool:
        """Whether the slots' outputs end in a stop string (False without stop strings)."""
        return self.stops is not None and stopped(self.stops, self.output[slots], self.generated[slots])

    def _forward(self, batch: int) -> torch.Tensor:
        """The logits of slots 0..batch-1's next tokens (capturable)."""
        return self.runner.decode(self.tokens[:batch], self.positions[:batch])

    def _advance(self, batch: int, logits: torch.Tensor) -> None:
        """Chooses slots 0..batch-1's next tokens from their logits (within their masks, in a constrained job) and
        updates their state, on the device only (capturable)."""
        active = self.active[:batch]
        temperature, seen = (None if state is None else state[:batch] for state in (self.temperature, self.seen))
        choosing = logits if self.grammars is None else allowed(logits, self.masks[:batch])
        next_tokens = sampler.next_tokens(choosing, self.choice.sampling, self.keys[:batch], self.generated[:batch],
                                          temperature, seen)
        generated = self.generated[:batch]
        # Free slots in the batch compute too (static shapes); their results land nowhere that is read.
        rows, at = torch.arange(batch, device=self.device), generated.clamp(max=self.cfg.max_new_tokens - 1)
        self.output[rows, at] = next_tokens
        if self.logprobs is not None:
            self.logprobs[:batch] = sampler.token_logprobs(logits, next_tokens)
        if seen is not None:
            seen[rows, next_tokens] |= active
        generated += active
        self.positions[:batch] += active
        self.tokens[:batch] = next_tokens
        ended = (generated >= self.limit[:batch]) | torch.isin(next_tokens, self.eos) | self._stopped(slice(0, batch))
        finished = active & ended
        self.finished[:batch] = finished
        self.active[:batch] = active & ~finished

    def _land(self, running: dict[int, Generation], release: Callable[[int], None]) -> None:
        """Takes in the step in flight, once its copies are on the host: each request it ran that still runs gets its
        new token (in a constrained job, deferred to its matcher), and those it ended are done. A request that ended
        (or was preempted) after the step was launched ran in it as a free slot: nothing of it is read."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return
        if flight.copied is not None:
            flight.copied.synchronize()
        tokens, finished = flight.tokens.tolist(), flight.finished.tolist()
        logprobs = None if flight.logprobs is None else flight.logprobs.tolist()
        now_in = {id(generation): slot for slot, generation in running.items()}  # compaction may have moved it
        landed, ended = [], []
        for slot, generation in flight.ran:
            if id(generation) not in now_in:
                continue
            generation.token_ids.append(tokens[slot])
            if logprobs is not None:
                generation.logprobs.append(logprobs[slot])
            landed.append((now_in[id(generation)], tokens[slot]))
            if finished[slot]:
                ended.append(now_in[id(generation)])
        if self.grammars is not None:
            self.grammars.defer([self.matchers[slot] for slot, _ in landed], [token for _, token in landed])
        self._finish(ended, running, release)

    def _finish(self, slots: list[int], running: dict[int, Generation], release: Callable[[int], None]) -> None:
        """The requests in `slots`, whose tokens are all on the host, ended: done, and their slots released."""
        if not slots:
            return
        now = time.perf_counter_ns()
        matchers = [self.matchers[slot] for slot in slots]
        if self.grammars is not None:
            self.grammars.settle(matchers)
        self._release(slots, release)
        for slot, matcher in zip(slots, matchers):
            generation = running.pop(slot)
            generation.finish_reason = "stop" if generation.token_ids[-1] in self.eos_ids else "length"
            generation.finish_ns = now
            generation.error = incomplete(matcher, generation.finish_reason, len(generation.token_ids))
            self.done.append(generation)

    def _handed_out(self) -> Iterator[Generation]:
        done, self.done = self.done, []
        yield from done

    def _release(self, slots: list[int], release: Callable[[int], None]) -> None:
        """Gives the slots of requests that ended or were preempted back (release), and their KV blocks."""
        self._park(slots)
        if self.blocks is not None:
            self.blocks.take_back(slots)
        for slot in slots:
            release(slot)

    def _park(self, slots: list[int]) -> None:
        """Slots no request runs in. A free slot inside the decode batch still computes: it writes a key at its
        position and attends over the keys before it. With blocks given per request, its table row points at the
        spare block, so it is parked at position 0: one key to read, not a slot's length. With fixed blocks
        (mode=split, where prompt workers prefill a released slot while this engine keeps stepping) it is parked on
        the slot's never-read last position instead, so that it cannot overwrite the next prompt's keys."""
        self.positions[slots] = self.parked
        self.active[slots] = False
        for slot in slots:
            self.matchers[slot] = None

    def _grow(self, slots: Slots, waiting: deque[Generation]) -> None:
        """KV blocks on demand, before a decode step: one more to each running request whose next position is past
        its blocks, where too few are free after preempting the newest running requests (Slots.growth)."""
        growth = partial(slots.growth, BLOCK_TOKENS * self.blocks.entries[:slots.count], blocks_of=self.blocks.freed_by)
        growing, preempted = growth(self.blocks.available())
        if preempted:  # the step in flight first: the requests it ended give their blocks back
            self._land(slots.running, slots.release)
            growing, preempted = growth(self.blocks.available())
        for slot in preempted:
            self._preempt(slot, slots, waiting)
        if growing:
            self.blocks.extend(growing)

    def _preempt(self, slot: int, slots: Slots, waiting: deque[Generation]) -> None:
        """Stops a running request (no step in flight) and gives its KV blocks back; it waits first in line with the
        tokens it has, and its next prefill computes their KV again (_admitted)."""
        generation = slots.running.pop(slot)
        self._release([slot], slots.release)
        waiting.appendleft(generation)
        self.preempted += 1

    def _move(self, moves: list[tuple[int, int]]) -> None:
        """Moves running requests to other slots (Slots.compaction): their per-slot state and block-table rows; their
        KV stays in its blocks. The sources are parked."""
        if not moves:
            return
        for source, destination in moves:
            self.matchers[destination] = self.matchers[source]
        sources, destinations = zip(*moves)
        for state in self._per_slot_state():
            state[list(destinations)] = state[list(sources)]
        self._park(list(sources))
        self.blocks.move(moves)
        self.moved += len(moves)

    def _per_slot_state(self) -> list[torch.Tensor]:
        """Every tensor with a row per slot that a decode step reads or writes (but the block table)."""
        state = [self.tokens, self.positions, self.generated, self.keys, self.active, self.finished, self.output,
                 self.limit, self.temperature, self.seen]
        return [tensor for tensor in state if tensor is not None]

    def warm_up(self) -> None:
        """Captures the decode graph of every batch bucket (and compiles kernels) before any request:
        a few hundred ms once, instead of stalls inside the run. Slots are all free, so the steps
        it runs touch nothing that is read later."""
        if self.use_graphs:
            for batch in self.buckets():
                self._decode(batch, {}, lambda slot: None)
            torch.cuda.synchronize(self.device)

    def buckets(self) -> list[int]:
        """The decode batch sizes, one CUDA graph each: powers of two from 8 below the slot count, and the slot count."""
        sizes, size = [], 8
        while size < self.cfg.batch_size:
            sizes.append(size)
            size *= 2
        return sizes + [self.cfg.batch_size]

    def probe(self, steps: int = 5) -> dict[int, float]:
        """Decode tokens/s of each bucket, every slot attending over a long context (the slot's length less
        half the new tokens, or its share of the KV blocks if less): how much a wider running batch pays on this
        device. Run before any request (it writes keys into the blocks); leaves the state as it was."""
        table = self.runner.table
        state = [*self._per_slot_state(), table]
        saved = [tensor.clone() for tensor in state]
        pool_tokens = self.runner.kv.spare * BLOCK_TOKENS
        table.copy_(torch.arange(table.numel(), device=table.device).view_as(table) % self.runner.kv.spare)
        self.active.fill_(False)  # the step computes every slot all the same; nothing advances
        synchronize = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        tokens_per_s = {}
        for batch in self.buckets():
            self.positions.fill_(max(0, min(self.runner.max_len - 1 - self.cfg.max_new_tokens // 2,
                                            pool_tokens // batch - 1)))
            self._decode(batch, {}, lambda slot: None)  # captured, or warmed up, outside the timing
            synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                self._decode(batch, {}, lambda slot: None)
            synchronize()
            tokens_per_s[batch] = batch * steps / (time.perf_counter() - start)
        for tensor, old in zip(state, saved):
            tensor.copy_(old)
        return tokens_per_s

    def use_best_batch_size(self, probe: dict[int, float]) -> None:
        """engine.batch_size=auto: runs at most as many slots as the smallest bucket within 5% of the best
        tokens/s (past it, more slots add latency and little throughput). The KV cache keeps its size."""
        best = max(probe.values())
        self.cfg = replace(self.cfg, batch_size=min(b for b, tokens_per_s in probe.items() if tokens_per_s >= 0.95 * best))

    def _decode(self, batch: int, running: dict[int, Generation], release: Callable[[int], None]) -> None:
        """One decode step of slots 0..batch-1, left in flight; while the device computes it, the host takes in the
        step before (_land). A constrained job's step runs in two parts: the matchers take the tokens of the step
        before and the host makes the token masks that the second part applies."""
        self.decode_steps += 1
        if self.grammars is None:
            self._launch(("step", batch), lambda: self._advance(batch, self._forward(batch)))
            self._land(running, release)
        else:
            logits = self._launch(("forward", batch), lambda: self._forward(batch))
            self._land(running, release)
            start = time.perf_counter()
            self.grammars.masks(self.matchers[:batch], self.masks_host)
            self.constraint_s += time.perf_counter() - start
            self.masks[:batch].copy_(self.masks_host[:batch], non_blocking=True)
            self._launch(("advance", batch), lambda: self._advance(batch, logits))
        self._send_back(batch, running)

    def _host_copies(self, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pin = self.device.type == "cuda"
        return (torch.zeros(slots, dtype=torch.long, pin_memory=pin), torch.zeros(slots, dtype=torch.bool, pin_memory=pin),
                None if self.logprobs is None else torch.zeros(slots, pin_memory=pin))

    def _send_back(self, batch: int, running: dict[int, Generation]) -> None:
        """The step's new tokens (and their log-probabilities) and ends, copied to the host as the step completes."""
        tokens, finished, logprobs = self.copies[self.decode_steps % 2]
        tokens[:batch].copy_(self.tokens[:batch], non_blocking=True)
        finished[:batch].copy_(self.finished[:batch], non_blocking=True)
        if logprobs is not None:
            logprobs[:batch].copy_(self.logprobs[:batch], non_blocking=True)
        copied = None
        if self.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        self.in_flight = InFlight(tokens, finished, logprobs, copied, list(running.items()))

    def _launch(self, key: tuple[str, int], work: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """work() (a part of a decode step), replayed as a CUDA graph where graphs are on: its result is the graph's."""
        if not self.use_graphs:
            return work()
        if key not in self.graphs:
            self.graphs[key] = self._capture(key[1], work)
        graph, result = self.graphs[key]
        graph.replay()
        return result

    def _capture(self, batch: int, work: Callable[[], torch.Tensor | None]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
        # CUDA graph capture wants a warm-up on a side stream first. The warm-up must not change
        # the state, so it runs the model alone: it writes the same keys/values the replay writes.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            result = work()
        return graph, result


def resolve_engine(loaded: LoadedModel, cfg: EngineConfig, slot_length: int, requests: int, share: int = 1,
                   prompt_lengths: tuple[int, ...] = ()) -> EngineConfig:
    """engine.batch_size and engine.kv_tokens as numbers, for an engine given `requests` (prompt_lengths: the
    longest prompts' token counts, longest first: Plan.prompt_lengths); `share`: how many engines (worker
    processes) split the device's memory. Every engine's KV cache is sized here: one that does not fit in the
    free memory is refused before anything is allocated."""
    if cfg.batch_size == "auto":
        slots = auto_batch_size(loaded, cfg, requests)
    else:  # an engine never runs more requests at once, nor decodes them in a wider bucket: more slots take memory only
        slots = min(cfg.batch_size, decode_bucket(requests))
    if cfg.kind != "continuous":
        return replace(cfg, batch_size=slots)
    kv_tokens = kv_capacity(loaded, cfg, slots, slot_length, share, prompt_lengths)
    if cfg.batch_size == "auto":
        slots = min(slots, slots_the_pool_holds(cfg, kv_tokens, slot_length, prompt_lengths))
    return replace(cfg, batch_size=slots, kv_tokens=kv_tokens)


def kv_capacity(loaded: LoadedModel, cfg: EngineConfig, slots: int, slot_length: int, engines: int,
                prompt_lengths: tuple[int, ...] = ()) -> int:
    """engine.kv_tokens as a number. auto: the most that `slots` requests can hold at once (the longest prompts'
    blocks with max_new_tokens each; without prompt_lengths, slots × slot_length), within each of `engines`
    engines' share of the free memory but what their steps take (memory.step_bytes, at least a tenth of it).
    Raises UserError where the KV caches do not fit or cannot hold the longest request."""
    config = loaded.model.config
    token_bytes = kv_slot_bytes(config, loaded.dtype, 1)
    free = free_memory(loaded.device)
    fit = None
    if free is not None:
        steps = max(free // 10, engines * step_bytes(config, loaded.dtype, slots, cfg.prefill_tokens))
        fit = max(0, (free - steps) // (engines * token_bytes))
    whose = "its KV cache needs" if engines == 1 else f"the KV caches of {engines} workers on {loaded.device} need"
    if cfg.kv_tokens != "auto" and fit is not None and cfg.kv_tokens > fit:
        raise UserError(f"engine.kv_tokens={cfg.kv_tokens}: {whose} {gigabytes(engines * cfg.kv_tokens * token_bytes)}, "
                        f"{gigabytes(free)} free; at most engine.kv_tokens={fit} fits")
    if cfg.kv_tokens != "auto":
        tokens = cfg.kv_tokens
    else:  # what the slots hold at once: the longest requests, or (not knowing them) each the longest
        need = [needed(p + cfg.max_new_tokens) * BLOCK_TOKENS for p in prompt_lengths[:slots]]
        tokens = sum(need) if need else slots * slot_length
        tokens = tokens if fit is None else min(tokens, fit)
    if tokens >= slot_length:
        return tokens
    if cfg.kv_tokens != "auto" and (fit is None or fit >= slot_length):
        raise UserError(f"engine.kv_tokens={cfg.kv_tokens}: less than the longest request (its prompt and "
                        f"engine.max_new_tokens), {slot_length} positions")
    raise UserError(f"engine.max_new_tokens={cfg.max_new_tokens}: for the longest request alone ({slot_length} positions) "
                    f"{whose} {gigabytes(engines * slot_length * token_bytes)}, {gigabytes(free)} free; lower "
                    "engine.max_new_tokens" + (" or procs" if engines > 1 else ""))


def auto_batch_size(loaded: LoadedModel, cfg: EngineConfig, requests: int) -> int:
    """engine.batch_size=auto, from the device and the job (bench/RESULTS.md). The KV blocks, not the slots, are
    sized to the memory (kv_capacity): a slot holds only what its request needs."""
    if loaded.device.type != "cuda":
        return 16
    if cfg.kind == "generate":
        return 256
    slots = MAX_SLOTS  # the most worth having: more add latency, not throughput (bench/RESULTS.md)
    while slots > 8 and slots // 2 >= requests:
        slots //= 2
    return slots


def slots_the_pool_holds(cfg: EngineConfig, kv_tokens: int, slot_length: int, prompt_lengths: tuple[int, ...]) -> int:
    """batch_size=auto: the widest bucket (at least 8) of requests that a KV pool of kv_tokens holds at once, each
    holding its blocks for the prompt (the mean of the longest prompts, or the longest) and half of
    engine.max_new_tokens: what a request holds on average over its life when answers run to the end. Wider, the
    steps are fed by preempting requests and computing them again (bench/NOTES.md run 32)."""
    prompt = sum(prompt_lengths) // len(prompt_lengths) if prompt_lengths else slot_length - cfg.max_new_tokens
    held = kv_tokens // (needed(prompt + cfg.max_new_tokens // 2) * BLOCK_TOKENS)
    slots = 8
    while slots * 2 <= held:
        slots *= 2
    return slots


def make_engine(loaded: LoadedModel, cfg: EngineConfig, slot_length: int, requests: int, choice: Choice = Choice(),
                prompt_lengths: tuple[int, ...] = ()):
    """The configured engine, with engine.batch_size and kv_tokens resolved (engine.cfg has the numbers). On a GPU,
    a continuous engine with batch_size=auto is warmed up and probed: engine.probe_tokens_per_s holds the decode
    tokens/s of each batch bucket, and the engine runs the best (use_best_batch_size)."""
    resolved = resolve_engine(loaded, cfg, slot_length, requests, prompt_lengths=prompt_lengths)
    if cfg.kind == "generate":
        return GenerateEngine(loaded, resolved)
    try:
        engine = ContinuousEngine(loaded, resolved, slot_length, choice=choice)
    except UnsupportedModel as e:
        if choice.sampled or choice.constrained or choice.sampling.continuous_only():
            per_row = 'data.temperature_column or data.json_schema_column'
            raise UserError(f"{', '.join(choice.sampling.continuous_only()) or per_row}: only the "
                            f"continuous engine has them, and it does not support this model ({e})") from None
        log.warning("engine.kind=continuous does not support this model (%s): using engine.kind=generate", e)
        fallback = GenerateEngine(loaded, resolved)
        fallback.fallback_from = f"continuous: {e}"  # why, for the manifest
        return fallback
    if cfg.batch_size == "auto" and loaded.device.type == "cuda":
        engine.warm_up()
        engine.probe_tokens_per_s = engine.probe()
        engine.use_best_batch_size(engine.probe_tokens_per_s)
    return engine
