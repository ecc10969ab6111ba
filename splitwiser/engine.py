"""Greedy generation for a batch of tokenized prompts, with per-request timing.

One call: token-id lists in, `Generation`s out (as vLLM's `LLM.generate`). This engine runs
transformers' `generate` (left padding, KV cache, greedy), so its outputs are the reference by
construction; a hook on the streamer interface timestamps every decode step.
"""

import time
from dataclasses import dataclass

import torch

from splitwiser.config import EngineConfig
from splitwiser.models import LoadedModel


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, EOS included when the model stopped
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)
    prefill_start_ns: int  # time.perf_counter_ns() clock
    first_token_ns: int
    finish_ns: int


class StepClock:
    """Streamer that records when each decode step's tokens exist (generate puts the prompt first)."""

    def __init__(self) -> None:
        self.step_ns: list[int] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self.seen_prompt:
            self.step_ns.append(time.perf_counter_ns())
        self.seen_prompt = True

    def end(self) -> None:
        pass


class Engine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.cfg = cfg
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> list[Generation]:
        batch = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(self.device)
        clock = StepClock()
        start = time.perf_counter_ns()
        output = self.model.generate(
            **batch,
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=None if self.cfg.ignore_eos else sorted(self.eos_ids),
            streamer=clock,
        )
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        return [self._finish(tokens, start, clock.step_ns) for tokens in new_tokens]

    def _finish(self, tokens: list[int], start_ns: int, step_ns: list[int]) -> Generation:
        """Cuts a row after its first EOS (generate pads finished rows) and reads its times."""
        length, reason = len(tokens), "length"
        if not self.cfg.ignore_eos:
            stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            if stop is not None:
                length, reason = stop + 1, "stop"
        return Generation(tokens[:length], reason, start_ns, step_ns[0], step_ns[length - 1])
