"""One engine over work units, writing part files: what mode=single runs in the job's own process, and what each
worker of mode=colocated runs in its own (`procs` workers per device, each prefilling and decoding its requests).

A colocated worker that dies has its units put back for the others (rows it had already written are kept
once by the merge); the job fails only if work is left and no worker is alive.
"""

import logging
from collections.abc import Callable, Iterable, Iterator

import torch.multiprocessing as mp

from splitwiser.engine import make_engine
from splitwiser.models import LoadedModel
from splitwiser.output import PartWriter, part_rows
from splitwiser.plan import Plan
from splitwiser.prepare import load_shards, work_unit
from splitwiser.request import Generation, Request
from splitwiser.workers import EngineBuilt, Totals, UnitDone, UnitStarted, Work, WorkerDone, check_workers_fit, \
    gpu_index, progress_event, share_on_cpu, start_workers, supervise, take_units, worker_context, worker_fds

log = logging.getLogger(__name__)


def generate_units(engine, work: Work, units: Iterable[int], worker: int, progress,
                   unit_done: Callable[[int], None] = lambda unit: None) -> int:
    """Streams the requests of `units` (read lazily: the next unit only when the engine has room) through one
    engine run, writing a part file every part_rows finished rows. Calls unit_done(unit) once every
    row of that unit is on disk. Returns the tokens generated."""
    unit_of: dict[tuple[str, int], int] = {}  # request key → its unit
    outstanding: dict[int, int] = {}  # unit → rows handed to the engine and not yet on disk
    streamed: set[int] = set()  # units whose every row has been handed to the engine

    def requests() -> Iterator[Request]:
        shards = load_shards(work.shards)
        for unit in units:
            outstanding[unit] = 0
            for request in Request.from_columns(work_unit(shards, work.unit_count, unit)[:]):
                unit_of[request.key] = unit
                outstanding[unit] += 1
                yield request
            streamed.add(unit)
            if outstanding[unit] == 0:
                unit_done(unit)

    def written(generations: list[Generation]) -> None:
        for generation in generations:
            unit = unit_of.pop(generation.request.key)
            outstanding[unit] -= 1
            if outstanding[unit] == 0 and unit in streamed:
                unit_done(unit)

    generated, source = 0, requests()
    with PartWriter(work.out, engine.tokenizer, part_rows(engine.cfg.batch_size, work.requests), worker,
                    gpu_index(engine.device), work.run_index, work.job_start_ns, progress, on_write=written,
                    stop=work.choice.sampling.stop, thinking=work.choice.thinking) as writer:
        for generation in engine.run(source):
            writer.add(generation)
            generated += len(generation.token_ids)
    if unit_of or next(source, None) is not None:  # the engine ended before its last request: never lose them quietly
        raise RuntimeError(f"{type(engine).__name__} ended with requests it did not answer (a bug): the rows it "
                           "answered are on disk, and a rerun generates the rest")
    return generated


def colocated_worker(rank: int, loaded: LoadedModel, work: Work, events: mp.Queue, ready, units: mp.Queue) -> None:
    """Its own engine (prefill and decode) over units from the queue, until the queue is empty."""
    engine = make_engine(loaded, work.cfg, work.slot_length, work.requests, work.choice, work.prompt_lengths)
    events.put(EngineBuilt(rank, engine.cfg.batch_size, getattr(engine, "fallback_from", None)))
    engine.warm_up()
    ready()
    generate_units(engine, work, take_units(units, events, rank), rank, progress=progress_event(events, rank),
                   unit_done=lambda unit: events.put(UnitDone(rank, unit)))
    events.put(WorkerDone(rank, engine.oom_splits, getattr(engine, "kv_tokens", 0), getattr(engine, "kv_peak_tokens", 0)))


def run_colocated(models: list[LoadedModel], plan: Plan, work: Work, progress) -> Totals:
    """Runs plan.procs colocated workers per model copy (device) over all units."""
    check_workers_fit(f"procs={plan.procs}", plan.procs, len(models), lambda n: worker_fds(models[0], n))
    context = worker_context()
    units, events = context.Queue(), context.Queue()
    specs = []
    for loaded in models:
        share_on_cpu(loaded)
        device_work = work.for_device(loaded, len(models), engines=plan.procs, processes=plan.procs)
        specs += [(colocated_worker, [loaded], device_work, (units,))] * plan.procs
    for unit in range(work.unit_count):
        units.put(unit)
    held: dict[int, set[int]] = {rank: set() for rank in range(len(specs))}  # rank → units it holds unfinished
    finished: set[int] = set()

    def on_unit(event: UnitStarted | UnitDone) -> None:
        if isinstance(event, UnitStarted):
            held[event.rank].add(event.unit)
        else:
            held[event.rank].discard(event.unit)
            finished.add(event.unit)

    def on_exit(rank: int, exitcode: int) -> None:
        if held[rank]:  # died holding units: to the others
            log.warning("worker %d exited (code %s) holding units %s: they go back in the queue",
                        rank, exitcode, sorted(held[rank]))
            for unit in held[rank]:
                units.put(unit)
            held[rank].clear()

    return supervise(start_workers(context, specs, events), events, progress, on_exit, on_unit,
                     all_done=lambda: len(finished) == work.unit_count)
