"""N worker processes on one device, sharing one copy of the weights (mode=colocated).

The parent loaded the model; each worker receives it through torch.multiprocessing (spawn), which
shares its tensors instead of copying them: CUDA IPC handles on a GPU, shared memory on the CPU.
Work units (contiguous slices of the Arrow shards) are handed out from a queue, so a worker that
finishes early takes more. Each worker runs its own engine over its units and writes its own part
files; the parent follows progress through an event queue. A worker that dies has its unit put
back for the others (rows it had already written are kept once by the merge); the job fails only
if work is left and no worker is alive. Workers always exit before the parent returns, so no
shared CUDA tensor is released while a worker still uses it.
"""

import gc
import logging
import queue
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

from splitwiser.config import EngineConfig
from splitwiser.engine import make_engine, resolve_batch_size
from splitwiser.models import LoadedModel
from splitwiser.output import OutputDir

log = logging.getLogger(__name__)


def worker_main(rank: int, model_holder: list[LoadedModel], cfg: EngineConfig, max_prompt_tokens: int,
                requests: int, shards: Path, unit_count: int, out_path: Path, run_index: int, job_start_ns: int,
                threads: int, units: mp.Queue, events: mp.Queue) -> None:
    """One worker: its engine over units from the queue, until the queue is empty."""
    from splitwiser.job import generate_units  # here: job.py imports this module

    # The model arrives in a list that the worker empties: multiprocessing keeps a process's
    # arguments until it exits, and shared CUDA tensors still referenced at exit are never
    # released to the parent (PyTorch warns "producer process terminated before all shared CUDA
    # tensors released"). Dropping every reference before returning releases them.
    loaded = model_holder.pop()
    try:
        torch.set_num_threads(threads)
        engine = make_engine(loaded, cfg, max_prompt_tokens, requests)
        engine.warm_up()
        out = OutputDir(str(out_path), overwrite=False)

        def take_units():  # pulled lazily by the engine, as its slots free up
            while True:
                try:
                    unit = units.get(timeout=0.5)
                except queue.Empty:
                    return
                events.put(("unit_start", rank, unit))
                yield unit

        generate_units(engine, shards, take_units(), unit_count, out, rank, run_index, job_start_ns,
                       progress=lambda rows, tokens: events.put(("progress", rank, rows, tokens)),
                       unit_done=lambda unit: events.put(("unit_done", rank, unit)))
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)
        del engine, loaded
        gc.collect()
    except BaseException:  # reported to the parent, which fails the job with it
        events.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1)


def run_workers(loaded: LoadedModel, cfg: EngineConfig, procs: int, max_prompt_tokens: int, requests: int,
                shards: Path, unit_count: int, out: OutputDir, run_index: int, job_start_ns: int, progress) -> int:
    """Runs `procs` workers over all units; returns the tokens they generated (and wrote)."""
    if loaded.device.type == "cpu":
        loaded.model.share_memory()  # CUDA tensors travel as IPC handles; CPU ones need shared memory
    context = mp.get_context("spawn")
    units, events = context.Queue(), context.Queue()
    for unit in range(unit_count):
        units.put(unit)
    per_worker = max(1, -(-requests // procs))
    # Resolved here, once: N workers each sizing for "half the free memory" would take N halves.
    cfg = replace(cfg, batch_size=resolve_batch_size(loaded, cfg, max_prompt_tokens + cfg.max_new_tokens,
                                                     per_worker, share=procs))
    threads = max(1, torch.get_num_threads() // procs)  # CPU: share the cores instead of oversubscribing
    args = ([loaded], cfg, max_prompt_tokens, per_worker, shards, unit_count, out.path, run_index, job_start_ns,
            threads, units, events)
    workers = {rank: context.Process(target=worker_main, args=(rank, *args), name=f"splitwiser-worker-{rank}")
               for rank in range(procs)}
    for worker in workers.values():
        worker.start()
    current: dict[int, set[int]] = {rank: set() for rank in workers}  # rank → units it holds unfinished
    finished_units: set[int] = set()
    generated, failures = 0, []
    try:
        while len(finished_units) < unit_count or any(w.is_alive() for w in workers.values()):
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                event = None
            if event is not None:
                kind, rank = event[0], event[1]
                if kind == "unit_start":
                    current[rank].add(event[2])
                elif kind == "progress":
                    progress(event[2], event[3])
                    generated += event[3]
                elif kind == "unit_done":
                    current[rank].discard(event[2])
                    finished_units.add(event[2])
                elif kind == "error":
                    failures.append(event[2])
            # Every turn: while the others stream progress there may be no quiet second to wait for.
            # Exit code 0 is a normal end whose last events may still be queued: not a death.
            for rank, worker in workers.items():
                if worker.exitcode not in (None, 0) and current[rank]:  # died holding units: to the others
                    log.warning("worker %d exited (code %s) holding units %s: they go back in the queue",
                                rank, worker.exitcode, sorted(current[rank]))
                    for unit in current[rank]:
                        units.put(unit)
                    current[rank].clear()
            if not any(w.is_alive() for w in workers.values()) and len(finished_units) < unit_count:
                detail = failures[-1].strip().splitlines()[-1] if failures else "killed"
                raise RuntimeError(f"all workers exited with {unit_count - len(finished_units)} work units left "
                                   f"({detail}); rerun the job to resume")
    finally:
        for worker in workers.values():  # ours to end, on success, error or interrupt alike
            worker.join(timeout=60 if len(finished_units) == unit_count else 0)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    for failure in failures:  # the others finished its work; say what happened
        log.warning("a worker failed, its work was done by the others:\n%s", failure)
    return generated
