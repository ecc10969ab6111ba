"""Rows → requests: each row read by splitwiser.data becomes a prompt and its token ids, or an error; the
requests are saved as Arrow shards that the workers memory-map.

Rows that cannot be generated come back as errors with a reason; nothing is dropped silently: a row that
read_dataset could not use (its reason), no id, a duplicate id, an empty value of a column the prompt names
(`empty or missing findings`), a prompt longer than
the model's context unless prompt.too_long=truncate. A row without an id is named `row:N` (N: its row
number, from 0); where a real id starts with `row:`, the prefix takes more colons (`row::N`, ...) until
none does, so that it never equals a real id.

The templates fill each `{name}` with the row's value of that column (stripped), `{text}` with data.text_column's.
With data.messages_column, a row's prompt is its conversation, rendered with the chat template (_ChatEncoder).
Only the template contributes special tokens: a special token's string in any value or message (`<|im_end|>`) is
encoded as text.
"""

import math
import re
import shutil
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pyarrow.compute as pc
from datasets import Dataset, Features, Sequence, Value, load_from_disk
from transformers import PreTrainedTokenizerBase

from splitwiser import conversation, grammar, reasoning
from splitwiser.config import DataConfig, PromptConfig
from splitwiser.data import READ_ERROR
from splitwiser.errors import UserError
from splitwiser.output import unwritable

SENTINEL = "\ue000splitwiser text\ue000"  # stands for the text while the template is rendered
SENTINELS = re.compile("\ue000splitwiser ([^\ue000]*)\ue000")  # sentinel(name), for every placeholder


def sentinel(placeholder: str) -> str:
    """What stands for a placeholder's value while the template is rendered (SENTINEL for {text})."""
    return f"\ue000splitwiser {placeholder}\ue000"


def fill(template: str, values: dict[str, str]) -> str:
    """A template rendered with sentinel(name) for each value, with the values in their place."""
    return SENTINELS.sub(lambda m: values[m.group(1)], template)


FILE_ROWS = 65_536  # requests per Arrow file of the shards (write_shards)
CHECKED_ROWS = 4  # of each batch, rendered both ways (_Encoder.prompts)
# Values that a template which escapes, trims or inspects its values would not put into the prompt as they are.
PROBES = ("  a \"quoted\" 'b' <tag> &amp; \\ {c} [d]\nsecond line\t ", "x")


def uses_chat(prompt: PromptConfig, tokenizer: PreTrainedTokenizerBase) -> bool:
    return prompt.style == "chat" or (prompt.style == "auto" and bool(tokenizer.chat_template))


def build_prompts(rows: list[str | dict[str, str]], prompt: PromptConfig,
                  tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The prompt of each row: its values by placeholder ({"text": ..., "indication": ...}), or its text alone."""
    rows = [row if isinstance(row, dict) else {"text": row} for row in rows]
    if not uses_chat(prompt, tokenizer):
        return [prompt.template.format(**row) for row in rows]
    return render_chat([[{"role": "system", "content": prompt.instruction.format(**row)},
                         {"role": "user", "content": prompt.chat_message.format(**row)}] for row in rows],
                       prompt, tokenizer)


def render_chat(conversations: list[list[dict[str, str]]], prompt: PromptConfig,
                tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The conversations through the model's chat template, each ending where the assistant answers, with the
    template's thinking switch where prompt.thinking sets it. One call for the batch: the template renders each
    conversation as alone, at half the cost of a call each."""
    return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True,
                                         **thinking_switch(prompt.thinking, tokenizer))


def thinking_switch(thinking: bool | None, tokenizer: PreTrainedTokenizerBase) -> dict[str, bool]:
    """The chat template's argument for prompt.thinking. true: the model thinks (a template without the switch, as
    the DeepSeek-R1 distills', always does), which needs its `</think>` token (reasoning.py); false: it answers at
    once, which needs the switch. Raises UserError where the model lacks what the setting needs."""
    has_switch = "enable_thinking" in str(tokenizer.chat_template)
    if thinking:
        reasoning.end_token(tokenizer)
    elif thinking is False and not has_switch:
        raise UserError("prompt.thinking=false: the model's chat template has no thinking switch (enable_thinking); "
                        "leave prompt.thinking unset")
    return {"enable_thinking": thinking} if thinking is not None and has_switch else {}


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> re.Pattern:
    """Matches the tokenizer's special tokens (those that split_special_tokens=True encodes as text), as a group."""
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    return re.compile(f"({'|'.join(map(re.escape, specials)) or '(?!)'})")


def encode_as_text(template: str, values: str | dict[str, str], tokenizer: PreTrainedTokenizerBase,
                   specials: re.Pattern, adds_special: bool) -> tuple[str, list[int]]:
    """The prompt of `values` (by placeholder; a str: the text) and its token ids, where the values' special-token
    strings are encoded as text. `template` is the rendered prompt with sentinel(name) for each value. It is
    split at its own special tokens, where the tokenizer splits it too, so that each piece's ids are those it
    has in one call; the pieces that hold a value are encoded with split_special_tokens=True, the others as
    usual. The post-processor's tokens (a BOS) come with the first piece."""
    values = values if isinstance(values, dict) else {"text": values}
    chunks = []  # (string, whether it holds a value): the template's runs of pieces, and the values'
    for piece in specials.split(template):
        holds_text = SENTINELS.search(piece) is not None
        if chunks and not holds_text and not chunks[-1][1]:
            chunks[-1] = (chunks[-1][0] + piece, False)
        else:
            chunks.append((fill(piece, values), holds_text))
    ids = []
    for i, (chunk, holds_text) in enumerate(chunks):
        ids += tokenizer(chunk, add_special_tokens=adds_special and i == 0, split_special_tokens=holds_text).input_ids
    return fill(template, values), ids


def _no_id_prefix(ids: list[str | None]) -> str:
    """`row:`, with more colons while a real id starts with it: a placeholder id never equals a real one."""
    prefix = "row:"
    while any(i is not None and i.startswith(prefix) for i in ids):
        prefix += ":"
    return prefix


class _Ids:
    """The ids of the whole dataset, not only of data.part: a duplicate in another part is caught."""

    def __init__(self, ds: Dataset, id_column: str | None):
        # [:]: a column at once, not row by row
        self.by_row = [str(i) for i in range(len(ds))] if id_column is None else [
            v if v is not None and v.strip() else None for v in ds.select_columns(id_column)[:][id_column]]
        self.first_row = {}  # id → the first row that has it
        for row, row_id in enumerate(self.by_row):
            self.first_row.setdefault(row_id, row)
        self.no_id = _no_id_prefix(self.by_row)

    def name(self, row: int) -> str:
        """The row's id, or its placeholder where it has none."""
        return self.by_row[row] or f"{self.no_id}{row}"


def row_ids(ds: Dataset, id_column: str | None) -> tuple[list[str], list[str | None]]:
    """Each row's id as the outputs name it (a placeholder where it has none), and as written (None where missing)."""
    ids = _Ids(ds, id_column)
    return [ids.name(row) for row in range(len(ds))], ids.by_row


def _row_error(ids: _Ids, row: int, cells: dict[str, str | None], read_error: str | None) -> str | None:
    """Why the row cannot be generated, as far as its cells (by column, those the prompt names) tell (before
    its prompt is made), or None."""
    if read_error:
        return read_error
    row_id = ids.by_row[row]
    if row_id is None:
        return "missing id"
    if ids.first_row[row_id] != row:
        return f"duplicate id (first seen at row {ids.first_row[row_id]})"
    for column, value in cells.items():
        if value is None or not value.strip():
            return f"empty or missing {column}"
    return None


class _Encoder:
    """Rows' values (by placeholder) as prompts and token ids, made to fit max_prompt_tokens."""

    def __init__(self, prompt: PromptConfig, tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int,
                 text_column: str):
        self.prompt, self.tokenizer, self.max_prompt_tokens = prompt, tokenizer, max_prompt_tokens
        chat = uses_chat(prompt, tokenizer)
        if prompt.thinking is not None and not chat:
            raise UserError(f"prompt.thinking={str(prompt.thinking).lower()}: a chat template's switch, and this job's "
                            "prompts are plain (prompt.style, or a model without a chat template)")
        self.adds_special = not chat  # a chat template writes its own special tokens
        self.columns = prompt.columns(text_column, chat)  # placeholder → column, of the template in use
        self.specials = special_tokens(tokenizer)
        self.template = build_prompts([{name: sentinel(name) for name in self.columns}], prompt, tokenizer)[0]
        probes = [{name: probe + name for name in self.columns} for probe in PROBES]
        self.verbatim = self.build(probes, fast=False) == self.build(probes)

    def build(self, rows: list[dict[str, str]], fast: bool = True) -> list[str]:
        """The rows' prompts: the template rendered for each row, or (fast) rendered once with sentinels and each
        row's values put in their place (the chat template's Jinja for each row took half the time of preparing)."""
        if fast:
            return [fill(self.template, row) for row in rows]
        return build_prompts(rows, self.prompt, self.tokenizer)

    def prompts(self, rows: list[dict[str, str]]) -> list[str]:
        """The rows' prompts, fast where the template puts values into the prompt as they are: so it does with
        PROBES (self.verbatim) and with the first rows of each batch, rendered both ways; a template that changes
        or inspects a value there is rendered for each row from then on."""
        if self.verbatim:
            prompts = self.build(rows)
            if self.build(rows[:CHECKED_ROWS], fast=False) == prompts[:CHECKED_ROWS]:
                return prompts
            self.verbatim = False
        return self.build(rows, fast=False)

    def texts(self, rows: list[dict[str, str]]) -> list[str]:
        """The rows' prompts as tokenize makes them where no value holds a special token's text."""
        return self.prompts(rows)

    def tokenize(self, rows: list[dict[str, str]]) -> tuple[list[str], list[list[int]]]:
        """Prompts and their token ids, in one call: the fast tokenizer encodes a batch in parallel."""
        if not rows:  # a batch whose every row is an error: the tokenizer and the chat template refuse []
            return [], []
        prompt_texts = self.prompts(rows)
        token_ids = self.tokenizer(prompt_texts, add_special_tokens=self.adds_special).input_ids
        for i, row in enumerate(rows):
            if any(map(self.specials.search, row.values())):  # special-token strings became control tokens:
                prompt_texts[i], token_ids[i] = encode_as_text(self.template, row, self.tokenizer, self.specials,
                                                               self.adds_special)  # encoded again, as text
        return prompt_texts, token_ids

    def fit(self, row: dict[str, str], prompt_text: str, token_ids: list[int]) -> tuple[str, list[int], bool] | str:
        """(prompt, its token ids, whether a value was truncated), or why the row cannot be generated. Truncation
        cuts the end of the longest value (in characters; the first of equals) only, until the prompt fits."""
        limit = self.max_prompt_tokens
        if len(token_ids) <= limit:
            return prompt_text, token_ids, False
        if self.prompt.too_long == "error":
            return f"prompt has {len(token_ids)} tokens, over the {limit} that fit the context"
        longest = max(row, key=lambda name: len(row[name]))
        text_ids = self.tokenizer(row[longest], add_special_tokens=False, split_special_tokens=True).input_ids
        keep = len(text_ids) - (len(token_ids) - limit)
        while keep > 0:  # tokens may merge differently at the cut: shorten until it fits
            [prompt_text], [token_ids] = self.tokenize([{**row, longest: self.tokenizer.decode(text_ids[:keep])}])
            if len(token_ids) <= limit:
                return prompt_text, token_ids, True
            keep -= len(token_ids) - limit
        return f"the prompt without its {self.describe(longest)} is over the {limit} tokens that fit the context"

    def values(self, cells: dict[str, str]) -> dict[str, str]:
        """A good row's values by placeholder, from its cells by column."""
        return {name: cells[column].strip() for name, column in self.columns.items()}

    def describe(self, name: str) -> str:
        """What a value is, for a reason: `text`, or its column."""
        return "text" if name == "text" else self.columns[name]


RAW = "\x00prompt"  # _ChatEncoder's value of a prompt used as it is (an OpenAI /v1/completions request)


class _ChatEncoder(_Encoder):
    """Rows' conversations (data.messages_column) as prompts and token ids: each rendered with the chat template,
    prompt.instruction as its system message where it has none; or a prompt used as it is (splitwiser.conversation).
    A row's values are the instruction's (where used) and its messages' contents, by keys `\x00N role` (N from 0),
    in order: special-token strings in any of them are encoded as text, and truncation cuts the longest."""

    def __init__(self, prompt: PromptConfig, tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int,
                 data: DataConfig):
        self.prompt, self.tokenizer, self.max_prompt_tokens = prompt, tokenizer, max_prompt_tokens
        self.instruction = prompt.columns(data.text_column, conversation=True)  # its placeholder → column
        self.messages_column = data.messages_column
        self.columns = {**self.instruction, "\x00messages": data.messages_column}  # the cells a row needs
        self.specials = special_tokens(tokenizer)

    def values(self, cells: dict[str, str]) -> dict[str, str]:
        messages = conversation.parse(cells[self.messages_column])
        if isinstance(messages, str):
            return {RAW: messages}
        used = self.prompt.instruction.strip() and not conversation.has_system(messages)
        instruction = {name: cells[column].strip() for name, column in self.instruction.items()} if used else {}
        return {**instruction, **{f"\x00{i} {m['role']}": m["content"] for i, m in enumerate(messages)}}

    def describe(self, name: str) -> str:
        if name == RAW:
            return "prompt"
        if name.startswith("\x00"):
            number, role = name[1:].split(" ")
            return f"message {int(number) + 1} ({role})"
        return self.instruction[name]

    def messages(self, row: dict[str, str]) -> list[dict[str, str]]:
        """The messages to render: the row's, after the instruction where the row has it (see values)."""
        messages = [{"role": "system" if key.split(" ")[1] in conversation.SYSTEM_ROLES else key.split(" ")[1],
                     "content": value} for key, value in row.items() if key.startswith("\x00")]
        instruction = {k: v for k, v in row.items() if not k.startswith("\x00")}
        used = self.prompt.instruction.strip() and not any(m["role"] == "system" for m in messages)
        if not used:
            return messages
        return [{"role": "system", "content": self.prompt.instruction.format(**instruction)}, *messages]

    def render(self, rows: list[dict[str, str]]) -> list[str]:
        """The prompts of rows: a conversation with the chat template (one call for them all), a raw prompt as it is."""
        chats = [row for row in rows if RAW not in row]
        rendered = iter(render_chat([self.messages(row) for row in chats], self.prompt, self.tokenizer) if chats else [])
        return [row[RAW] if RAW in row else next(rendered) for row in rows]

    def texts(self, rows: list[dict[str, str]]) -> list[str]:
        if not self.tokenizer.chat_template:  # tokenize makes every conversation's prompt empty (fit refuses it)
            return [row.get(RAW, "") for row in rows]
        return self.render(rows)

    def tokenize(self, rows: list[dict[str, str]]) -> tuple[list[str], list[list[int]]]:
        if not self.tokenizer.chat_template:  # no conversation can be rendered (fit says so), raw prompts can
            rows = [row if RAW in row else {RAW: ""} for row in rows]
        prompt_texts, token_ids = self.render(rows), [[] for _ in rows]
        for raw in (False, True):  # a chat template writes its own special tokens; a raw prompt gets the tokenizer's
            which = [i for i, row in enumerate(rows) if (RAW in row) == raw]
            texts = [prompt_texts[i] for i in which]
            for i, ids in zip(which, self.tokenizer(texts, add_special_tokens=raw).input_ids if which else []):
                token_ids[i] = ids
        for i, row in enumerate(rows):
            if any(map(self.specials.search, row.values())):  # encoded again, the values as text
                [template] = self.render([{key: sentinel(key) for key in row}])
                prompt_texts[i], token_ids[i] = encode_as_text(template, row, self.tokenizer, self.specials, RAW in row)
        return prompt_texts, token_ids

    def fit(self, row: dict[str, str], prompt_text: str, token_ids: list[int]) -> tuple[str, list[int], bool] | str:
        if RAW not in row and not self.tokenizer.chat_template:
            return "a conversation needs the model's chat template, and this model's tokenizer has none"
        return super().fit(row, prompt_text, token_ids)


def make_encoder(data: DataConfig, prompt: PromptConfig, tokenizer: PreTrainedTokenizerBase,
                 max_prompt_tokens: int) -> _Encoder:
    """The encoder of the job's rows: of their conversations where data.messages_column is set, else of the prompt
    templates."""
    if data.messages_column:
        return _ChatEncoder(prompt, tokenizer, max_prompt_tokens, data)
    return _Encoder(prompt, tokenizer, max_prompt_tokens, data.text_column)


class _Row(NamedTuple):
    """A row as map writes it: a request, or an error (or a reused row) that _split sets apart."""
    id: str
    prompt: str
    input_ids: list[int]
    prompt_tokens: int
    prompt_truncated: bool
    sample: int
    max_new_tokens: int | None
    temperature: float | None
    grammar: str | None
    error: str | None
    reused: bool


def _features(data: DataConfig) -> Features:
    # Typed: map would otherwise keep an input column's type for an output of the same name (numeric ids).
    return Features({"id": Value("string"), "prompt": Value("string"), "input_ids": Sequence(Value("int32")),
                     "prompt_tokens": Value("int32"), "prompt_truncated": Value("bool"), "sample": Value("int32"),
                     "max_new_tokens": Value("int32"), "temperature": Value("float64"), "grammar": Value("string"), "error": Value("string"),
                     "reused": Value("bool"), **({"reference": Value("string")} if data.reference_column else {})})


def _row_settings(batch: dict, index: int, data: DataConfig, max_new_tokens: int) -> dict | str:
    """The row's own settings (data.max_new_tokens_column, data.temperature_column, data.json_schema_column; an empty
    cell: the job's), or why they cannot be used."""
    settings = {}
    for setting, column in data.per_row_columns().items():
        text = batch[column][index]
        if text is None or not text.strip():
            continue
        if setting == "grammar":
            try:
                settings[setting] = grammar.from_json_schema(text, f"{column}")
            except UserError as e:
                return str(e)
            continue
        try:
            value = int(text) if setting == "max_new_tokens" else float(text)
        except ValueError:
            return f"{column}={text!r} is not a {'whole number' if setting == 'max_new_tokens' else 'number'}"
        if setting == "max_new_tokens" and not 1 <= value <= max_new_tokens:
            return f"{column}={text}: must be 1 to engine.max_new_tokens={max_new_tokens}"
        if setting == "temperature" and not 0 <= value < math.inf:
            return f"{column}={text}: must be 0 (greedy) or more"
        settings[setting] = value
    return settings


def _to_requests(batch: dict, indices: list[int], data: DataConfig, start: int, ids: _Ids, encoder: _Encoder,
                 done: dict[tuple[str, int], str], samples: int, max_new_tokens: int) -> dict:
    """map's function: a batch of data.part's rows (`indices` counted from row `start`) as _Row's columns, `samples`
    rows (sampling.n) for each row that can be generated and one for each that cannot."""
    rows = [start + i for i in indices]
    read_errors = batch.get(READ_ERROR, [None] * len(indices))
    named = list(dict.fromkeys(encoder.columns.values()))
    cells = [{column: batch[column][i] for column in named} for i in range(len(indices))]
    settings = [_row_settings(batch, i, data, max_new_tokens) for i in range(len(indices))]
    errors = [_row_error(ids, row, row_cells, read_error) or (setting if isinstance(setting, str) else None)
              for row, row_cells, read_error, setting in zip(rows, cells, read_errors, settings)]
    good = [encoder.values(row_cells) if error is None else None for row_cells, error in zip(cells, errors)]
    on_disk = _on_disk(done, [ids.by_row[row] for row in rows], good, samples, encoder)
    new = [values for values, error, kept in zip(good, errors, on_disk) if error is None and not kept]
    fitted = map(encoder.fit, new, *encoder.tokenize(new))  # the rows to generate tokenized in one call
    prepared, copies = [], []
    for row, error, setting, kept in zip(rows, errors, settings, on_disk):
        result = error or ((done[ids.by_row[row], 0], [], False) if kept else next(fitted))
        if isinstance(result, str):  # why the row cannot be generated
            error, result, setting = result, ("", [], False), {}
        prompt_text, token_ids, truncated = result
        copies.append(samples if error is None else 1)
        for sample in range(copies[-1]):
            reused = error is None and done.get((ids.by_row[row], sample)) == prompt_text
            prepared.append(_Row(ids.name(row), prompt_text, token_ids, len(token_ids), truncated, sample,
                                 setting.get("max_new_tokens"), setting.get("temperature"), setting.get("grammar"),
                                 error, reused))
    out = {name: [getattr(r, name) for r in prepared] for name in _Row._fields}
    if data.reference_column:
        out["reference"] = [value for value, n in zip(batch[data.reference_column], copies) for _ in range(n)]
    return out


def _on_disk(done: dict[tuple[str, int], str], row_ids: list[str | None], good: list[dict | None], samples: int,
             encoder: "_Encoder") -> list[bool]:
    """For each row, whether every sample of it has a generation on disk made from the prompt it has now (as
    rendered, untruncated): such rows are not tokenized (a resumed job's), the others are, and compared after."""
    candidates = [i for i, values in enumerate(good) if values is not None and (row_ids[i], 0) in done]
    on_disk = [False] * len(good)
    for i, prompt_text in zip(candidates, encoder.texts([good[i] for i in candidates]) if candidates else []):
        on_disk[i] = all(done.get((row_ids[i], sample)) == prompt_text for sample in range(samples))
    return on_disk


class Prepared(NamedTuple):
    requests: Dataset  # sorted by prompt length
    errors: Dataset  # id, error
    reused: list[tuple[str, int]]  # (id, sample) of the part's rows whose generation on disk holds: not generated again


def _split(prepared: Dataset) -> Prepared:
    """map's rows as requests (sorted by prompt length), errors, and the keys of the reused: their rows found with
    Arrow's compute on the two flag columns and selected (an index over the rows, not a copy of them)."""
    table = prepared.with_format("arrow")[:]
    failed, reused = pc.is_valid(table["error"]), table["reused"]
    requests = pc.indices_nonzero(pc.invert(pc.or_(failed, reused)))
    by_length = pc.take(requests, pc.sort_indices(pc.take(table["prompt_tokens"], requests)))
    return Prepared(prepared.remove_columns(["error", "reused"]).select(by_length),
                    prepared.select(pc.indices_nonzero(failed)).select_columns(["id", "error"]),
                    list(zip(table["id"].filter(reused).to_pylist(), table["sample"].filter(reused).to_pylist())))


def prepare_requests(
    ds: Dataset,
    data: DataConfig,
    prompt: PromptConfig,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    done: dict[tuple[str, int], str],
    samples: int = 1,
    max_new_tokens: int = 64,
    written_to: Path | None = None,
) -> Prepared:
    """The rows of data.part as requests and errors: `samples` requests per row (sampling.n), each of which
    may have its own max_new_tokens (up to the job's) and temperature. A request whose (id, sample) is in `done`
    (→ the prompt its existing generation was made from) with the same prompt now is reused; one whose text
    changed is generated again. Ids are checked over the whole dataset, so a duplicate in another part is caught.
    written_to: an Arrow file that holds them (memory-mapped: a million requests take ~1 GB), else in memory.

    A request has request.Request's fields (reference if configured).
    """
    part = data.part_rows(len(ds))
    to_requests = partial(_to_requests, data=data, start=part.start, ids=_Ids(ds, data.id_column),
                          encoder=make_encoder(data, prompt, tokenizer, max_prompt_tokens), done=done,
                          samples=samples, max_new_tokens=max_new_tokens)
    # A fingerprint of its own: datasets would hash the function's arguments (the whole dataset's ids) to make one.
    try:
        prepared = ds.select(part).map(to_requests, batched=True, with_indices=True, remove_columns=ds.column_names,
                                       features=_features(data), new_fingerprint="splitwiser-requests",
                                       load_from_cache_file=False, keep_in_memory=written_to is None,
                                       cache_file_name=written_to and str(written_to))
    except OSError as e:  # the disk full, the directory gone
        raise UserError(unwritable(written_to, e)) from None
    return _split(prepared)


def write_shards(requests: Dataset, directory: Path, shard_rows: int) -> int:
    """Saves the requests as Arrow files (memory-mapped by every worker); returns the number of work units of
    shard_rows requests, each a slice of them all (work_unit), whatever file holds it: a file a unit took ~30 ms
    each (two minutes for a million rows)."""
    shutil.rmtree(directory, ignore_errors=True)
    units = max(1, math.ceil(len(requests) / shard_rows))
    try:
        requests.save_to_disk(str(directory), num_shards=max(1, math.ceil(len(requests) / FILE_ROWS)))
    except OSError as e:
        raise UserError(unwritable(directory, e)) from None
    return units if len(requests) else 0


def load_shards(directory: Path) -> Dataset:
    """The requests written by write_shards, memory-mapped."""
    return load_from_disk(str(directory))


def work_unit(requests: Dataset, units: int, index: int) -> Dataset:
    """Work unit `index` of `units`: a contiguous slice of the (length-sorted) requests."""
    return requests.shard(num_shards=units, index=index, contiguous=True)
