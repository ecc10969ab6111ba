"""The job: python -m jobs.run [Hydra overrides], e.g. model=opt125m data.limit=100 engine.batch_size=32."""

import logging

from jobs import command
from splitwiser.config import JobConfig

log = logging.getLogger("splitwiser")


@command("config", job=True)
def main(job: JobConfig) -> None:
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


def clock(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f} s"


if __name__ == "__main__":
    main()
