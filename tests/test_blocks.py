"""The KV blocks' bookkeeping alone (blocks.KVBlocks), without a model: the prefix cache's keys, what a request
holds, and which cached blocks give way when none is free."""

import torch

from splitwiser.blocks import KVBlocks, block_keys
from splitwiser.runner import BLOCK_TOKENS, KVPool

B = BLOCK_TOKENS


def pool(blocks: int, slots: int = 4) -> KVBlocks:
    """A pool of `blocks` blocks (and the spare) with tensors of one number per block: only the table is read."""
    cache = torch.zeros(blocks + 1, 1, B, 1)
    return KVBlocks(KVPool([cache], [cache], torch.full((slots, 8), blocks)), cache=True)


def test_keys_are_shared_exactly_as_far_as_the_tokens_are():
    first = list(range(3 * B + 5))
    other = [*first[:B + 3], -1, *first[B + 4:]]  # differs inside the second block
    assert len(block_keys(first)) == 3
    assert block_keys(other)[0] == block_keys(first)[0]
    assert block_keys(other)[1:] != block_keys(first)[1:] and block_keys(other)[2] != block_keys(first)[2]
    assert block_keys([*first[B:2 * B], *first[:B]])[1] != block_keys(first)[1]  # a block's place in the prompt counts


def remembered(blocks: KVBlocks, slot: int, ids: list[int]) -> list[bytes]:
    """A request on `slot` whose prefill computed `ids` (with what the cache held), as the engine does."""
    keys = block_keys(ids)
    cached = blocks.match(keys, (len(ids) - 1) // B)
    blocks.give([slot], [len(ids) + 1], [cached])
    blocks.remember(slot, keys)
    return keys


def test_a_later_prompt_reads_the_cached_blocks_and_they_outlive_their_requests():
    blocks = pool(10)
    header = list(range(2 * B))
    keys = remembered(blocks, 0, [*header, 7, 8])
    first_blocks = blocks.held[0][:2]
    assert blocks.match(keys, 2) == first_blocks  # held now for a second request, as an admission does
    blocks.drop(first_blocks)
    blocks.take_back([0])
    assert blocks.available() == 10 and sorted(blocks.idle) == sorted(first_blocks)  # cached, held by none
    remembered(blocks, 1, [*header, 9])
    assert blocks.held[1][:2] == first_blocks and not blocks.idle
    assert blocks.freed_by(1) == 3  # its own last block and the cached ones that it alone holds
    assert blocks.take_back([1]) is None and blocks.available() == 10


def test_idle_cached_blocks_give_way_least_recently_used_first_and_held_ones_never():
    blocks = pool(9)
    for slot, base in enumerate((0, 1000, 2000)):  # three prompts of two full blocks each (+1 token)
        remembered(blocks, slot, list(range(base, base + 2 * B + 1)))
    assert blocks.available() == 0
    blocks.take_back([0])  # its two cached blocks idle; its third (own) free
    blocks.take_back([2])
    assert len(blocks.free) == 2 and len(blocks.idle) == 4
    taken = blocks.take(4)
    # slot 0's went first: the least recently used
    assert blocks.evicted == 2 and len(blocks.idle) == 2 and not blocks.match(block_keys(range(2 * B + 1)), 2)
    assert blocks.match(block_keys(range(2000, 2000 + 2 * B + 1)), 2) != []
    assert not set(taken) & set(blocks.held[1])
