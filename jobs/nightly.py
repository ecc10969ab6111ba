"""The nightly job: python -m jobs.nightly [overrides] (splitwiser/nightly.py). Run it from cron,
scrontab or slurm/nightly.sbatch; a second run with nothing new does nothing."""

import logging
from datetime import date

import hydra
from omegaconf import DictConfig

from jobs import errors_in_one_line, set_up_job_process
from splitwiser.config import to_job_config

log = logging.getLogger("splitwiser")


@hydra.main(version_base="1.3", config_path="../conf", config_name="nightly")
@errors_in_one_line
def main(cfg: DictConfig) -> None:
    set_up_job_process(cfg)
    from splitwiser.nightly import nightly  # torch, transformers, datasets: after set_up_job_process

    manifests = nightly(to_job_config(cfg), date.today())
    for manifest in manifests:
        log.info("partition %s: %d rows ok, %d failed", manifest["config"]["output"]["dir"],
                 manifest["rows"]["ok"], manifest["rows"]["failed"])
    if not manifests:
        log.info("nothing new: no partition written")


if __name__ == "__main__":
    main()
