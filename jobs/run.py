"""The job: python -m jobs.run [Hydra overrides], e.g. model=opt125m data.limit=100 engine.batch_size=32.
With dry_run=true: the estimate as one JSON line on stdout, in words on stderr; nothing generated or written."""

import json
import logging

from jobs import command
from splitwiser.config import JobConfig

log = logging.getLogger("splitwiser")


@command("config", job=True)
def main(job: JobConfig) -> None:
    if job.dry_run:
        return dry_run(job)
    from splitwiser.job import run  # torch, transformers, datasets: after set_up_job_process (jobs/__init__.py)
    from splitwiser.plan import seconds_since_process_start
    from splitwiser.score import describe

    manifest = run(job, from_launch=True)
    last = manifest["runs"][-1]
    log.info("done: %d rows ok, %d failed, %d generated this run at %s tokens/s; wrote %s; %s from launch",
             manifest["rows"]["ok"], manifest["rows"]["failed"], last["rows_generated"],
             last["generated_tokens_per_s"], manifest["config"]["output"]["dir"], clock(seconds_since_process_start()))
    if "quality" in manifest:
        log.info("quality: %s", describe(manifest["quality"]))


def dry_run(job: JobConfig) -> None:
    from splitwiser.job import estimate

    figures = estimate(job)
    timed = (f"at most {clock(figures['generate_s_at_most_tokens'])} to generate at {figures['decode_tokens_per_s']} "
             f"tokens/s (batch {figures['batch_size']}, {figures['device']})") if figures["decode_tokens_per_s"] else \
        "no decode rate to estimate from (engine.kind=generate)"
    log.info("dry run: %d rows, %d to generate (%d reused, %d set aside as errors), %d prompt tokens, at most %d new tokens: %s",
             figures["rows"], figures["requests"], figures["reused"], figures["errors"], figures["prompt_tokens"],
             figures["max_new_tokens"], timed)
    print(json.dumps(figures))


def clock(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f} s"


if __name__ == "__main__":
    main()
