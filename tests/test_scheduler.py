"""The scheduler: a decode step is as wide as the bucket of how many requests run, not of the highest busy slot.
Slots is tested alone with a fake step (requests of random lengths, no model); then the engine with the real model:
requests moved between slots keep generate()'s tokens (greedy, fp32) and their sampled tokens."""

import random

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
        slots.running[slots.take()] = request(number)
    assert slots.width() == 32 and slots.compaction() == []  # 20 run: bucket 32
    for slot in range(20):
        if slot not in (3, 9, 17, 19):
            slots.release(slot)
            del slots.running[slot]
    assert slots.width() == 32
    by_request = {id(g): g.request.id for g in slots.running.values()}
    assert slots.compaction() == [(9, 0), (17, 1), (19, 2)]  # 4 run: bucket 8
    assert sorted(slots.running) == [0, 1, 2, 3] and slots.width() == 8
    assert {id(g): g.request.id for g in slots.running.values()} == by_request  # the same requests, moved
    assert slots.take() == 4 and 9 in slots.free and 19 in slots.free


@pytest.mark.parametrize("seed", range(5))
def test_a_fake_run_of_random_lengths_steps_at_the_bucket_of_the_running_requests(seed):
    """Requests of heavy-tailed lengths through admission, steps and compaction: every request runs to its length
    once, no slot holds two, and each step is as wide as the bucket of the requests running (with compaction),
    against the bucket of the highest busy slot (without): fewer slot-steps in all."""
    draw = random.Random(seed)
    lengths = [min(200, int(draw.lognormvariate(3, 1)) + 1) for _ in range(300)]
    slot_steps = {}
    for compact in (True, False):
        slots, left, done, waiting, steps = Slots(64), {}, {}, list(range(len(lengths))), 0
        while waiting or slots.running:
            while waiting and slots.free:
                number = waiting.pop(0)
                slot = slots.take()
                assert slot not in slots.running
                slots.running[slot], left[number] = request(number), lengths[number]
            moves = slots.compaction() if compact else []
            assert len({destination for _, destination in moves}) == len(moves)
            width = slots.width()
            if compact:
                assert width == min(64, decode_bucket(len(slots.running)))
            assert max(slots.running) < width
            steps += width
            for slot, generation in list(slots.running.items()):  # the fake step: one token each
                number = int(generation.request.id)
                left[number] -= 1
                if not left[number]:
                    done[number] = done.get(number, 0) + 1
                    del slots.running[slot]
                    slots.release(slot)
        assert done == {number: 1 for number in range(len(lengths))} and sorted(slots.free) == list(range(64))
        slot_steps[compact] = steps
    assert slot_steps[True] < slot_steps[False]


def requests_of_varied_lengths(tokenizer, count: int) -> list[Request]:
    """Prompts of 8-200 tokens whose answers end after 1 to 24 tokens, in no order: the long ones end up alone in
    high slots."""
    ids = prompts(tokenizer, lengths=(400,))[0]
    draw = random.Random(0)
    return [Request(id=str(n), prompt="", input_ids=ids[n:n + length], prompt_tokens=length,
                    max_new_tokens=draw.choice((1, 2, 3, 24)))
            for n, length in enumerate(draw.randint(8, 200) for _ in range(count))]


def test_requests_moved_down_keep_generates_tokens(default_model):
    requests = requests_of_varied_lengths(default_model.tokenizer, 40)
    cfg = EngineConfig(batch_size=16, max_new_tokens=24, prefill_tokens=512)
    engine = make_engine(default_model, cfg, slot_length(200, 24), len(requests))
    outputs = {g.request.id: g.token_ids for g in engine.run(requests)}
    assert engine.moved > 0
    for r in requests:
        assert outputs[r.id] == reference_generation(default_model.model, torch.tensor([r.input_ids]), r.max_new_tokens)


def test_sampled_tokens_do_not_depend_on_compaction(default_model):
    requests = requests_of_varied_lengths(default_model.tokenizer, 40)
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
