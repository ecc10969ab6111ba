"""The job: python -m jobs.run [Hydra overrides], e.g. model=opt125m data.limit=100 engine.batch_size=32."""

import logging

import hydra
from omegaconf import DictConfig

from jobs import errors_in_one_line, set_up_job_process
from splitwiser.config import to_job_config

log = logging.getLogger("splitwiser")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@errors_in_one_line
def main(cfg: DictConfig) -> None:
    set_up_job_process(cfg)
    from splitwiser.job import run  # torch, transformers, datasets: after set_up_job_process

    manifest = run(to_job_config(cfg))
    last = manifest["runs"][-1]
    log.info("done: %d rows ok, %d failed, %d generated this run at %s tokens/s; wrote %s",
             manifest["rows"]["ok"], manifest["rows"]["failed"], last["rows_generated"],
             last["generated_tokens_per_s"], manifest["config"]["output"]["dir"])


if __name__ == "__main__":
    main()
