"""What travels through the pipeline: a Request (an input row, ready to generate) in, its Generation out.

prepare.py makes requests and stores them as Arrow shards (one column per Request field); the engines take
Requests and yield one Generation each, which carries its request on to the part files (output.PartWriter).
"""

from dataclasses import dataclass, field, fields


@dataclass
class Request:
    """One input row, ready to generate: its id as written, its prompt, and what its output row keeps."""
    id: str
    prompt: str
    input_ids: list[int]  # the prompt's token ids (left out of what mode=split hands to a token worker)
    prompt_tokens: int
    prompt_truncated: bool = False  # prompt.too_long=truncate cut the end of its text
    reference: str | None = None  # data.reference_column's value, kept beside the generation
    sample: int = 0  # which of the row's sampling.n samples this is
    max_new_tokens: int | None = None  # the row's own (data.max_new_tokens_column), else engine.max_new_tokens
    temperature: float | None = None  # the row's own (data.temperature_column), else sampling.temperature
    grammar: str | None = None  # the row's own constraint (data.json_schema_column; grammar.py), else the job's

    @property
    def key(self) -> tuple[str, int]:
        """What tells requests apart: the row's id and the sample."""
        return self.id, self.sample

    @classmethod
    def from_columns(cls, columns: dict[str, list]) -> list["Request"]:
        """The requests of a slice of the shards, given as lists of column values (a slice at once is far cheaper
        than reading the shards row by row)."""
        names = [f.name for f in fields(cls) if f.name in columns]
        return [cls(**dict(zip(names, values))) for values in zip(*(columns[name] for name in names))]


@dataclass
class Generation:
    """A request's outcome: its generated tokens (or the error that stopped it), and when each of its stages was.
    Times are time.perf_counter_ns() of the process that measured them."""
    request: Request
    token_ids: list[int] = field(default_factory=list)  # EOS included when the model stopped
    finish_reason: str = "length"  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    batch: int = 0  # the generate batch, or the prefill group the request entered with
    batch_size: int = 0
    enqueue_ns: int = 0
    prefill_start_ns: int = 0
    first_token_ns: int = 0
    finish_ns: int = 0
    prefill_worker: int | None = None  # mode=split: the prompt worker that prefilled it
    error: str | None = None  # why it was not generated (goes to errors.parquet)
    logprobs: list[float] | None = None  # sampling.logprobs: each token's log-probability under the model
