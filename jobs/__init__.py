"""Command-line entry points (Hydra). Thin: the work is in splitwiser/."""

import functools
import logging
import multiprocessing
import os
import signal
import sys
import warnings
from multiprocessing import forkserver
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

# Threads that wait by sleeping instead of spinning, in every command (torch reads this as it is imported): beside
# other work (the grammar library's threads, tokenizers, the workers) spinning ones take its CPUs, which costs far
# more than spinning gains on an idle CPU (bench/NOTES.md, runs 17 and 30).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from splitwiser import WORKER_PRELOAD  # noqa: E402 (after the wait policy: nothing here imports torch yet)
from splitwiser.config import JobConfig, register_configs, to_job_config
from splitwiser.errors import UserError, WorkersFailed

register_configs()
# datasets' sort passes an option that pyarrow has deprecated: noise for the user, not theirs to fix.
warnings.filterwarnings("ignore", message="Specifying null_placement in SortOptions", category=FutureWarning)
CONF = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("splitwiser")


# What a job says when a signal stops it: Ctrl-C (SIGINT), scancel, a preempted node or kill (SIGTERM), a closed
# terminal or ssh session (SIGHUP). The exit status is 128 + the signal's number, as a shell gives it.
STOPPED_BY = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}


class Stopped(SystemExit):
    """A signal that stops a command (STOPPED_BY): unwinds like Ctrl-C, so that workers and an MPS daemon the job
    started are stopped and its finished rows stay on disk."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.how = STOPPED_BY[signum]


def stop(signum, frame) -> NoReturn:
    raise Stopped(signum)


def stop_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise Stopped from here on."""
    for signum in STOPPED_BY:
        signal.signal(signum, stop)


def cpu_threads(requested: int | None) -> tuple[int, str]:
    """The CPU threads of a job (its workers share them), and where the number comes from: engine.cpu_threads;
    else the user's OMP_NUM_THREADS; else the CPUs this process may use (its affinity: taskset, a cpuset,
    SLURM's binding), at most SLURM_CPUS_PER_TASK (SLURM does not always bind). Threads that outnumber the CPUs
    they get wait for each other at every step (bench/NOTES.md, run 17)."""
    if requested is not None:
        return requested, "engine.cpu_threads"
    if os.environ.get("OMP_NUM_THREADS"):
        try:
            return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
        except ValueError:
            raise UserError(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}: must be a number of threads; "
                            "or unset it and give engine.cpu_threads=N") from None
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    slurm = int(os.environ.get("SLURM_CPUS_PER_TASK") or allowed)
    if slurm < allowed:
        return slurm, "SLURM_CPUS_PER_TASK"
    return allowed, "the CPUs this process may use"


def set_up_job_process(job: JobConfig) -> None:
    """For a process that runs jobs (jobs.run, jobs.nightly), before it imports torch:
    - The CPU threads (cpu_threads), as OMP_NUM_THREADS: torch reads it when imported, in this process and in the
      workers (forked from the fork server, which inherits the environment).
    - A job with worker processes forks them from a server that imports WORKER_PRELOAD (torch,
      transformers, datasets) once. Started here, before this process imports the same modules, the two
      imports run side by side instead of one after the other. (gpus=auto on a node with several GPUs
      is only known after torch is imported: there the server starts with the first worker.)"""
    threads, source = cpu_threads(job.engine.cpu_threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    log.info("cpu threads: %d (from %s), OMP_WAIT_POLICY=%s", threads, source, os.environ["OMP_WAIT_POLICY"])
    if job.procs == "auto" or job.mode_for(job.least_devices()) != "single":
        multiprocessing.set_forkserver_preload(WORKER_PRELOAD)
        forkserver.ensure_running()


def last_line(message: str) -> None:
    """Prints the command's last line. Log records that libraries emit at exit (torch's FakeTensor cache stats, from
    an atexit hook, where a signal cut its import short) would follow it: from here on, none is shown."""
    logging.disable(logging.CRITICAL)
    print(message, file=sys.stderr)


def fail(message: str, status: int) -> NoReturn:
    last_line(f"error: {message}")
    sys.exit(status)


def config_error(e: Exception) -> str:
    """Hydra's account of a config it could not compose (many lines: the search path, a hint) in one line
    that names the override and what is wrong with it."""
    if isinstance(e, MissingConfigException) and e.options:  # an unknown choice of a config group (conf/GROUP/)
        group, _, choice = e.missing_cfg_file.rpartition("/")
        return f"{group}={choice}: no such choice; the choices are: {', '.join(e.options)}"
    if isinstance(e, OverrideParseException):
        return f"{e.override}: {e.message.splitlines()[0]} (the override syntax: key=value, key=[a,b], key='a b')"
    if isinstance(e.__cause__, OmegaConfBaseException):
        return omegaconf_error(e.__cause__)
    return " ".join(str(e).split())


def omegaconf_error(e: OmegaConfBaseException) -> str:
    """An unknown key, a value of the wrong type, a missing value or interpolation, in one line."""
    if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and e.parent_node is not None:
        keys = [str(key) for key in e.parent_node if key != "hydra"]  # Hydra's own settings: not the user's keys
        return f"{e.full_key}: no such key; the keys there are: {', '.join(keys)}"
    return f"{e.full_key}: {e.msg.splitlines()[0]}"  # the lines after the first are OmegaConf's internals


def run_job(main, cfg: DictConfig) -> None:
    """main(job) in a process set up for jobs. A signal (stop_on_signals) ends it with one line saying that its
    finished rows are on disk."""
    job = to_job_config(cfg)
    try:
        set_up_job_process(job)
        main(job)
    except Stopped as e:
        last_line(f"{e.how}: the finished rows are kept in {job.output.dir}; run the same command again to resume")
        sys.exit(e.code)


def command(config_name: str, job: bool = False):
    """Makes main(cfg) a command over conf/CONFIG_NAME.yaml: Hydra's main (overrides, --multirun, --help).
    job=True: main receives the validated JobConfig, in a process set up for jobs (run_job).
    A mistake ends the command with one line `error: ...` on stderr, no traceback, and exit status 2: a UserError,
    or a config Hydra cannot compose (an unknown choice or key, a value of the wrong type, a bad override);
    failed workers (the rows they finished are on disk) with exit status 1."""
    def decorate(main):
        @functools.wraps(main)
        def task(cfg: DictConfig) -> None:
            try:
                run_job(main, cfg) if job else main(cfg)
            except UserError as e:
                fail(str(e), 2)
            except WorkersFailed as e:
                fail(str(e), 1)
            except OmegaConfBaseException as e:  # found as the config is used: a missing value (???), an interpolation
                fail(omegaconf_error(e), 2)

        hydra_main = hydra.main(version_base="1.3", config_path=CONF, config_name=config_name)(task)

        @functools.wraps(main)
        def entry() -> None:
            # Hydra prints a config error over many lines and exits with 1; HYDRA_FULL_ERROR makes it raise it.
            os.environ["HYDRA_FULL_ERROR"] = "1"
            stop_on_signals()
            try:
                hydra_main()
            except (ConfigCompositionException, OverrideParseException) as e:
                fail(config_error(e), 2)
            except Stopped as e:  # before a job's output dir is known, or a command that is no job
                last_line(f"{e.how}: run the same command again to finish")
                sys.exit(e.code)
        return entry
    return decorate
