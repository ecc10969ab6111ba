"""Constrained answers: text that matches a JSON schema, a regular expression or one of a list of strings
(sampling.json_schema, sampling.regex, sampling.choice for the whole job; data.json_schema_column per row), with
llguidance (the grammar library vLLM and SGLang offer).

A constrained request has a grammar (llguidance's grammar text, compiled from the schema, the regex or the choices).
Before each of its tokens is sampled, its matcher (the grammar's state after the tokens so far) says which tokens may
come next, as a bitmask; the others' logits become -inf, so greedy and sampled choices both stay inside the grammar.
Once the grammar is complete only EOS may follow: the answer ends there. An answer that ends before (at its
max_new_tokens, or at a stop string) is incomplete: an error, never a half-done value.
"""

import functools
import json
import os
from pathlib import Path

import llguidance
import llguidance.hf
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch's bit expansion
    triton = None

from splitwiser.errors import UserError


def json_schema(schema: str, setting: str) -> dict:
    """A JSON schema given as JSON text, or as the path of a .json file holding it. Raises UserError naming `setting`
    where it is neither."""
    text = schema if schema.lstrip().startswith("{") else _read(Path(schema), setting)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{setting}: the schema is not valid JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{setting}: a JSON schema is an object ({{...}}), not {type(parsed).__name__}")
    return parsed


def from_json_schema(schema: str, setting: str) -> str:
    """The grammar of a JSON schema (json_schema's text or path). Raises UserError naming `setting` where llguidance
    cannot compile it."""
    return _compiled_schema(json.dumps(json_schema(schema, setting), sort_keys=True), setting)


@functools.lru_cache(maxsize=1024)  # by the schema itself: a file may change under its path between two jobs
def _compiled_schema(schema: str, setting: str) -> str:
    # Compact JSON, no whitespace between its tokens: a model given free whitespace may spend its tokens on newlines
    compact = {"whitespace_flexible": False}
    return _checked(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=compact), setting)


@functools.lru_cache(maxsize=16)
def from_regex(regex: str, setting: str = "sampling.regex") -> str:
    return _checked(llguidance.LLMatcher.grammar_from_regex(regex), setting)


@functools.lru_cache(maxsize=16)
def from_choice(options: tuple[str, ...], setting: str = "sampling.choice") -> str:
    """The grammar of exactly one of the options."""
    lark = "start: " + " | ".join(json.dumps(option, ensure_ascii=False) for option in options)
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark), setting)


def _read(path: Path, setting: str) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise UserError(f"{setting}={path}: neither a JSON schema ({{...}}) nor a readable file ({e.strerror})") from None


def _checked(grammar: str, setting: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise UserError(f"{setting}: llguidance cannot compile it: {' '.join(error.split())}")
    return grammar


def after_thinking(grammar: str, end: int) -> str:
    """The grammar of any tokens but `end` (a reasoning model's thinking), then `end`, then whitespace and an answer
    that `grammar` matches: the constraint of prompt.thinking=true (reasoning.py)."""
    answer = json.loads(grammar) if grammar.lstrip().startswith("{") else {"grammars": [{"lark_grammar": grammar}]}
    first = answer["grammars"][0]
    first["name"] = first.get("name") or "answer"
    thinking = {"lark_grammar": f"start: <[^{end}]>* <[{end}]> /[ \\n]*/ @{first['name']}"}
    return json.dumps({**answer, "grammars": [thinking, *answer["grammars"]]})


class Grammars:
    """A model's matchers: one per constrained request, on its tokenizer and vocabulary, and their token masks.
    `default`: the job's grammar (of sampling.json_schema, regex or choice), for a request without its own.
    `thinking_end`: a reasoning model's `</think>` token (prompt.thinking=true): grammars apply after it."""

    def __init__(self, tokenizer, eos_ids: set[int], vocab: int, default: str | None, thinking_end: int | None = None):
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=sorted(eos_ids))
        self.vocab, self.default, self.thinking_end = vocab, default, thinking_end
        # More threads made 512 masks slower on the H200 machine's 16 cores (bench/NOTES.md, run 29)
        self.executor = llguidance.LLExecutor(min(4, os.cpu_count() or 1))
        self._fresh: dict[str, llguidance.LLMatcher] = {}  # grammar → its matcher before any token (compiled once)
        self.pending: dict[int, tuple[llguidance.LLMatcher, int]] = {}  # id(matcher) → (it, the token it takes next)

    def of(self, request, tokens: list[int] = ()) -> llguidance.LLMatcher | None:
        """The matcher of a request's grammar (its own, or the job's) after `tokens`, its tokens so far (None: the
        request is unconstrained)."""
        grammar = request.grammar or self.default
        return grammar and self.matcher(grammar, tokens)

    def matcher(self, grammar: str, tokens: list[int] = ()) -> llguidance.LLMatcher:
        """A new matcher of the grammar, after `tokens`."""
        if grammar not in self._fresh:
            whole = grammar if self.thinking_end is None else after_thinking(grammar, self.thinking_end)
            self._fresh[grammar] = llguidance.LLMatcher(self.tokenizer, whole)
        matcher = self._fresh[grammar].deep_copy()
        if tokens:
            matcher.consume_tokens(list(tokens))  # a refusal leaves it in error: incomplete() says why
        return matcher

    def masks(self, matchers: list, out: torch.Tensor | None = None) -> torch.Tensor:
        """The bitmask [len(matchers), words] of the tokens each matcher allows next, once it has taken the token
        deferred for it (every token where None), into `out` where given (pinned memory, for a copy to the device
        that does not wait)."""
        out = self.bitmask(len(matchers)) if out is None else out
        if None in matchers:
            out.numpy()[[row for row, matcher in enumerate(matchers) if matcher is None]] = -1  # torch's threads wake
        self.settle(matchers)
        rows = [(matcher, row) for row, matcher in enumerate(matchers) if matcher is not None]
        if rows:  # llguidance.torch's fill_next_token_bitmask_par, whose module costs 1.5 s of torch.compile imports
            self.executor.unsafe_compute_mask_ptr(rows, out.data_ptr(), out.shape[1] * 4, out.shape[0])
        return out[:len(matchers)]

    def bitmask(self, rows: int, pin: bool = False) -> torch.Tensor:
        """Room for the masks of `rows` requests: int32 words of 32 tokens each, every token allowed."""
        return torch.full((rows, (self.vocab + 31) // 32), -1, dtype=torch.int32, pin_memory=pin)

    def defer(self, matchers: list, tokens: list[int]) -> None:
        """Each matcher (None: none) is to take its request's new token: as its next mask is made (masks), which the
        engine asks for while the device computes the next logits, or as its request ends (settle)."""
        self.pending = {id(matcher): (matcher, token) for matcher, token in zip(matchers, tokens) if matcher is not None}

    def settle(self, matchers: list) -> None:
        """The matchers take the tokens deferred for them (in turn: faster than llguidance's threads). A matcher that
        refuses its token is left in error: its mask allows only EOS, and incomplete() says why."""
        for key in [id(matcher) for matcher in matchers if id(matcher) in self.pending]:
            matcher, token = self.pending.pop(key)
            matcher.consume_token(token)


def incomplete(matcher: llguidance.LLMatcher | None, finish_reason: str, tokens: int) -> str | None:
    """Why an answer that ended is not one its grammar accepts (None where it is, or has no grammar)."""
    if matcher is None or matcher.is_accepting():
        return None
    if matcher.is_error():  # a token its mask allowed, refused: the grammar library's own words, on one line
        return f"its grammar refused its answer: {' '.join(matcher.get_error().split())}"
    return f"its answer ended ({finish_reason}, {tokens} tokens) before its constraint was complete"


def allowed(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The logits [B, vocab] with the tokens the bitmasks [B, words] leave out at -inf (static shapes: capturable)."""
    if triton is not None and logits.is_cuda and logits.stride(1) == 1:
        batch, vocab = logits.shape
        out = torch.empty(batch, vocab, dtype=logits.dtype, device=logits.device)
        _allowed[(batch, triton.cdiv(vocab, ALLOWED_BLOCK))](logits, masks, out, vocab, logits.stride(0),
                                                              masks.stride(0), BLOCK=ALLOWED_BLOCK)
        return out
    shifts = torch.arange(32, device=masks.device, dtype=torch.int32)
    keep = ((masks[:, :, None] >> shifts) & 1).flatten(1)[:, :logits.shape[-1]].bool()
    return logits.masked_fill(~keep, float("-inf"))


ALLOWED_BLOCK = 4096

if triton is not None:
    @triton.jit
    def _allowed(logits_ptr, masks_ptr, out_ptr, vocab, stride_logits, stride_masks, BLOCK: tl.constexpr):
        # one pass over the logits, where torch's expansion of the bits makes [B, vocab] int32 temporaries
        row, tokens = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = tokens < vocab
        words = tl.load(masks_ptr + row * stride_masks + tokens // 32, mask=inside, other=0)
        keep = ((words >> (tokens % 32)) & 1) != 0
        x = tl.load(logits_ptr + row * stride_logits + tokens, mask=inside)
        tl.store(out_ptr + row * vocab + tokens, tl.where(keep, x, float("-inf")), mask=inside)
