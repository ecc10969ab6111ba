"""Merges an array job's task directories: python -m jobs.merge dir=outputs/array-1234 (splitwiser/merge.py).

Exits with status 2 and one line on stderr when a task has not finished or a row is missing."""

import hydra
from omegaconf import DictConfig

from jobs import errors_in_one_line
from splitwiser.merge import merge_tasks


@hydra.main(version_base="1.3", config_path="../conf", config_name="merge")
@errors_in_one_line
def main(cfg: DictConfig) -> None:
    merge_tasks(cfg.dir)


if __name__ == "__main__":
    main()
