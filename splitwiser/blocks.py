"""The KV cache's blocks and who holds them (runner.KVPool is the memory, its block table the map).

KVBlocks gives each request the blocks its prompt needs as its prefill starts, one more as it reaches each next
block, and takes them back as it ends. With the prefix cache (engine.share_prefix) a block full of prompt tokens
stays cached after its requests end, keyed by its tokens and every token before them: a later prompt that starts
with the same tokens reads those blocks instead of computing them again (a shared instruction, a template's head,
few-shot examples), and a block no request holds is reused, least recently used first, once no free one is left.
"""

import hashlib
from collections import Counter
from itertools import islice

import numpy as np
import torch

from splitwiser.runner import BLOCK_TOKENS, KVPool


def needed(tokens: int) -> int:
    """The KV blocks that hold `tokens` positions."""
    return -(-tokens // BLOCK_TOKENS)


def block_keys(ids) -> list[bytes]:
    """A key per full block of `ids`: a digest of its tokens and of the key before it, so that two prompts share a
    block's key only where they share every token up to its end."""
    tokens = np.asarray(ids, dtype=np.int64)
    keys, key = [], b""
    for end in range(BLOCK_TOKENS, len(tokens) + 1, BLOCK_TOKENS):
        key = hashlib.blake2b(key + tokens[end - BLOCK_TOKENS:end].tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


class KVBlocks:
    """The KV blocks of a pool: free, held by requests (a cached block by every request that reads it: `refs`),
    or cached and held by none (`idle`, least recently used first). A slot's row of the block table points at the
    blocks its request holds, and otherwise at the spare block."""

    def __init__(self, kv: KVPool, cache: bool):
        self.kv, self.cache = kv, cache
        self.free = list(range(kv.spare))
        self.held: dict[int, list[int]] = {}  # slot → its blocks, cached ones first
        self.entries = np.zeros(kv.table.shape[0], dtype=np.int64)  # per slot: its table row's blocks
        self.refs: Counter[int] = Counter()  # cached block → the requests (or admissions) holding it
        self.cached: dict[bytes, int] = {}  # key → block
        self.key_of: dict[int, bytes] = {}  # block → key
        self.idle: dict[int, None] = {}  # cached blocks no request holds, least recently used first
        self.peak = 0  # the most blocks held at once
        self.evicted = 0  # cached blocks taken for other requests

    def available(self) -> int:
        """Blocks a request can take: the free ones and the cached ones no request holds."""
        return len(self.free) + len(self.idle)

    def take(self, count: int) -> list[int]:
        """`count` blocks (there must be as many available): free ones first, then the least recently used idle
        cached ones, which leave the cache."""
        for block in list(islice(self.idle, max(0, count - len(self.free)))):
            del self.idle[block], self.cached[self.key_of.pop(block)]
            self.free.append(block)
            self.evicted += 1
        cut = len(self.free) - count
        taken, self.free[cut:] = self.free[cut:], []
        self.peak = max(self.peak, self.kv.spare - self.available())
        return taken

    def forget(self) -> None:
        """Empties the cache of blocks no request holds."""
        for block in self.idle:
            del self.cached[self.key_of.pop(block)]
        self.free += self.idle
        self.idle = {}

    def match(self, keys: list[bytes], limit: int, known: int = 0) -> list[int]:
        """The cached blocks that follow the `known` first ones for the longest run of `keys` (at most `limit`),
        held from now on for the request that asked (drop lets go of them)."""
        found = []
        for key in keys[known:limit] if self.cache else ():
            if key not in self.cached:
                break
            found.append(self.cached[key])
        for block in found:
            self.idle.pop(block, None)
            self.refs[block] += 1
        return found

    def drop(self, blocks: list[int]) -> None:
        """Lets go of blocks: a cached one no request holds any more becomes idle (the most recently used), any
        other goes back to the free ones. The last blocks of a prompt go first, so its first ones stay longest."""
        for block in reversed(blocks):
            if block not in self.key_of:
                self.free.append(block)
                continue
            self.refs[block] -= 1
            if not self.refs[block]:
                del self.refs[block]
                self.idle[block] = None

    def give(self, slots: list[int], positions: list[int], cached: list[list[int]]) -> None:
        """Blocks for `positions` to each of `slots`, written into their rows of the table: the `cached` ones its
        request holds already (match), then blocks of its own."""
        counts = [needed(count) - len(blocks) for count, blocks in zip(positions, cached)]
        taken = iter(self.take(sum(counts)))
        rows = torch.full((len(slots), self.kv.table.shape[1]), self.kv.spare)
        for row, slot, count, blocks in zip(rows, slots, counts, cached):
            self.held[slot] = [*blocks, *(next(taken) for _ in range(count))]
            row[:len(self.held[slot])] = torch.tensor(self.held[slot])
            self.entries[slot] = len(self.held[slot])
        self.kv.table[torch.tensor(slots, device=self.kv.table.device)] = rows.to(self.kv.table.device)

    def remember(self, slot: int, keys: list[bytes]) -> None:
        """The prompt's full blocks, now computed into the slot's blocks (`keys`: theirs), join the cache; a block
        whose key another one caches already stays the slot's own."""
        for key, block in zip(keys, self.held[slot]) if self.cache else ():
            if key not in self.cached and block not in self.key_of:
                self.cached[key], self.key_of[block] = block, key
                self.refs[block] += 1

    def freed_by(self, slot: int) -> int:
        """The blocks that become available when the slot's request lets go of its own."""
        return sum(block not in self.key_of or self.refs[block] == 1 for block in self.held[slot])

    def extend(self, slots: list[int]) -> None:
        """One more block to each of `slots`, after the ones its table row has (there must be as many available)."""
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
            self.drop(self.held.pop(slot))
        self.entries[slots] = 0
        self.kv.table[torch.tensor(slots, device=self.kv.table.device)] = self.kv.spare
