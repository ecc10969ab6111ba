"""A job's progress on stderr: rows done, generated tokens/s, the time left.

On a terminal, a tqdm bar. Elsewhere (a SLURM log file, a pipe) every redraw of a bar would stay as a
line, and tqdm draws its final state twice: there, a plain line in the log every ~10 s, and one at the end.
"""

import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


def on_terminal() -> bool:
    """Whether stderr is a terminal that knows its width (tqdm draws the bar on one that reports 0 columns
    as blank lines)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):  # not a terminal, or stderr has no file descriptor
        return False


class Progress:
    """progress(rows, tokens) counts finished rows and their generated tokens, out of `total` rows.
    Shows nothing when not enabled or when there is nothing to do (total 0); else one final line, also when
    the job stops early (how far it got)."""

    def __init__(self, total: int, enabled: bool, every_s: float = 10.0):
        self.total, self.every_s = total, every_s
        self.enabled = enabled and total > 0
        self.rows = self.tokens = 0
        self.start = self.shown = time.perf_counter()
        self.bar = tqdm(total=total, unit="row", dynamic_ncols=True) if self.enabled and on_terminal() else None

    def __call__(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix_str(f"{self.tokens_per_s():,.0f} tok/s", refresh=False)
        elif self.enabled and self.rows and time.perf_counter() - self.shown >= self.every_s:
            self.shown = time.perf_counter()
            elapsed = self.shown - self.start
            log.info("%s, eta %s", self.summary(), tqdm.format_interval(elapsed * (self.total - self.rows) / self.rows))

    def tokens_per_s(self) -> float:
        return self.tokens / (time.perf_counter() - self.start)

    def summary(self) -> str:
        return f"rows {self.rows}/{self.total} ({100 * self.rows // self.total}%), {self.tokens_per_s():,.0f} tok/s"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            log.info("%s, in %s", self.summary(), tqdm.format_interval(time.perf_counter() - self.start))
