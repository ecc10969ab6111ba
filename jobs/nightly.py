"""The nightly job: python -m jobs.nightly [overrides] (splitwiser/nightly.py). Run it from cron,
scrontab or slurm/nightly.sbatch; a second run with nothing new does nothing."""

import logging
from datetime import date

from jobs import command
from splitwiser.config import JobConfig

log = logging.getLogger("splitwiser")


@command("nightly", job=True)
def main(job: JobConfig) -> None:
    from splitwiser.nightly import nightly  # torch, transformers, datasets: after set_up_job_process (jobs/__init__.py)
    from splitwiser.score import describe

    manifests = nightly(job, date.today())
    for manifest in manifests:
        log.info("partition %s: %d rows ok, %d failed", manifest["config"]["output"]["dir"],
                 manifest["rows"]["ok"], manifest["rows"]["failed"])
        if "quality" in manifest:
            log.info("partition %s quality: %s", manifest["config"]["output"]["dir"], describe(manifest["quality"]))
    if not manifests:
        log.info("nothing new: no partition written")


if __name__ == "__main__":
    main()
