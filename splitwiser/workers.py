"""Worker processes sharing a device's copy of the weights (mode=colocated and mode=split), on one device
or several (gpus=: one model copy per GPU, `procs` workers on each, one queue of work units for all).

The parent loaded the model; each worker receives it through torch.multiprocessing, which shares its
tensors instead of copying them: CUDA IPC handles on a GPU, shared memory on the CPU. Workers fork
from a fork server that has imported this module (torch, transformers, datasets) once, before any
CUDA call: a worker starts in a moment instead of repeating those imports (24-33 s on the GPU
machine), and jobs.run starts that server before its own imports, so that the two run side by side.
Work units (contiguous slices of the length-sorted Arrow shards) are handed out from a queue, so a
worker that finishes early takes more. The parent follows progress through an event queue.

- colocated: each worker runs its own ContinuousEngine over its units (prefill and decode) and
  writes its own part files. A worker that dies has its units put back for the others (rows it
  had already written are kept once by the merge); the job fails only if work is left and no
  worker is alive.
- split (the paper's design): prompt workers prefill groups of prompts straight into the KV slots
  of a token worker (the KV pools are allocated by the parent and shared like the weights: no copy
  through the CPU) and hand over the slots and first tokens; token workers only decode, taking new
  requests between steps, and write the part files. A token worker offers its free slots on a
  queue. A worker that dies stops the job (its handed-over requests live in its KV slots); what
  is on disk stays, and a rerun resumes.

Workers always exit before the parent returns, so no shared CUDA tensor is released while a worker
still uses it; each drops its references to the shared tensors before it exits. A worker whose job's
process has died (SIGKILL included) exits at once; so many workers that they could not all start are
refused before the first starts (check_workers_fit), and a start that fails ends those started before it.
"""

import bisect
import gc
import logging
import os
import queue
from multiprocessing import connection, forkserver, parent_process
import re
import resource
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import torch
import torch.multiprocessing as mp

from splitwiser.config import EngineConfig
from splitwiser.errors import UserError, WorkersFailed
from splitwiser.data import load_shards, work_unit
from splitwiser.engine import ContinuousEngine, Generation, Handoff, OutOfMemory, make_engine, prefill_group, \
    resolve_batch_size, slot_length
from splitwiser.models import LoadedModel
from splitwiser.output import OutputDir, PartWriter
from splitwiser.runner import SlotRunner, allocate_kv, free_memory, gigabytes

log = logging.getLogger(__name__)
# What starting a worker costs the job, measured on the CPU with the default model: its pipes (status, data,
# inbox) hold 5 file descriptors, and each CPU tensor it is sent holds one more until the worker has taken it;
# a worker's own memory (beside the shared weights and its KV cache, which check_kv_fits counts) is ~300 MB.
FDS_PER_WORKER = 5
WORKER_BYTES = 300 * 2**20


@dataclass
class Work:
    """What every worker needs to know about the run (pickled to each)."""
    cfg: EngineConfig  # batch_size resolved: slots (or batch) per engine
    max_prompt_tokens: int
    requests: int  # requests per engine, for its choices
    shards: Path
    unit_count: int
    out: OutputDir  # its job_id set: the parts it writes carry it
    run_index: int
    job_start_ns: int
    threads: int  # CPU threads per worker


def worker_context():
    """Worker processes come from the fork server, which imports this module first (if jobs.run has not
    started it already)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def fork_server_running() -> bool:
    """Whether the fork server runs already (jobs.run starts it before its imports)."""
    return getattr(forkserver._forkserver, "_forkserver_pid", None) is not None  # no public way to ask


def mps_environment() -> dict[str, str]:
    """The parent's MPS settings, for workers: the fork server may have started before the job started MPS."""
    return {key: value for key, value in os.environ.items() if key.startswith("CUDA_MPS_")}


def exit_with_the_job() -> None:
    """Ends this worker process at once when the job's process has gone, however it died (SIGKILL too), so that
    it writes no more parts. Its parent is the fork server, which lives on while any worker does (each holds
    the server's "alive" pipe open): a parent-death signal would never come. The pipe the job started this
    worker through is held by the job alone, and reads EOF once it has gone."""
    job = parent_process().sentinel

    def watch() -> None:
        connection.wait([job])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-the-job", daemon=True).start()


def run_worker(main, rank: int, environment: dict, inbox: mp.Queue, started: mp.Barrier, events: mp.Queue,
               *queues) -> None:
    """A worker process: main(rank, *shared, work, events, ready, *queues). It takes the parent's MPS
    settings before its first CUDA call. The shared tensors (model, KV pools) and the Work come through
    `inbox` after the process has started: a process's arguments go through a pipe that a spawned child
    reads only after its imports, so big arguments would make each start wait for the previous worker's.
    main calls ready() once warmed up; generation starts when every worker is (a barrier), so that work
    is shared out among all of them. Errors go to the parent, which fails the job with them."""
    exit_with_the_job()
    try:
        for key in [key for key in os.environ if key.startswith("CUDA_MPS_")]:
            del os.environ[key]
        os.environ.update(environment)
        shared, work = inbox.get()
        torch.set_num_threads(work.threads)

        def ready() -> None:
            try:
                started.wait(timeout=600)
            except threading.BrokenBarrierError:  # a worker died before it was ready: go on without it
                pass

        main(rank, *shared, work, events, ready, *queues)
        if shared[0].device.type == "cuda":
            torch.cuda.synchronize(shared[0].device)
        # Shared CUDA tensors still referenced when a worker exits are never released to the parent
        # (PyTorch warns "producer process terminated before all shared CUDA tensors released").
        del shared
        gc.collect()
    except BaseException:
        events.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1)


def worker_fds(loaded: LoadedModel, mode: str, procs: int) -> int:
    """The file descriptors that starting `procs` workers on the device of `loaded` takes in the job until each
    has its tensors: a worker's pipes, and one per CPU tensor it is sent (the model's; in mode=split, a prompt
    worker gets every token worker's KV pool, a token worker its own); CUDA tensors travel as IPC handles."""
    if loaded.device.type != "cpu":
        return procs * FDS_PER_WORKER
    model = len({t.untyped_storage().data_ptr() for t in chain(loaded.model.parameters(), loaded.model.buffers())})
    if mode == "colocated":
        return procs * (FDS_PER_WORKER + model)
    prompt_procs = procs // 2  # as mode=split divides procs by default
    token_procs = procs - prompt_procs
    pools = (prompt_procs + 1) * token_procs  # sent: every pool to each prompt worker, and its own to a token worker
    return procs * (FDS_PER_WORKER + model) + pools * 2 * loaded.model.config.num_hidden_layers


def check_workers_fit(setting: str, procs: int, devices: int, fds: Callable[[int], int]) -> None:
    """Raises UserError, before any worker starts, where `procs` worker processes on each of `devices` devices
    cannot start here: the file descriptors they take in the job (fds(procs) per device) over what RLIMIT_NOFILE
    leaves, or their memory (WORKER_BYTES each) over MemAvailable. It says the most that can."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fds_free = None if limit == resource.RLIM_INFINITY else limit - len(os.listdir("/dev/fd"))
    memory = free_memory(torch.device("cpu"))

    def fits(procs: int) -> bool:
        return ((fds_free is None or devices * fds(procs) <= fds_free) and
                (memory is None or devices * procs * WORKER_BYTES <= memory))

    if fits(procs):
        return
    most = bisect.bisect_left(range(procs), True, key=lambda n: not fits(n)) - 1
    workers, needs = procs * devices, []
    if memory is not None and workers * WORKER_BYTES > memory:
        needs.append(f"about {gigabytes(workers * WORKER_BYTES)} of memory, {gigabytes(memory)} is available")
    if fds_free is not None and devices * fds(procs) > fds_free:
        needs.append(f"about {devices * fds(procs):,} open files, {fds_free:,} more can open here "
                     f"(ulimit -n: {limit:,})")
    raise UserError(f"{setting}: {workers} worker processes need {' and '.join(needs)}; "
                    f"at most {most * devices} can start here")


def start_workers(context, specs: list[tuple], events: mp.Queue) -> dict[int, mp.Process]:
    """Starts one process per (main, shared tensors, Work, queues) spec (rank = index), then hands each its
    shared tensors and its Work. Where a start fails (or Ctrl-C comes), the workers started before it are ended."""
    started = context.Barrier(len(specs))
    workers = {}
    try:
        for rank, (main, tensors, work, extra) in enumerate(specs):
            inbox = context.Queue()
            worker = context.Process(target=run_worker, args=(main, rank, mps_environment(), inbox, started, events,
                                                              *extra),
                                     name=f"splitwiser-{main.__name__}-{rank}")
            worker.start()
            workers[rank] = worker
            inbox.put((tensors, work))
            inbox.cancel_join_thread()  # a worker that dies before reading its inbox must not hang our exit
            # The child unpickles its arguments after its imports: they must still exist then.
            worker.keep = (inbox, started)
    except BaseException:
        end_workers(workers.values(), wait_s=0)
        raise
    return workers


def end_workers(workers, wait_s: float) -> None:
    """Gives each worker wait_s seconds to exit, then terminates it; returns once every one has exited."""
    for worker in workers:
        worker.join(timeout=wait_s)
        if worker.is_alive():
            worker.terminate()
            worker.join()


def gpu_index(device: torch.device) -> int | None:
    return device.index if device.type == "cuda" else None


def generate_units(engine, shards: Path, units: Iterable[int], unit_count: int, out: OutputDir, worker: int,
                   run_index: int, job_start_ns: int, progress, unit_done=lambda unit: None) -> int:
    """Streams the requests of `units` (read lazily: a worker pulls its next unit only when its engine
    has room) through one engine run, writing a part file every engine.batch_size finished rows.
    Calls unit_done(unit) once every row of that unit is on disk. Returns the tokens generated."""
    pending: dict[int, tuple[int, dict]] = {}  # stream index → (unit, request)
    outstanding: dict[int, int] = {}  # unit → rows handed to the engine and not yet on disk
    streamed: set[int] = set()  # units whose every row has been handed to the engine

    def prompts():
        requests, index = load_shards(shards), 0
        for unit in units:
            outstanding[unit] = 0
            columns = work_unit(requests, unit_count, unit)[:]  # a unit at once: 8x faster than row by row
            for row in (dict(zip(columns, values)) for values in zip(*columns.values())):
                pending[index] = (unit, row)
                outstanding[unit] += 1
                index += 1
                yield row["input_ids"]
            streamed.add(unit)
            if outstanding[unit] == 0:
                unit_done(unit)

    def written(finished: list) -> None:
        for unit, _, _ in finished:
            outstanding[unit] -= 1
            if outstanding[unit] == 0 and unit in streamed:
                unit_done(unit)

    generated = 0
    with PartWriter(out, engine.tokenizer, engine.cfg.batch_size, worker, gpu_index(engine.device), run_index, job_start_ns,
                    progress, on_write=written) as writer:
        for index, generation in engine.run(prompts()):
            unit, row = pending.pop(index)
            writer.add(unit, row, generation)
            generated += len(generation.token_ids)
    return generated


def take_units(units: mp.Queue, events: mp.Queue, rank: int):
    """Work units from the queue until it is empty, each announced to the parent."""
    while True:
        try:
            unit = units.get(timeout=0.5)
        except queue.Empty:
            return
        events.put(("unit_start", rank, unit))
        yield unit


def progress_event(events: mp.Queue, rank: int):
    return lambda rows, tokens: events.put(("progress", rank, rows, tokens))


def colocated_worker(rank: int, loaded: LoadedModel, work: Work, events: mp.Queue, ready, units: mp.Queue) -> None:
    """Its own engine (prefill and decode) over units from the queue, until the queue is empty."""
    engine = make_engine(loaded, work.cfg, work.max_prompt_tokens, work.requests)
    events.put(("count", rank, "batch_size", engine.cfg.batch_size))
    engine.warm_up()
    ready()
    generate_units(engine, work.shards, take_units(units, events, rank), work.unit_count,
                   work.out, rank, work.run_index, work.job_start_ns,
                   progress=progress_event(events, rank), unit_done=lambda unit: events.put(("unit_done", rank, unit)))
    events.put(("count", rank, "oom_splits", engine.oom_splits))


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


def prompt_worker(rank: int, loaded: LoadedModel, pools: list, work: Work, events: mp.Queue, ready, units: mp.Queue,
                  free_slots: list[mp.Queue], handoffs: list[mp.Queue]) -> None:
    """mode=split: prefills the prompts of its units into token workers' KV slots and hands them over."""
    cfg = work.cfg
    runners = [SlotRunner(loaded.model, cfg.batch_size, slot_length(work.max_prompt_tokens, cfg.max_new_tokens),
                          kv=pool) for pool in pools]
    requests, groups, oom_splits = load_shards(work.shards), 0, 0
    ready()
    for unit in take_units(units, events, rank):
        rows = list(work_unit(requests, work.unit_count, unit))  # shortest prompt first
        done = 0
        while done < len(rows):
            enqueued = time.perf_counter_ns()
            # as many prompts as fit engine.prefill_tokens padded to the longest of them
            fit = 1
            while done + fit < len(rows) and (fit + 1) * rows[done + fit]["prompt_tokens"] <= cfg.prefill_tokens:
                fit += 1
            target, slots = acquire_slots(free_slots, fit, first_choice=groups % len(free_slots))
            group = rows[done:done + len(slots)]
            start = time.perf_counter_ns()
            firsts, splits = prefill_group(runners[target], [row["input_ids"] for row in group], slots,
                                           cfg.memory_cap_mb)
            now = time.perf_counter_ns()
            oom_splits += splits
            started, failed = [], []
            for slot, row, first in zip(slots, group, firsts):
                if isinstance(first, OutOfMemory):  # its slot goes back; the row to errors.parquet
                    free_slots[target].put(slot)
                    failed.append({"id": row["id"], "error": first.error(row["prompt_tokens"])})
                else:
                    started.append((slot, row, first))
            if failed:
                work.out.write_errors(failed)
                events.put(("progress", rank, len(failed), 0))
            if started:
                handoffs[target].put(Handoff(
                    [slot for slot, _, _ in started], [first for _, _, first in started],
                    [row["prompt_tokens"] for _, row, _ in started],
                    keys=[{k: v for k, v in row.items() if k != "input_ids"} for _, row, _ in started],
                    generations=[Generation([], batch=groups, batch_size=len(group), enqueue_ns=enqueued,
                                            prefill_start_ns=start, first_token_ns=now, prefill_worker=rank)
                                 for _ in started]))
            done += len(group)
            groups += 1
        events.put(("unit_done", rank, unit))
    events.put(("count", rank, "oom_splits", oom_splits))
    for handoff in handoffs:
        handoff.put(None)  # this prompt worker is done


def token_worker(rank: int, loaded: LoadedModel, pool, work: Work, events: mp.Queue, ready, free_slots: mp.Queue,
                 handoffs: mp.Queue, prompt_procs: int) -> None:
    """mode=split: decodes the requests handed over into its KV pool; writes them as part files."""
    engine = ContinuousEngine(loaded, work.cfg, work.max_prompt_tokens, kv=pool)
    events.put(("count", rank, "batch_size", engine.cfg.batch_size))
    for slot in range(work.cfg.batch_size):  # free slots are parked on a never-read position: safe at once
        free_slots.put(slot)
    engine.warm_up()
    ready()
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

    with PartWriter(work.out, loaded.tokenizer, work.cfg.batch_size, rank,
                    gpu_index(loaded.device), work.run_index, work.job_start_ns, progress_event(events, rank)) as writer:
        for row, generation in engine.run_handed_over(receive, release=free_slots.put):
            writer.add(None, row, generation)


def share_on_cpu(loaded: LoadedModel, pools: list = ()) -> None:
    """CUDA tensors travel as IPC handles; CPU ones must be in shared memory first."""
    if loaded.device.type == "cpu":
        loaded.model.share_memory()
        for keys, values in pools:
            for tensor in keys + values:
                tensor.share_memory_()


def plan(loaded: LoadedModel, cfg: EngineConfig, engines: int, procs: int, max_prompt_tokens: int, requests: int,
         **work) -> Work:
    """The workers' Work, with engine.batch_size resolved once: `engines` engines each sizing for "half the
    free memory" would take that many halves."""
    per_engine = max(1, -(-requests // engines))
    cfg = replace(cfg, batch_size=resolve_batch_size(loaded, cfg, max_prompt_tokens + cfg.max_new_tokens,
                                                     per_engine, share=engines))
    threads = max(1, torch.get_num_threads() // procs)  # CPU: share the cores instead of oversubscribing
    return Work(cfg=cfg, max_prompt_tokens=max_prompt_tokens, requests=per_engine, threads=threads, **work)


def run_colocated(models: list[LoadedModel], cfg: EngineConfig, procs: int, max_prompt_tokens: int, requests: int,
                  progress, **work) -> Counter:
    """Runs `procs` colocated workers per model copy (device) over all units; returns supervise's totals."""
    check_workers_fit(f"procs={procs}", procs, len(models), lambda n: worker_fds(models[0], "colocated", n))
    context = worker_context()
    units, events = context.Queue(), context.Queue()
    specs = []
    for loaded in models:
        share_on_cpu(loaded)
        device_work = plan(loaded, cfg, procs, procs * len(models), max_prompt_tokens, -(-requests // len(models)),
                           **work)
        specs += [(colocated_worker, [loaded], device_work, (units,))] * procs
    for unit in range(work["unit_count"]):
        units.put(unit)
    current: dict[int, set[int]] = {rank: set() for rank in range(len(specs))}  # rank → units it holds unfinished
    finished_units: set[int] = set()

    def on_event(kind: str, rank: int, payload) -> None:
        if kind == "unit_start":
            current[rank].add(payload)
        elif kind == "unit_done":
            current[rank].discard(payload)
            finished_units.add(payload)

    def on_exit(rank: int, exitcode: int) -> None:
        if current[rank]:  # died holding units: to the others
            log.warning("worker %d exited (code %s) holding units %s: they go back in the queue",
                        rank, exitcode, sorted(current[rank]))
            for unit in current[rank]:
                units.put(unit)
            current[rank].clear()

    return supervise(start_workers(context, specs, events), events, progress, on_event, on_exit,
                     all_done=lambda: len(finished_units) == work["unit_count"])


def run_split(models: list[LoadedModel], cfg: EngineConfig, prompt_procs: int, token_procs: int,
              max_prompt_tokens: int, requests: int, progress, **work) -> Counter:
    """Runs prompt and token workers per model copy (device) over all units; returns supervise's totals.
    A prompt worker hands over only to the token workers of its own device."""
    check_workers_fit(f"prompt_procs={prompt_procs} + token_procs={token_procs}", prompt_procs + token_procs,
                      len(models), lambda n: worker_fds(models[0], "split", n))
    context = worker_context()
    units, events = context.Queue(), context.Queue()
    specs, pools_of_devices = [], []
    max_len = slot_length(max_prompt_tokens, cfg.max_new_tokens)
    for loaded in models:
        device_work = plan(loaded, cfg, token_procs, (prompt_procs + token_procs) * len(models), max_prompt_tokens,
                           -(-requests // len(models)), **work)
        pools = [allocate_kv(loaded.model, device_work.cfg.batch_size, max_len) for _ in range(token_procs)]
        share_on_cpu(loaded, pools)
        pools_of_devices.append(pools)
        free_slots = [context.Queue() for _ in range(token_procs)]
        handoffs = [context.Queue() for _ in range(token_procs)]
        specs += [(prompt_worker, [loaded, pools], device_work, (units, free_slots, handoffs))] * prompt_procs
        specs += [(token_worker, [loaded, pool], device_work, (slots, handed, prompt_procs))
                  for pool, slots, handed in zip(pools, free_slots, handoffs)]
    for unit in range(work["unit_count"]):
        units.put(unit)

    def on_exit(rank: int, exitcode: int) -> None:
        raise WorkersFailed(f"mode=split: worker {rank} exited with code {exitcode}, holding requests in its KV "
                           "slots; the finished rows are on disk: rerun the job to resume")

    # The pools (pools_of_devices) stay referenced here until every worker has exited.
    return supervise(start_workers(context, specs, events), events, progress,
                     on_event=lambda kind, rank, payload: None, on_exit=on_exit, all_done=lambda: True)


def exception_line(traceback_text: str) -> str:
    """The `SomeError: message` line of a traceback (CUDA errors end with advice lines after it)."""
    lines = traceback_text.strip().splitlines()
    return next((line for line in reversed(lines) if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)), lines[-1])


def supervise(workers: dict[int, mp.Process], events: mp.Queue, progress, on_event, on_exit, all_done) -> Counter:
    """Follows the started workers' events until every one has exited and all_done() holds.
    on_exit(rank, code) is called, every turn, for each worker that has exited with a non-zero code.
    Returns the totals: generated_tokens (from the progress events) and the workers' counts (oom_splits, and
    batch_size: the decoding workers' running batches together)."""
    totals, failures = Counter(), []
    try:
        while not all_done() or any(w.is_alive() for w in workers.values()):
            try:
                kind, rank, *payload = events.get(timeout=1.0)
            except queue.Empty:
                kind = None
            if kind == "progress":
                progress(*payload)
                totals["generated_tokens"] += payload[1]
            elif kind == "count":
                totals[payload[0]] += payload[1]
            elif kind == "error":
                failures.append(payload[0])
            elif kind is not None:
                on_event(kind, rank, payload[0])
            # Every turn: while the others stream progress there may be no quiet second to wait for.
            # Exit code 0 is a normal end whose last events may still be queued: not a death.
            for rank, worker in workers.items():
                if worker.exitcode not in (None, 0):
                    on_exit(rank, worker.exitcode)
            if not any(w.is_alive() for w in workers.values()) and not all_done():
                detail = exception_line(failures[-1]) if failures else "killed"
                raise WorkersFailed(f"all workers exited with work left ({detail}); rerun the job to resume")
    finally:  # ours to end, on success, error or interrupt alike
        end_workers(workers.values(), wait_s=60 if all_done() else 0)
    for failure in failures:  # the others finished its work; say what happened
        log.warning("a worker failed, its work was done by the others:\n%s", failure)
    return totals
