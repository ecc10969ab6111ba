"""The current summary of each id of a nightly root: python -m jobs.latest dir=ROOT [out=FILE] (splitwiser/nightly.py).

Writes FILE (default ROOT/latest.parquet): each id's generation from the latest partition that generated it, with
its `partition`. Exits with status 2 and one line on stderr when ROOT is no nightly root."""

from omegaconf import DictConfig

from jobs import command
from splitwiser.nightly import latest


@command("latest")
def main(cfg: DictConfig) -> None:
    written = latest(cfg.dir, cfg.out)
    print(f"{written['path']}: {written['ids']} ids, each from the latest of {written['partitions']} partitions "
          "that generated it")


if __name__ == "__main__":
    main()
