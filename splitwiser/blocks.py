"""The KV cache's blocks and who holds them (runner.KVPool is the memory, its block table the map).

FreeBlocks gives each request the blocks its prompt needs as its prefill starts, one more as it reaches each next
block, and takes them back as it ends; SharedPrefix is the tokens the run's prompts start with, prefilled once into
blocks that every request starting with them reads (engine.share_prefix).
"""

from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch

from splitwiser.request import Request
from splitwiser.runner import BLOCK_TOKENS, KVPool


class FreeBlocks:
    """The KV blocks of a pool that no request holds. A request takes the blocks of its prompt as its prefill starts,
    one more each time its next position starts a new block (extend), and gives them all back as it ends; its
    slot's row of the block table points at them, and otherwise at the spare block."""

    def __init__(self, kv: KVPool):
        self.kv = kv
        self.free = list(range(kv.spare))
        self.held: dict[int, list[int]] = {}  # slot → its blocks
        self.entries = np.zeros(kv.table.shape[0], dtype=np.int64)  # per slot: its table row's blocks, shared ones too
        self.peak = 0  # the most blocks held at once

    @staticmethod
    def needed(tokens: int) -> int:
        return -(-tokens // BLOCK_TOKENS)

    def take(self, count: int) -> list[int]:
        cut = len(self.free) - count
        taken, self.free[cut:] = self.free[cut:], []
        self.peak = max(self.peak, self.kv.spare - len(self.free))
        return taken

    def give(self, slots: list[int], tokens: list[int], shared: list[int] = ()) -> None:
        """Blocks for `tokens` positions to each of `slots`, written into their rows of the table; the first
        positions' blocks are `shared` ones (a prefix every slot reads), held by none of them."""
        counts = [self.needed(count) - len(shared) for count in tokens]
        taken = self.take(sum(counts))
        rows = torch.full((len(slots), self.kv.table.shape[1]), self.kv.spare)
        rows[:, :len(shared)] = torch.tensor(shared, dtype=torch.long)
        own = torch.arange(rows.shape[1]) - len(shared)
        rows[(own >= 0) & (own < torch.tensor(counts)[:, None])] = torch.tensor(taken)  # row by row
        for slot, count, end in zip(slots, counts, accumulate(counts)):
            self.held[slot] = taken[end - count:end]
            self.entries[slot] = len(shared) + count
        self.kv.table[torch.tensor(slots, device=self.kv.table.device)] = rows.to(self.kv.table.device)

    def extend(self, slots: list[int]) -> None:
        """One more block to each of `slots`, after the ones its table row has (there must be as many free)."""
        taken = self.take(len(slots))
        for slot, block in zip(slots, taken):
            self.held[slot].append(block)
        device = self.kv.table.device
        self.kv.table[torch.tensor(slots, device=device), torch.from_numpy(self.entries[slots]).to(device)] = \
            torch.tensor(taken, device=device)
        self.entries[slots] += 1

    def move(self, moves: list[tuple[int, int]]) -> None:
        """Requests moved from slot to slot (Slots.compaction): their blocks and table rows go with them."""
        sources, destinations = (torch.tensor(slots, device=self.kv.table.device) for slots in zip(*moves))
        self.kv.table[destinations] = self.kv.table[sources]
        self.kv.table[sources] = self.kv.spare
        for source, destination in moves:
            self.held[destination] = self.held.pop(source)
            self.entries[destination], self.entries[source] = self.entries[source], 0

    def take_back(self, slots: list[int]) -> None:
        for slot in slots:
            self.free += self.held.pop(slot)
        self.entries[slots] = 0
        self.kv.table[torch.tensor(slots, device=self.kv.table.device)] = self.kv.spare


@dataclass
class SharedPrefix:
    """The tokens the run's prompts start with (engine.share_prefix: a system instruction, a template's head),
    prefilled once into blocks that every request starting with them reads."""
    tokens: list[int]
    blocks: list[int]

    def serves(self, request: Request) -> bool:
        return request.prompt_tokens > len(self.tokens) and list(request.input_ids[:len(self.tokens)]) == self.tokens


def common_prefix(requests: list[Request]) -> list[int]:
    """The tokens all `requests` start with, in whole KV blocks, leaving each at least one token of its own."""
    first = list(requests[0].input_ids)
    length = min(r.prompt_tokens for r in requests) - 1
    for request in requests[1:]:
        ids = request.input_ids
        length = next((i for i in range(length) if ids[i] != first[i]), length)
    return first[:length // BLOCK_TOKENS * BLOCK_TOKENS]
