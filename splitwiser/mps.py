"""NVIDIA MPS for the job's worker processes: start a control daemon in job-local directories, or
reuse one that already runs (a cluster's), and stop only a daemon this job started.

MPS lets the kernels of several processes share the GPU at once instead of time-slicing their
contexts. It never touches the GPU's compute mode. Start it before the workers start: they are its
clients. (The parent, whose CUDA was initialised before, is not; the workers share its tensors all
the same: bench/NOTES.md, run 13.)
"""

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from splitwiser.config import MPSConfig
from splitwiser.errors import UserError

log = logging.getLogger(__name__)
CONTROL = "nvidia-cuda-mps-control"
KNOWN_LOCATIONS = ["/usr/local/nvidia/bin", "/usr/bin", "/usr/local/cuda/bin"]


@dataclass
class MPSState:
    active: bool
    note: str  # for the log and the manifest: why it is on or off, and whose daemon it is


def control_binary() -> str | None:
    return shutil.which(CONTROL) or next(
        (os.path.join(d, CONTROL) for d in KNOWN_LOCATIONS if os.access(os.path.join(d, CONTROL), os.X_OK)), None)


def _control(binary: str, command: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run([binary], input=command + "\n", capture_output=True, text=True, timeout=timeout)


def daemon_answers(binary: str) -> bool:
    """True if a control daemon listens on CUDA_MPS_PIPE_DIRECTORY (or the default pipe)."""
    try:
        return _control(binary, "get_server_list", timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def mps_session(cfg: MPSConfig, wanted: bool) -> Iterator[MPSState]:
    """MPS for the duration of the block. `wanted`: the job runs several processes (mps=auto starts
    MPS only then; mps=on starts it regardless)."""
    if cfg.mode == "off":
        yield MPSState(False, "off (mps=off)")
        return
    binary = control_binary()
    reason = ("no CUDA GPU" if not torch.cuda.is_available() else f"{CONTROL} not found" if binary is None
              else "the job runs one process" if not wanted and cfg.mode == "auto" else None)
    if reason:
        if cfg.mode == "on":
            raise UserError(f"mps=on but MPS cannot run here: {reason}; use mps=auto or mps=off")
        log.info("MPS off: %s", reason)
        yield MPSState(False, f"off ({reason})")
        return
    if cfg.active_thread_percentage is not None:
        os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(cfg.active_thread_percentage)
    if daemon_answers(binary):
        log.info("MPS: using the control daemon that already runs")
        yield MPSState(True, "on (existing daemon)")
        return
    pipes, logs = tempfile.mkdtemp(prefix="splitwiser-mps-pipe-"), tempfile.mkdtemp(prefix="splitwiser-mps-log-")
    previous = {k: os.environ.get(k) for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")}
    os.environ.update(CUDA_MPS_PIPE_DIRECTORY=pipes, CUDA_MPS_LOG_DIRECTORY=logs)  # workers inherit these
    try:
        started = subprocess.run([binary, "-d"], capture_output=True, text=True, timeout=30)
        if started.returncode != 0 or not daemon_answers(binary):
            message = (started.stderr or started.stdout).strip() or f"exit status {started.returncode}"
            if cfg.mode == "on":
                raise UserError(f"mps=on but the MPS control daemon did not start: {message}")
            log.warning("MPS off: the control daemon did not start (%s)", message)
            yield MPSState(False, f"off (daemon did not start: {message})")
            return
        log.info("MPS: started a control daemon (pipes in %s)", pipes)
        try:
            yield MPSState(True, "on (daemon started by this job)")
        finally:
            _control(binary, "quit")
            log.info("MPS: control daemon stopped")
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(pipes, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
