"""Which slot each running request holds, and how wide the decode step must be to run them all.

A decode step computes slots 0..width-1 (one CUDA graph per width: powers of two from 8), so its cost follows the
highest busy slot, not how many requests run. Slots hands out the lowest free slot first, and `compaction` says
which running requests to move down once the running batch has shrunk, so that the step is as wide as the bucket
of how many requests run: a job's tail (a few long answers left) runs at small-batch speed. Moving a request is
moving its per-slot state and its block-table row (the engine's ContinuousEngine._move); its KV stays in its blocks.
"""

import heapq
from collections.abc import Iterable

from splitwiser.request import Generation


def decode_bucket(needed: int) -> int:
    """Decode batch sizes come in powers of two from 8 (one CUDA graph each)."""
    return max(8, 1 << (needed - 1).bit_length())


def decode_width(running: Iterable[int], count: int) -> int:
    """The decode step's batch for the `running` slots: the bucket of the highest, at most the slot count."""
    return min(count, decode_bucket(max(running) + 1))


class Slots:
    """The free slots (a heap: the lowest first) and the running requests (slot → its generation so far)."""

    def __init__(self, count: int):
        self.count = count
        self.free = list(range(count))
        self.running: dict[int, Generation] = {}

    def take(self) -> int:
        return heapq.heappop(self.free)

    def release(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    def width(self) -> int:
        return decode_width(self.running, self.count)

    def compaction(self) -> list[tuple[int, int]]:
        """Moves (from, to) that bring every running request below the bucket of how many run, into the lowest free
        slots; the bookkeeping here follows them. None while they already are (most steps)."""
        target = min(self.count, decode_bucket(len(self.running)))
        high = sorted(slot for slot in self.running if slot >= target)
        moves = [(slot, self.take()) for slot in high]  # at least len(high) slots below target are free
        for source, destination in moves:
            self.running[destination] = self.running.pop(source)
            self.release(source)
        return moves
