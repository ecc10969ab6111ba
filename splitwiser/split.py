"""mode=split, the paper's design: prompt workers prefill groups of prompts straight into the KV slots of a token
worker and hand over the slots and first tokens; token workers only decode, taking new requests between
steps, and write the part files.

The KV pools are allocated by the parent and shared like the weights (no copy through the CPU). A token worker
offers its free slots on a queue; a prompt worker hands over only to the token workers of its own device. A
worker that dies stops the job (its handed-over requests live in its KV slots); what is on disk stays, and a
rerun resumes.
"""

import queue
import time
from dataclasses import replace

import torch.multiprocessing as mp

from splitwiser.engine import ContinuousEngine, Handoff, OutOfMemory, grammars_of, prefill_group, prefill_group_size
from splitwiser.errors import UnsupportedModel, UserError, WorkersFailed
from splitwiser.families import adapter_for
from splitwiser.models import LoadedModel
from splitwiser.output import PartWriter, part_rows
from splitwiser.plan import Plan
from splitwiser.prepare import load_shards, work_unit
from splitwiser.request import Generation, Request
from splitwiser.runner import SlotRunner, allocate_kv
from splitwiser.workers import EngineBuilt, RowsWritten, Totals, UnitDone, Work, WorkerDone, check_workers_fit, \
    gpu_index, progress_event, share_on_cpu, start_workers, supervise, take_units, worker_context, worker_fds


def acquire_slots(free_slots: list[mp.Queue], want: int, first_choice: int) -> tuple[int, list[int]]:
    """Up to `want` free slots of one token worker (at least one: waits for it), trying the token
    workers in turn from `first_choice`; returns (token worker, slots)."""
    while True:
        for turn in range(len(free_slots)):
            target = (first_choice + turn) % len(free_slots)
            try:
                slots = [free_slots[target].get(timeout=0.01)]
            except queue.Empty:
                continue
            while len(slots) < want:
                try:
                    slots.append(free_slots[target].get_nowait())
                except queue.Empty:
                    break
            return target, slots


class PromptWorker:
    """Prefills the requests of its units into token workers' KV slots and hands them over."""

    def __init__(self, rank: int, loaded: LoadedModel, pools: list, work: Work, events: mp.Queue,
                 free_slots: list[mp.Queue], handoffs: list[mp.Queue]):
        self.rank, self.work, self.events, self.free_slots, self.handoffs = rank, work, events, free_slots, handoffs
        self.runners = [SlotRunner(loaded.model, work.cfg.batch_size, work.slot_length, kv=pool) for pool in pools]
        self.grammars = grammars_of(loaded, work.choice)
        self.groups = self.oom_splits = 0

    def prefill_unit(self, requests: list[Request]) -> None:
        """Its requests (shortest prompt first), a prefill group at a time, each into one token worker's slots."""
        done = 0
        while done < len(requests):
            enqueued = time.perf_counter_ns()
            fit = prefill_group_size([r.prompt_tokens for r in requests[done:]], self.work.cfg.prefill_tokens)
            target, slots = acquire_slots(self.free_slots, fit, first_choice=self.groups % len(self.free_slots))
            group = requests[done:done + len(slots)]
            self.hand_over(target, slots, group, enqueued)
            done += len(group)
            self.groups += 1

    def hand_over(self, target: int, slots: list[int], group: list[Request], enqueued: int) -> None:
        """Prefills `group` into `slots` of token worker `target` and hands the started ones over; a request that
        ran out of memory alone gives its slot back and goes to errors.parquet."""
        start = time.perf_counter_ns()
        firsts, splits = prefill_group(self.runners[target], group, slots, self.work.cfg.memory_cap_mb,
                                       self.work.choice, self.grammars)
        now = time.perf_counter_ns()
        self.oom_splits += splits
        started, failed = [], []
        for slot, request, first in zip(slots, group, firsts):
            if isinstance(first, OutOfMemory):
                self.free_slots[target].put(slot)
                failed.append({"id": request.id, "sample": request.sample, "error": first.error(request.prompt_tokens)})
            else:  # the token worker needs no prompt ids but the repetition penalty's: they stay here
                penalty = self.work.choice.sampling.repetition_penalty != 1
                handed = request if penalty else replace(request, input_ids=[])
                started.append((slot, first, Generation(handed, batch=self.groups, batch_size=len(group),
                                                        enqueue_ns=enqueued, prefill_start_ns=start,
                                                        first_token_ns=now, prefill_worker=self.rank)))
        if failed:
            self.work.out.write_errors(failed)
            self.events.put(RowsWritten(self.rank, len(failed), 0))
        if started:
            slot_ids, first_tokens, generations = map(list, zip(*started))
            self.handoffs[target].put(Handoff(slot_ids, first_tokens, generations))


def prompt_worker(rank: int, loaded: LoadedModel, pools: list, work: Work, events: mp.Queue, ready, units: mp.Queue,
                  free_slots: list[mp.Queue], handoffs: list[mp.Queue]) -> None:
    """mode=split: prefills the prompts of units from the queue into token workers' KV slots."""
    worker = PromptWorker(rank, loaded, pools, work, events, free_slots, handoffs)
    shards = load_shards(work.shards)
    ready()
    for unit in take_units(units, events, rank):
        worker.prefill_unit(Request.from_columns(work_unit(shards, work.unit_count, unit)[:]))
        events.put(UnitDone(rank, unit))
    events.put(WorkerDone(rank, worker.oom_splits))
    for handoff in handoffs:
        handoff.put(None)  # this prompt worker is done


def handoff_receiver(handoffs: mp.Queue, prompt_procs: int):
    """receive(wait) for ContinuousEngine.run_handed_over: the handoffs queued ([] if none and not wait; if wait,
    at least one), or None once every prompt worker has said it is done."""
    open_prompt_workers = prompt_procs

    def receive(wait: bool) -> list[Handoff] | None:
        nonlocal open_prompt_workers
        got = []
        while open_prompt_workers:
            try:
                item = handoffs.get(timeout=0.1) if wait and not got else handoffs.get_nowait()
            except queue.Empty:
                if wait and not got:
                    continue
                break
            if item is None:
                open_prompt_workers -= 1
            else:
                got.append(item)
        return got if got or open_prompt_workers else None
    return receive


def token_worker(rank: int, loaded: LoadedModel, pool, work: Work, events: mp.Queue, ready, free_slots: mp.Queue,
                 handoffs: mp.Queue, prompt_procs: int) -> None:
    """mode=split: decodes the requests handed over into its KV pool; writes them as part files."""
    engine = ContinuousEngine(loaded, work.cfg, work.slot_length, kv=pool, choice=work.choice)
    events.put(EngineBuilt(rank, engine.cfg.batch_size))
    for slot in range(work.cfg.batch_size):  # free slots are parked on a never-read position: safe at once
        free_slots.put(slot)
    engine.warm_up()
    ready()
    with PartWriter(work.out, loaded.tokenizer, part_rows(work.cfg.batch_size, work.requests), rank,
                    gpu_index(loaded.device), work.run_index, work.job_start_ns, progress_event(events, rank),
                    stop=work.choice.sampling.stop, thinking=work.choice.thinking) as writer:
        for generation in engine.run_handed_over(handoff_receiver(handoffs, prompt_procs), release=free_slots.put):
            writer.add(generation)


def pools_sent(plan: Plan, procs: int) -> int:
    """The KV pools sent to `procs` split workers of a device, divided as the plan divides its own: every pool to
    each prompt worker, and its own to each token worker."""
    token_procs = max(1, -(-procs * plan.token_procs // plan.procs))
    return (procs - token_procs + 1) * token_procs


def split_work(work: Work, loaded: LoadedModel, devices: int, plan: Plan) -> Work:
    """The Work of a device's split workers. Each slot of a shared pool owns its blocks (prompt workers fill the
    slots a token worker offers): the KV caches are sized for slots of the longest request, and the slots are as
    many as engine.kv_tokens holds of it."""
    device_work = replace(work, prompt_lengths=()).for_device(loaded, devices, plan.token_procs, plan.procs)
    slots = min(device_work.cfg.batch_size, device_work.cfg.kv_tokens // plan.slot_length)
    return replace(device_work, cfg=replace(device_work.cfg, batch_size=slots))


def run_split(models: list[LoadedModel], plan: Plan, work: Work, progress) -> Totals:
    """Runs plan.prompt_procs prompt and plan.token_procs token workers per model copy (device) over all units."""
    try:
        adapter_for(models[0].model, plan.slot_length)
    except UnsupportedModel as e:
        raise UserError(f"mode=split hands KV slots over, which needs the fast engine: {e} is not supported; "
                        "use mode=colocated") from None
    check_workers_fit(f"prompt_procs={plan.prompt_procs} + token_procs={plan.token_procs}", plan.procs, len(models),
                      lambda n: worker_fds(models[0], n, pools_sent(plan, n)))
    context = worker_context()
    units, events = context.Queue(), context.Queue()
    specs, pools_of_devices = [], []
    for loaded in models:
        device_work = split_work(work, loaded, len(models), plan)
        pools = [allocate_kv(loaded.model, device_work.cfg.batch_size, plan.slot_length) for _ in range(plan.token_procs)]
        share_on_cpu(loaded, pools)
        pools_of_devices.append(pools)
        free_slots = [context.Queue() for _ in range(plan.token_procs)]
        handoffs = [context.Queue() for _ in range(plan.token_procs)]
        specs += [(prompt_worker, [loaded, pools], device_work, (units, free_slots, handoffs))] * plan.prompt_procs
        specs += [(token_worker, [loaded, pool], device_work, (slots, handed, plan.prompt_procs))
                  for pool, slots, handed in zip(pools, free_slots, handoffs)]
    for unit in range(work.unit_count):
        units.put(unit)

    def on_exit(rank: int, exitcode: int) -> None:
        raise WorkersFailed(f"mode=split: worker {rank} exited with code {exitcode}, holding requests in its KV "
                            "slots; the finished rows are on disk: rerun the job to resume")

    # The pools (pools_of_devices) stay referenced here until every worker has exited.
    return supervise(start_workers(context, specs, events), events, progress, on_exit)
