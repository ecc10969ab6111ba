"""Command-line entry points (Hydra). Thin: the work is in splitwiser/."""

import functools
import multiprocessing
import signal
import sys
import warnings
from multiprocessing import forkserver

from splitwiser.config import UserError, WorkersFailed, register_configs

register_configs()
# datasets' sort passes an option that pyarrow has deprecated: noise for the user, not theirs to fix.
warnings.filterwarnings("ignore", message="Specifying null_placement in SortOptions", category=FutureWarning)


def set_up_job_process(cfg) -> None:
    """For a process that runs jobs (jobs.run, jobs.nightly), before it imports torch:
    - SIGTERM (scancel, a preempted node, kill) unwinds like Ctrl-C: workers and an MPS daemon the job
      started are stopped; finished batches are already on disk, and a rerun resumes.
    - A job with worker processes forks them from a server that imports splitwiser.workers (torch,
      transformers, datasets) once. Started here, before this process imports the same modules, the two
      imports run side by side instead of one after the other. (gpus=auto on a node with several GPUs
      is only known after torch is imported: there the server starts with the first worker.)"""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    several_gpus = (isinstance(cfg.gpus, int) and cfg.gpus > 1) or (not isinstance(cfg.gpus, (int, str)) and len(cfg.gpus) > 1)
    if cfg.procs != 1 or cfg.mode in ("colocated", "split") or several_gpus:
        multiprocessing.set_forkserver_preload(["splitwiser.workers"])
        forkserver.ensure_running()


def errors_in_one_line(main):
    """A UserError ends the command with `error: ...` on stderr and exit status 2, no traceback;
    failed workers (the rows they finished are on disk) with `error: ...` and exit status 1."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except WorkersFailed as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    return wrapper
