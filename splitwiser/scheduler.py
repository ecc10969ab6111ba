"""Which slot each running request holds, how wide the decode step must be, and whom to preempt.

A decode step computes slots 0..width-1 (one CUDA graph per width: powers of two from 8), so its cost follows the
highest busy slot, not how many requests run. Slots hands out the lowest free slot first, and `compaction` says
which running requests to move down once the running batch has shrunk, so that the step is as wide as the bucket
of how many requests run: a job's tail (a few long answers left) runs at small-batch speed. Moving a request is
moving its per-slot state and its block-table row (ContinuousEngine._move); its KV stays in its blocks.

Slots also mirrors on the host where each running request's next decode step writes its KV (`position`), so that
`growth` says which requests reach a new KV block before a step (blocks on demand, blocks.FreeBlocks.extend) without
asking the device, and, where too few blocks are free, which to preempt: the newest first (vLLM's order), so that
the oldest, furthest along, finish. A preempted request waits first in line and is prefilled again with the tokens
it had (recomputed, as vLLM does by default: no copy of its KV is kept).
"""

import heapq
from collections.abc import Callable, Iterable

import numpy as np

from splitwiser.request import Generation


def decode_bucket(needed: int) -> int:
    """Decode batch sizes come in powers of two from 8 (one CUDA graph each)."""
    return max(8, 1 << (needed - 1).bit_length())


def decode_width(running: Iterable[int], count: int) -> int:
    """The decode step's batch for the `running` slots: the bucket of the highest, at most the slot count."""
    return min(count, decode_bucket(max(running) + 1))


class Slots:
    """The free slots (a heap: the lowest first), the running requests (slot → its generation so far), and per slot
    the position its next decode step writes and when its request (re)started."""

    def __init__(self, count: int):
        self.count = count
        self.free = list(range(count))
        self.running: dict[int, Generation] = {}
        self.busy = np.zeros(count, dtype=bool)
        self.position = np.zeros(count, dtype=np.int64)
        self.started = np.zeros(count, dtype=np.int64)
        self.starts = 0

    def take(self) -> int:
        return heapq.heappop(self.free)

    def start(self, slot: int, generation: Generation, position: int) -> None:
        """A taken slot's request runs: its next decode step writes at `position`."""
        self.running[slot] = generation
        self.busy[slot], self.position[slot], self.started[slot] = True, position, self.starts
        self.starts += 1

    def release(self, slot: int) -> None:
        """A slot is free again (its request left `running`: finished, preempted, or never started)."""
        self.busy[slot] = False
        heapq.heappush(self.free, slot)

    def advance(self) -> None:
        """After a decode step: every running request's next position is one further."""
        self.position[self.busy] += 1

    def growth(self, capacity: np.ndarray, free_blocks: int, blocks_of: Callable[[int], int]) -> tuple[list, list]:
        """KV blocks on demand, before a decode step → (the running requests whose next position is past their
        blocks: one more block each, the oldest first; the requests to preempt for them, the newest first, where too
        few blocks are free). capacity: the positions each slot's blocks hold; blocks_of(slot): the blocks a
        preempted request gives back."""
        reaching = np.flatnonzero(self.busy & (self.position >= capacity)).tolist()
        newest_first = sorted(self.running, key=lambda slot: self.started[slot], reverse=True)
        growing, preempted = [], []
        for slot in sorted(reaching, key=lambda slot: self.started[slot]):
            while slot not in preempted and free_blocks <= len(growing):
                victim = newest_first.pop(0)
                preempted.append(victim)
                free_blocks += blocks_of(victim)
                growing = [other for other in growing if other != victim]
            if slot not in preempted:
                growing.append(slot)
        return growing, preempted

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
            for state in (self.busy, self.position, self.started):
                state[destination] = state[source]
            self.release(source)
        return moves
