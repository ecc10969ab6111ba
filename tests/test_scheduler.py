"""The scheduler: a decode step is as wide as the bucket of how many requests run, not of the highest busy slot.
Slots is tested alone with a fake step (requests of random lengths, no model); then the engine with the real model:
requests moved between slots keep generate()'s tokens (greedy, fp32) and their sampled tokens."""

import re
import random

import numpy as np
import pytest
import torch

from splitwiser.config import EngineConfig, SamplingConfig
from splitwiser.engine import Choice, make_engine
from splitwiser.plan import slot_length
from splitwiser.request import Generation, Request
from splitwiser.scheduler import Slots, decode_bucket
from test_families import prompts
from test_job import reference_generation


def request(number: int) -> Generation:
    return Generation(Request(id=str(number), prompt="", input_ids=[1], prompt_tokens=1))


def test_compaction_moves_the_requests_above_the_bucket_of_how_many_run_into_the_lowest_free_slots():
    slots = Slots(32)
    for number in range(20):
        slots.start(slots.take(), request(number), position=100 + number)
    assert slots.width() == 32 and slots.compaction() == []  # 20 run: bucket 32
    for slot in range(20):
        if slot not in (3, 9, 17, 19):
            del slots.running[slot]
            slots.release(slot)
    assert slots.width() == 32
    by_request = {id(g): g.request.id for g in slots.running.values()}
    assert slots.compaction() == [(9, 0), (17, 1), (19, 2)]  # 4 run: bucket 8
    assert sorted(slots.running) == [0, 1, 2, 3] and slots.width() == 8
    assert {id(g): g.request.id for g in slots.running.values()} == by_request  # the same requests, moved
    assert slots.position[:4].tolist() == [109, 117, 119, 103] and slots.busy.sum() == 4  # their positions with them
    assert slots.take() == 4 and 9 in slots.free and 19 in slots.free


def test_growth_gives_blocks_to_the_oldest_and_preempts_the_newest():
    slots = Slots(8)
    for number in range(4):
        slots.start(slots.take(), request(number), position=16)  # each next writes position 16: its second block
    capacity = np.array([16, 16, 32, 16, 0, 0, 0, 0])  # slot 2 has its second block already
    assert slots.growth(capacity, 3, lambda slot: 1) == ([0, 1, 3], [])
    assert slots.growth(capacity, 2, lambda slot: 1) == ([0, 1], [3])  # the newest gives its block back
    assert slots.growth(capacity, 1, lambda slot: 0) == ([0], [3, 2, 1])  # none gave a block back: down to itself
    assert slots.growth(capacity, 0, lambda slot: 0) == ([], [3, 2, 1, 0])  # nothing freed: all of them


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("blocks", [None, 40])
def test_a_fake_run_of_random_lengths(seed, blocks):
    """Requests of heavy-tailed lengths through admission, blocks on demand (4 positions each), preemption and
    compaction, with a fake step (one token each): every request runs to its length once, never without a block for
    its next position, no slot holds two, a preempted one goes on from where it was, and each step is as wide as the
    bucket of the requests running (with compaction) — fewer slot-steps in all than without."""
    draw = random.Random(seed)
    lengths = [min(60, int(draw.lognormvariate(2.5, 1)) + 1) for _ in range(300)]
    slot_steps = {}
    for compact in (True, False):
        slots, done, waiting, steps, preempted = Slots(64), {}, list(range(len(lengths))), 0, 0
        held = np.zeros(64, dtype=np.int64)  # each slot's blocks
        generated = {}  # request → its tokens so far
        while waiting or slots.running:
            # admitted with the blocks of the positions so far and the next, while one is left for each running
            while waiting and slots.free and (blocks is None or held.sum() + generated.get(waiting[0], 0) // 4 + 1
                                              + len(slots.running) < blocks):
                number = waiting.pop(0)
                slot = slots.take()
                slots.start(slot, request(number), position=generated.get(number, 0))
                held[slot] = generated.get(number, 0) // 4 + 1
            if blocks is not None:
                growing, victims = slots.growth(4 * held, blocks - held.sum(), lambda slot: held[slot])
                for victim in victims:
                    waiting.insert(0, int(slots.running.pop(victim).request.id))
                    held[victim] = 0
                    slots.release(victim)
                    preempted += 1
                held[growing] += 1
                assert held.sum() <= blocks
            moves = slots.compaction() if compact else []
            for source, destination in moves:
                held[destination], held[source] = held[source], 0
            width = slots.width()
            if compact:
                assert width == min(64, decode_bucket(len(slots.running)))
            assert max(slots.running) < width and all(slots.position[slot] < 4 * held[slot] or blocks is None
                                                      for slot in slots.running)
            steps += width
            slots.advance()
            for slot, generation in list(slots.running.items()):
                number = int(generation.request.id)
                generated[number] = slots.position[slot]
                if generated[number] == lengths[number]:
                    done[number] = done.get(number, 0) + 1
                    del slots.running[slot]
                    held[slot] = 0
                    slots.release(slot)
        assert done == {number: 1 for number in range(len(lengths))} and sorted(slots.free) == list(range(64))
        assert (preempted > 0) == (blocks is not None)
        slot_steps[compact] = steps
    assert slot_steps[True] < slot_steps[False]


def requests_of_varied_lengths(tokenizer, count: int, answers=(1, 2, 3, 24),
                               longest_prompt: int = 200) -> list[Request]:
    """Prompts of 8 to longest_prompt tokens whose answers end after one of `answers` tokens, in no order: the long
    ones end up alone in high slots."""
    ids = prompts(tokenizer, lengths=(400,))[0]
    draw = random.Random(0)
    return [Request(id=str(n), prompt="", input_ids=ids[n:n + length], prompt_tokens=length,
                    max_new_tokens=draw.choice(answers))
            for n, length in enumerate(draw.randint(8, longest_prompt) for _ in range(count))]


def test_requests_moved_down_keep_generates_tokens(default_model):
    requests = requests_of_varied_lengths(default_model.tokenizer, 24)
    cfg = EngineConfig(batch_size=16, max_new_tokens=24, prefill_tokens=512)
    engine = make_engine(default_model, cfg, slot_length(200, 24), len(requests))
    outputs = {g.request.id: g.token_ids for g in engine.run(requests)}
    assert engine.moved > 0
    for r in requests:
        assert outputs[r.id] == reference_generation(default_model.model, torch.tensor([r.input_ids]), r.max_new_tokens)


def test_sampled_tokens_do_not_depend_on_compaction(default_model):
    requests = requests_of_varied_lengths(default_model.tokenizer, 24)
    choice = Choice(SamplingConfig(temperature=0.8, top_p=0.9, repetition_penalty=1.2, logprobs=True), True)
    outputs = {}
    for compact in (True, False):
        cfg = EngineConfig(batch_size=16, max_new_tokens=24, prefill_tokens=512, compact=compact)
        engine = make_engine(default_model, cfg, slot_length(200, 24), len(requests), choice)
        outputs[compact] = {g.request.id: (g.token_ids, g.logprobs) for g in engine.run(requests)}
        assert (engine.moved > 0) == compact
    assert outputs[True].keys() == {r.id for r in requests}
    for key, (tokens, logprobs) in outputs[True].items():
        assert tokens == outputs[False][key][0] and logprobs == pytest.approx(outputs[False][key][1], abs=1e-4)


def test_requests_preempted_for_want_of_kv_blocks_keep_their_tokens(default_model):
    """KV blocks on demand: a request starts with its prompt's blocks and takes one more as it reaches it. With a
    KV cache of 80 positions (the longest request's) for 8 slots, the running requests outgrow it:
    the newest are preempted, prefilled again with the tokens they had, and end as generate() ends them."""
    requests = requests_of_varied_lengths(default_model.tokenizer, 6, answers=(32,), longest_prompt=40)
    cfg = EngineConfig(batch_size=8, max_new_tokens=32, prefill_tokens=512, kv_tokens=80)
    engine = make_engine(default_model, cfg, slot_length(40, 32), len(requests))
    outputs = {g.request.id: g.token_ids for g in engine.run(requests)}
    assert engine.preempted > 0 and engine.kv_peak_tokens <= engine.kv_tokens
    for r in requests:
        assert outputs[r.id] == reference_generation(default_model.model, torch.tensor([r.input_ids]), r.max_new_tokens)


def test_requests_that_all_end_on_the_step_landed_to_preempt_end_the_run_cleanly(default_model):
    """Two 8-token prompts, 25 tokens each, 64 KV positions (4 blocks): as their next position (32) needs a third
    block each, none is free, and the step in flight, landed before preempting, ends both (found at the 70B shape
    with 1,024 slots: the engine then decoded an empty batch)."""
    ids = prompts(default_model.tokenizer, lengths=(400,))[0]
    requests = [Request(id=str(n), prompt="", input_ids=ids[n:n + 8], prompt_tokens=8, max_new_tokens=25)
                for n in range(2)]
    cfg = EngineConfig(batch_size=2, max_new_tokens=25, prefill_tokens=512, kv_tokens=64, ignore_eos=True)
    engine = make_engine(default_model, cfg, slot_length(8, 25), len(requests))
    outputs = {g.request.id: g.token_ids for g in engine.run(requests)}
    assert engine.kv_tokens == 64 and engine.preempted == 0
    for r in requests:  # generate stops at EOS, if the model gives it; the engine was told to go on
        reference = reference_generation(default_model.model, torch.tensor([r.input_ids]), 25)
        assert len(outputs[r.id]) == 25 and outputs[r.id][:len(reference)] == reference


def test_preempted_requests_sample_as_if_never_preempted(default_model):
    """Sampled with a repetition penalty, logprobs and a constraint (sampling.regex): a request preempted and started
    again draws the same tokens (its sampling key, step count and grammar state go with it) and the same
    log-probabilities."""
    requests = requests_of_varied_lengths(default_model.tokenizer, 6, answers=(32,), longest_prompt=40)
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, repetition_penalty=1.2, logprobs=True, regex="[a-z ,.]+")
    choice = Choice(sampling, sampled=True, constrained=True)
    outputs, preempted = {}, {}
    for kv_tokens in ("auto", 80):
        cfg = EngineConfig(batch_size=8, max_new_tokens=32, prefill_tokens=512, kv_tokens=kv_tokens)
        engine = make_engine(default_model, cfg, slot_length(40, 32), len(requests), choice)
        outputs[kv_tokens] = {g.request.id: (g.token_ids, g.logprobs) for g in engine.run(requests)}
        preempted[kv_tokens] = engine.preempted
    assert preempted == {"auto": 0, 80: preempted[80]} and preempted[80] > 0
    for key, (tokens, logprobs) in outputs["auto"].items():
        assert tokens == outputs[80][key][0] and logprobs == pytest.approx(outputs[80][key][1], abs=1e-4)
        assert re.fullmatch("[a-z ,.]+", default_model.tokenizer.decode(tokens, skip_special_tokens=True)), tokens
