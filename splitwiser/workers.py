"""Worker processes: starting them with the model's tensors shared, following their events, ending them.
The two modes that use them are colocated.py and split.py; this module is what they have in common.

The parent loaded the model; each worker receives it through torch.multiprocessing, which shares its
tensors instead of copying them: CUDA IPC handles on a GPU, shared memory on the CPU. Workers fork
from a fork server that has imported the job's modules (torch, transformers, datasets) once, before any
CUDA call: a worker starts in a moment instead of repeating those imports, and jobs.run starts that
server before its own imports, so that the two run side by side. Work units (contiguous slices of the
length-sorted Arrow shards) are handed out from a queue, so a worker that finishes early takes more.
Workers tell the parent what they do through typed events on one queue (supervise).

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
import re
import resource
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import chain
from multiprocessing import connection, forkserver, parent_process
from pathlib import Path

import torch
import torch.multiprocessing as mp

from splitwiser import WORKER_PRELOAD
from splitwiser.config import EngineConfig
from splitwiser.engine import Choice, resolve_engine
from splitwiser.errors import UserError, WorkersFailed
from splitwiser.memory import free_memory, gigabytes
from splitwiser.models import LoadedModel
from splitwiser.output import OutputDir

log = logging.getLogger(__name__)
# What starting a worker costs the job (bench/NOTES.md, "What a worker costs"): the file descriptors of its pipes
# (status, data, inbox), one more per CPU tensor it is sent until it has taken it; and its own memory beside the
# shared weights and its KV cache (which engine.kv_capacity counts).
FDS_PER_WORKER = 5
WORKER_BYTES = 300 * 2**20


@dataclass
class Work:
    """What every worker of a run needs to know (pickled to each)."""
    cfg: EngineConfig  # per device (for_device): batch_size resolved, the slots (or batch) of each engine
    slot_length: int  # positions per KV slot (plan.slot_length)
    choice: Choice  # how tokens are chosen: the sampling settings
    requests: int  # the requests, per engine once for_device has divided them
    threads: int  # CPU threads, per worker once for_device has divided them
    shards: Path
    unit_count: int
    out: OutputDir  # its job_id set: the parts it writes carry it
    run_index: int
    job_start_ns: int
    prompt_lengths: tuple[int, ...] = ()  # the longest prompts' token counts (Plan.prompt_lengths)

    def for_device(self, loaded: LoadedModel, devices: int, engines: int, processes: int) -> "Work":
        """The Work of the workers on the device of `loaded`, one of `devices`, where `engines` workers decode (each
        with its own KV cache) out of `processes`: engine.batch_size resolved once for all of them (engines each
        sizing for "half the free memory" would take that many halves)."""
        requests = max(1, -(-self.requests // (devices * engines)))
        cfg = resolve_engine(loaded, self.cfg, self.slot_length, requests, engines, self.prompt_lengths)
        return replace(self, cfg=cfg, requests=requests,
                       threads=max(1, self.threads // (devices * processes)))  # CPU: share the cores


@dataclass
class Event:
    """What a worker tells the parent, on the events queue."""
    rank: int


@dataclass
class RowsWritten(Event):
    rows: int
    tokens: int


@dataclass
class UnitStarted(Event):
    unit: int


@dataclass
class UnitDone(Event):
    unit: int  # every row of it is on disk


@dataclass
class EngineBuilt(Event):
    batch_size: int  # its running batch
    fallback_from: str | None = None  # why it is not the engine configured


@dataclass
class WorkerDone(Event):
    oom_splits: int  # batches it ran as halves because they ran out of memory
    kv_tokens: int = 0  # its KV cache's size, and the most of it its requests held at once
    kv_peak_tokens: int = 0


@dataclass
class WorkerFailed(Event):
    traceback: str
    user_error: str | None = None  # a UserError's message: the job ends with that one line, as without workers


@dataclass
class Totals:
    """What a run's engines did, summed over its workers, for the manifest."""
    generated_tokens: int = 0
    oom_splits: int = 0
    batch_size: int | None = None  # the decoding engines' running batches together (None: no engine was built)
    fallback_from: str | None = None  # why the engines are not the ones configured
    kv_tokens: int = 0  # the continuous engines' KV caches together, in tokens, and the most they held at once
    kv_peak_tokens: int = 0


def worker_context():
    """Worker processes come from the fork server, which imports WORKER_PRELOAD first (if jobs.run has not started it
    already)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
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
    except BaseException as e:
        events.put(WorkerFailed(rank, traceback.format_exc(), str(e) if isinstance(e, UserError) else None))
        raise SystemExit(1)


def worker_fds(loaded: LoadedModel, procs: int, pools: int = 0) -> int:
    """The file descriptors that starting `procs` workers on the device of `loaded` takes in the job until each
    has its tensors: a worker's pipes, and one per CPU tensor it is sent: the model's to each, and `pools` KV pools
    in all (mode=split); CUDA tensors travel as IPC handles."""
    if loaded.device.type != "cpu":
        return procs * FDS_PER_WORKER
    model = len({t.untyped_storage().data_ptr() for t in chain(loaded.model.parameters(), loaded.model.buffers())})
    return procs * (FDS_PER_WORKER + model) + pools * (2 * loaded.model.config.num_hidden_layers + 1)


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


def take_units(units: mp.Queue, events: mp.Queue, rank: int):
    """Work units from the queue until it is empty, each announced to the parent."""
    while True:
        try:
            unit = units.get(timeout=0.5)
        except queue.Empty:
            return
        events.put(UnitStarted(rank, unit))
        yield unit


def progress_event(events: mp.Queue, rank: int) -> Callable[[int, int], None]:
    """A PartWriter's progress(rows, tokens), as events to the parent."""
    return lambda rows, tokens: events.put(RowsWritten(rank, rows, tokens))


def share_on_cpu(loaded: LoadedModel, pools: list = ()) -> None:
    """CUDA tensors travel as IPC handles; CPU ones must be in shared memory first."""
    if loaded.device.type == "cpu":
        loaded.model.share_memory()
        for pool in pools:
            for tensor in pool.tensors():
                tensor.share_memory_()


def exception_line(traceback_text: str) -> str:
    """The `SomeError: message` line of a traceback (CUDA errors end with advice lines after it)."""
    lines = traceback_text.strip().splitlines()
    return next((line for line in reversed(lines) if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)), lines[-1])


def supervise(workers: dict[int, mp.Process], events: mp.Queue, progress, on_exit: Callable[[int, int], None],
              on_unit: Callable[[Event], None] = lambda event: None, all_done: Callable[[], bool] = lambda: True) -> Totals:
    """Follows the started workers' events until every one has exited and all_done() holds: their rows written go
    to progress(rows, tokens) and the totals, UnitStarted and UnitDone to on_unit(event). on_exit(rank, code) is
    called, every turn, for each worker that has exited with a non-zero code."""
    totals, failures, ended = Totals(), [], False
    try:
        while not all_done() or any(w.is_alive() for w in workers.values()):
            try:
                tally(events.get(timeout=1.0), totals, failures, progress, on_unit)
            except queue.Empty:
                pass
            # Every turn: while the others stream progress there may be no quiet second to wait for.
            # Exit code 0 is a normal end whose last events may still be queued: not a death.
            for rank, worker in workers.items():
                if worker.exitcode not in (None, 0):
                    on_exit(rank, worker.exitcode)
            if not any(w.is_alive() for w in workers.values()) and not all_done():
                if failures and failures[-1].user_error:
                    raise UserError(failures[-1].user_error)
                detail = exception_line(failures[-1].traceback) if failures else "killed"
                raise WorkersFailed(f"all workers exited with work left ({detail}); rerun the job to resume")
        ended = True
    finally:  # ours to end, on success, error or interrupt alike: after an error at once (a prompt worker whose
        # token worker died would wait for free slots for ever)
        end_workers(workers.values(), wait_s=60 if ended else 0)
    for failure in failures:  # the others finished its work; say what happened
        log.warning("a worker failed, its work was done by the others:\n%s", failure.traceback)
    return totals


def tally(event: Event, totals: Totals, failures: list[WorkerFailed], progress, on_unit: Callable[[Event], None]) -> None:
    """Takes one worker event into the totals, the progress, the failures, or on_unit."""
    match event:
        case RowsWritten(rows=rows, tokens=tokens):
            progress(rows, tokens)
            totals.generated_tokens += tokens
        case EngineBuilt(batch_size=batch_size, fallback_from=fallback_from):
            totals.batch_size = (totals.batch_size or 0) + batch_size
            totals.fallback_from = totals.fallback_from or fallback_from
        case WorkerDone(oom_splits=oom_splits, kv_tokens=kv_tokens, kv_peak_tokens=kv_peak_tokens):
            totals.oom_splits += oom_splits
            totals.kv_tokens += kv_tokens
            totals.kv_peak_tokens += kv_peak_tokens
        case WorkerFailed():
            failures.append(event)
        case UnitStarted() | UnitDone():
            on_unit(event)
