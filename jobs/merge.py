"""Merges an array job's task directories: python -m jobs.merge dir=outputs/array-1234 (splitwiser/merge.py).

Exits with status 2 and one line on stderr when a task has not finished or a row is missing."""

from omegaconf import DictConfig

from jobs import command, cpu_threads
from splitwiser.merge import merge_tasks


@command("merge")
def main(cfg: DictConfig) -> None:
    merge_tasks(cfg.dir, processes=cpu_threads(None)[0])


if __name__ == "__main__":
    main()
