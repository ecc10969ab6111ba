"""Plans a run: its devices and mode, its worker processes (procs=auto included), whether it wants MPS, and its
pieces (the work unit, the KV slot length). Each is decided here, once; the job passes the Plan on and the
manifest records it.

    plan = plan_run(job, devices)                             # before MPS and the model load
    plan = plan.for_requests(requests, job.engine)            # once the prompts are tokenized
    plan = plan.with_procs(*choose_procs(engine, ...))        # procs=auto: after a warmed-up engine's probe
"""

import heapq
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from splitwiser.config import EngineConfig, JobConfig

# Generation tokens/s of 2 colocated workers with MPS over one process on a GPU: the lowest of bench/NOTES.md's
# runs 8, 11 and 13, erring towards one process.
COLOCATED_GAIN = 1.16
# A one-process job's generation tokens/s over its decode probe's: the probe leaves out the prefills, the waves'
# tails and the host's work between them (bench/NOTES.md, runs 13, 15 and 16).
JOB_SHARE_OF_PROBE = 0.55
# Work units per worker: a worker that finishes early takes more.
UNITS_PER_WORKER = 4
MAX_SLOTS = 2048  # the most slots engine.batch_size=auto gives an engine


@dataclass(frozen=True)
class Plan:
    devices: list[torch.device]  # one model copy on each
    mode: str  # single | colocated | split
    procs: int  # worker processes per device (split: prompt_procs + token_procs; single: 1)
    prompt_procs: int | None = None  # mode=split
    token_procs: int | None = None
    procs_auto: dict | None = None  # procs=auto: {} until choose_procs has decided, then its reasons
    unit_rows: int = 0  # requests per work unit
    max_prompt_tokens: int = 0
    slot_length: int = 0  # positions per KV slot
    # The longest prompts' token counts, longest first, as many as an engine may have slots: its KV cache never
    # needs more than their requests hold at once (engine.kv_capacity).
    prompt_lengths: tuple[int, ...] = ()

    @property
    def wants_mps(self) -> bool:
        """Whether the run may start worker processes on a GPU: MPS must run before they start."""
        return self.mode != "single" or (self.procs_auto is not None and self.devices[0].type == "cuda")

    def for_requests(self, requests, cfg: EngineConfig) -> "Plan":
        """The work unit and the KV slot length, for `requests` (a table with a prompt_tokens column)."""
        most_procs = 2 if self.procs_auto is not None else self.procs
        workers = most_procs * len(self.devices)
        unit_rows = min(cfg.shard_rows, max(1, -(-len(requests) // (UNITS_PER_WORKER * workers))))
        prompt_tokens = requests["prompt_tokens"][:]  # a list at once: a column iterated is read row by row
        max_prompt_tokens = max(prompt_tokens, default=1)
        return replace(self, unit_rows=unit_rows, max_prompt_tokens=max_prompt_tokens,
                       slot_length=slot_length(max_prompt_tokens, cfg.max_new_tokens),
                       prompt_lengths=longest_prompts(prompt_tokens, cfg))

    def with_procs(self, procs: int, reasons: dict) -> "Plan":
        """procs=auto, decided: more than one process on a device, or several devices, run colocated workers."""
        mode = "colocated" if procs > 1 or len(self.devices) > 1 else self.mode
        return replace(self, procs=procs, mode=mode, procs_auto=reasons)

    def engine_kind(self, kind: str) -> str:
        """What ran in a worker mode, for the manifest: the workers and their engines."""
        if self.mode == "colocated":
            label = f"{self.procs} x {kind} (colocated)"
        else:
            label = f"{self.prompt_procs} prompt + {self.token_procs} token workers (split)"
        return label + (f" on each of {len(self.devices)} devices" if len(self.devices) > 1 else "")

    def record(self) -> dict:
        """The plan as the manifest's run record has it."""
        record = asdict(self) | {"devices": [str(device) for device in self.devices]}
        return {key: value for key, value in record.items() if value is not None and key != "prompt_lengths"}


def plan_run(job: JobConfig, devices: list[torch.device]) -> Plan:
    """The mode and worker processes of a run on `devices`; the rest comes with the requests (for_requests)."""
    mode = job.mode_for(len(devices))
    if mode == "split":  # at least one of each
        prompt_procs = job.prompt_procs or max(1, job.procs // 2)
        token_procs = job.token_procs or max(1, job.procs - prompt_procs)
        return Plan(devices, mode, prompt_procs + token_procs, prompt_procs, token_procs)
    if job.procs == "auto":
        return Plan(devices, mode, 1, procs_auto={})
    return Plan(devices, mode, job.procs)


def longest_prompts(prompt_tokens, cfg: EngineConfig) -> tuple[int, ...]:
    """The longest prompts' token counts, longest first, as many as an engine may have slots (Plan.prompt_lengths)."""
    return tuple(heapq.nlargest(MAX_SLOTS if cfg.batch_size == "auto" else cfg.batch_size, prompt_tokens))


def slot_length(max_prompt_tokens: int, max_new_tokens: int) -> int:
    """Positions per KV slot: room for the longest request, in rows aligned for the attention kernels.
    The last position is never read (a request's last token is not fed back): freed slots park there."""
    return -(-(max_prompt_tokens + max_new_tokens) // 16) * 16


def seconds_since_process_start() -> float | None:
    """How long this process has run (Linux): Python's start-up and imports, which every worker repeats."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in ticks since boot
    except (OSError, ValueError, IndexError):
        return None


def choose_procs(engine, requests: int, start_up_s: float | None) -> tuple[int, dict]:
    """procs=auto: 2 colocated workers when the time they would save (the generation, estimated from the
    engine's decode probe and JOB_SHARE_OF_PROBE, run COLOCATED_GAIN times faster) is more than `start_up_s`, what
    starting them costs (None: unknown, too much); else 1. Returns (procs, the reasons, for the manifest)."""
    if engine.device.type != "cuda" or not hasattr(engine, "probe"):
        return 1, {"procs": 1, "why": "workers gain only on a CUDA GPU, measured with engine.kind=continuous"}
    probe = engine.probe_tokens_per_s or engine.probe()
    tokens_per_s = probe[engine.cfg.batch_size]
    generation_s = requests * engine.cfg.max_new_tokens / (tokens_per_s * JOB_SHARE_OF_PROBE)
    saved_s = generation_s * (1 - 1 / COLOCATED_GAIN)
    procs = 2 if start_up_s is not None and saved_s > start_up_s else 1
    return procs, {"procs": procs, "decode_tokens_per_s": round(tokens_per_s), "estimated_generation_s": round(generation_s, 2),
                   "saved_by_2_workers_s": round(saved_s, 2), "worker_start_up_s": start_up_s and round(start_up_s, 2),
                   "assumed_gain": COLOCATED_GAIN}
