"""Scores a finished job's outputs against their references: python -m jobs.score output.dir=DIR (splitwiser/score.py).

Prints the means; exits with status 2 and one line on stderr when DIR holds no finished job's outputs."""

from omegaconf import DictConfig

from jobs import command, cpu_threads
from splitwiser.score import describe, score_dir


@command("score")
def main(cfg: DictConfig) -> None:
    manifest = score_dir(cfg.output.dir, processes=cpu_threads(None)[0])
    print(f"{cfg.output.dir}: {describe(manifest['quality'])}")


if __name__ == "__main__":
    main()
