"""Read → validate → prompt → tokenize → Arrow shards.

Reading keeps the data as written. Ids and text are the exact strings of the file: CSV cells are never
converted (`007`, `7`, `1.0`, `NA`, `None` are five ids; only an empty cell is missing), JSON numbers keep
their written text (`7`, `1.0`), typed Parquet values become their text (`7`, never `7.0`). Only the id,
text and reference columns are read, as strings.

Rows that cannot be generated come back as errors with a reason; nothing is dropped silently: a CSV line
with more fields than the header, a JSON line that is not an object (both with their line number), no
id, a duplicate id, a text that is empty, not text (a number, a list) or not valid UTF-8, a prompt
longer than the model's context unless prompt.too_long=truncate. A row without an id is named `row:N`
(N: its row number, from 0); where a real id starts with `row:`, the prefix takes more colons (`row::N`,
...) until none does, so that it never equals a real id.

Only the prompt template contributes special tokens: a special token's string in the text (`<|im_end|>`)
is encoded as text.
"""

import csv
import io
import json
import math
import re
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, Sequence, Value, load_dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from splitwiser.config import DataConfig, PromptConfig
from splitwiser.errors import UserError
from splitwiser.output import unwritable

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
REPLACED = "\ufffd"  # what stands for bytes that are not UTF-8
READ_ERROR = "__splitwiser_read_error__"  # read_dataset's column, where a row has one: why it cannot be used
SENTINEL = "\ue000splitwiser text\ue000"  # stands for the text while the template is rendered


class _Read(NamedTuple):
    names: list[str]  # every column of the file
    columns: dict[str, pa.Array | pa.ChunkedArray]  # the configured ones that exist, as strings
    reasons: list[str | None]  # per row: why it cannot be used
    replaced: bool  # bytes that are not UTF-8 were replaced by U+FFFD


class _Number(str):
    """A JSON number as written (`7`, `1.0`, `1e3`): an id keeps its form; a text that is a number is told from
    a string."""


def data_path(path: str) -> Path:
    """data.path with its symbolic links followed, or a UserError saying why it cannot be."""
    try:
        return Path(path).expanduser().resolve(strict=True)
    except RuntimeError:  # what Python before 3.13 raises for a loop of symbolic links
        raise UserError(f"data.path={path}: a loop of symbolic links") from None
    except OSError as e:
        raise UserError(f"data.path={path}: {(e.strerror or str(e)).lower()}") from None


def _wanted(cfg: DataConfig) -> list[str]:
    return list(dict.fromkeys(c for c in (cfg.id_column, cfg.text_column, cfg.reference_column) if c is not None))


def _decode(path: Path) -> tuple[str, bool]:
    """The file's text, and whether bytes that are not UTF-8 were replaced: one bad row must not reject it."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8-sig", errors="replace"), True


def _read_csv(path: Path, cfg: DataConfig) -> _Read:
    """Every cell as its exact text, None where empty. Python's csv module, not a reader that infers types or
    missing values (`007` would become 7, `NA` missing); and a line with more fields than the header is set
    aside with its number, not read with its columns shifted. A line with fewer fields has the rest empty."""
    text, replaced = _decode(path)
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a long report is one field
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    where = {name: header.index(name) for name in _wanted(cfg) if name in header}
    columns, reasons = {name: [] for name in where}, []
    line = reader.line_num + 1
    for fields in reader:
        if fields:  # a blank line is no row
            extra = len(fields) > len(header)
            reasons.append(f"line {line} has {len(fields)} fields, the header {len(header)}" if extra else None)
            for name, i in where.items():
                columns[name].append((fields[i] or None) if i < len(fields) and not extra else None)
        line = reader.line_num + 1
    return _Read(header, {name: pa.array(values, pa.string()) for name, values in columns.items()}, reasons, replaced)


def _json_object(value, where: str) -> tuple[dict, str | None]:
    return (value, None) if isinstance(value, dict) else ({}, f"{where} is not a JSON object")


def _json_rows(text: str) -> Iterator[tuple[dict, str | None]]:
    """(object, why there is none) per row of a JSON document (a list of objects, or one) or of JSON Lines."""
    load = partial(json.loads, parse_int=_Number, parse_float=_Number, parse_constant=_Number)
    try:
        document = load(text)
    except json.JSONDecodeError:
        if text.lstrip().startswith("["):  # a broken document, not JSON Lines
            raise
    else:
        for number, value in enumerate(document if isinstance(document, list) else [document], 1):
            yield _json_object(value, f"item {number}")
        return
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 and others may be in a string
        if line.strip():
            try:
                yield _json_object(load(line), f"line {number}")
            except json.JSONDecodeError as e:
                yield {}, f"line {number} is not valid JSON: {e.msg}"


def _json_text(value, column: str, is_text: bool) -> tuple[str | None, str | None]:
    """A JSON value as text, or why it is none: the text must be a string; an id or reference may also be a
    number or a boolean, kept as written."""
    if value is None or (isinstance(value, str) and not (is_text and isinstance(value, _Number))):
        return value, None
    if isinstance(value, bool) and not is_text:
        return json.dumps(value), None
    kind = {bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), "a number")
    return None, f"{column} is {kind}, not text"


def _read_json(path: Path, cfg: DataConfig) -> _Read:
    text, replaced = _decode(path)
    objects, reasons = map(list, zip(*_json_rows(text))) if text.strip() else ([], [])
    names = list(dict.fromkeys(key for row in objects for key in row))
    if reasons and not names:  # not one object: not JSON at all, say why
        raise ValueError(reasons[0])
    columns = {}
    for name in (name for name in _wanted(cfg) if name in names):
        values, why = zip(*(_json_text(row.get(name), name, name == cfg.text_column) for row in objects))
        columns[name] = pa.array(values, pa.string())
        reasons = [r or w for r, w in zip(reasons, why)]
    return _Read(names, columns, reasons, replaced)


def _replace_bad_utf8(table: pa.Table) -> tuple[pa.Table, bool]:
    """Parquet does not check that strings are UTF-8 (they fail later, when read): a string column that is not
    is decoded again, its bad bytes replaced by U+FFFD."""
    try:
        table.validate(full=True)
        return table, False
    except pa.ArrowInvalid:
        pass
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type):
            raw = table.column(i).cast(pa.binary()).to_pylist()
            values = [None if v is None else v.decode(errors="replace") for v in raw]
            table = table.set_column(i, field, pa.array(values, pa.string()))
    return table, True


def _arrow_text(column: pa.ChunkedArray, name: str, is_text: bool) -> tuple[pa.ChunkedArray, list | None]:
    """A typed column as text (7 → "7", never "7.0"), and the reasons, if any: a text column that is not strings,
    or a nested id or reference, has no values, and a reason in each row that had one."""
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column.cast(pa.string()), None
    if is_text or pa.types.is_nested(kind):
        why = f"{name} is {'a list' if pa.types.is_list(kind) or pa.types.is_large_list(kind) else kind}, not text"
        return pa.chunked_array([pa.nulls(len(column), pa.string())]), [
            None if null else why for null in column.is_null().to_pylist()]
    if pa.types.is_floating(kind):  # NaN, pandas' missing value, is missing
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, kind), column)
    return column.cast(pa.string()), None


def _read_table(ds: Dataset, cfg: DataConfig) -> _Read:
    table = ds.with_format("arrow")[:]
    # A column of reasons is read_dataset's own, written with the rows (the nightly job's input.parquet).
    reasons = table[READ_ERROR].to_pylist() if READ_ERROR in table.column_names else [None] * len(table)
    wanted, replaced = _replace_bad_utf8(table.select([name for name in _wanted(cfg) if name in table.column_names]))
    columns = {}
    for name in wanted.column_names:
        columns[name], why = _arrow_text(wanted[name], name, name == cfg.text_column)
        reasons = reasons if why is None else [r or w for r, w in zip(reasons, why)]
    return _Read(table.column_names, columns, reasons, replaced)


def _read_saved(path: Path, cfg: DataConfig) -> _Read:
    """A directory written by datasets' save_to_disk."""
    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"data.path={cfg.path}: a directory, but not one written by datasets' save_to_disk") from None
    if isinstance(ds, DatasetDict):
        if len(ds) != 1:
            raise UserError(f"data.path={cfg.path} holds several splits ({', '.join(ds)}); save the one to run")
        ds = next(iter(ds.values()))
    return _read_table(ds, cfg)


def _read_file(path: Path, cfg: DataConfig) -> _Read:
    suffix = Path(cfg.path).suffix  # the name given, not that of a symbolic link's target
    builder = FORMATS.get(suffix.lower())
    if builder is None:
        raise UserError(f"data.path={cfg.path}: unknown format {suffix!r}; use .csv, .jsonl, .json, .parquet")
    try:
        if builder == "csv":
            return _read_csv(path, cfg)
        if builder == "json":
            return _read_json(path, cfg)
        return _read_table(load_dataset(builder, data_files=str(path), split="train"), cfg)
    except OSError:  # read_dataset says what it is
        raise
    except Exception as e:  # a user's file that the reader rejects: say why, in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data.path={cfg.path}: cannot be read as {builder}: {reason}") from None


def read_dataset(cfg: DataConfig) -> Dataset:
    """The configured columns of the input as strings (see the module's docstring), checked to exist; where a
    row cannot be used, the column READ_ERROR says why."""
    path = data_path(cfg.path)
    datasets.disable_progress_bars()
    try:
        read = _read_saved(path, cfg) if path.is_dir() else _read_file(path, cfg)
    except OSError as e:  # unreadable: no permission, a directory that vanished, an I/O error
        raise UserError(f"data.path={cfg.path}: {(e.strerror or str(e)).lower()}") from None
    if not read.reasons:
        raise UserError(f"data.path={cfg.path}: the dataset has no rows")
    for option in ("id_column", "text_column", "reference_column"):
        column = getattr(cfg, option)
        if column is not None and column not in read.names:
            raise UserError(f"data.{option}={column}: no such column; the columns are: {', '.join(read.names)}")
    reasons = read.reasons
    if read.replaced:
        bad = pc.fill_null(pc.match_substring(read.columns[cfg.text_column], REPLACED), False).to_pylist()
        why = f"{cfg.text_column} is not valid UTF-8 (bad bytes shown here as U+FFFD)"
        reasons = [r or (why if b else None) for r, b in zip(reasons, bad)]
    columns = {**read.columns, **({READ_ERROR: pa.array(reasons, pa.string())} if any(reasons) else {})}
    ds = Dataset(pa.table(columns))
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    return ds


def uses_chat(prompt: PromptConfig, tokenizer: PreTrainedTokenizerBase) -> bool:
    return prompt.style == "chat" or (prompt.style == "auto" and bool(tokenizer.chat_template))


def build_prompts(texts: list[str], prompt: PromptConfig, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    if not uses_chat(prompt, tokenizer):
        return [prompt.template.format(text=text) for text in texts]
    # One call for the batch: the template renders each conversation as alone, at half the cost of a call each.
    return tokenizer.apply_chat_template(
        [[{"role": "system", "content": prompt.instruction},
          {"role": "user", "content": prompt.chat_message.format(text=text)}] for text in texts],
        tokenize=False, add_generation_prompt=True)


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> re.Pattern:
    """Matches the tokenizer's special tokens (those that split_special_tokens=True encodes as text), as a group."""
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    return re.compile(f"({'|'.join(map(re.escape, specials)) or '(?!)'})")


def encode_as_text(template: str, text: str, tokenizer: PreTrainedTokenizerBase, specials: re.Pattern,
                   adds_special: bool) -> tuple[str, list[int]]:
    """The prompt of `text` and its token ids, where the text's special-token strings are encoded as text.
    `template` is the rendered prompt with SENTINEL for the text. It is split at its own special tokens, where
    the tokenizer splits it too, so that each piece's ids are those it has in one call; the pieces that hold
    the text are encoded with split_special_tokens=True, the others as usual. The post-processor's tokens (a
    BOS) come with the first piece."""
    chunks = []  # (string, whether it holds the text): the template's runs of pieces, and the text's
    for piece in specials.split(template):
        holds_text = SENTINEL in piece
        if chunks and not holds_text and not chunks[-1][1]:
            chunks[-1] = (chunks[-1][0] + piece, False)
        else:
            chunks.append((piece.replace(SENTINEL, text), holds_text))
    ids = []
    for i, (chunk, holds_text) in enumerate(chunks):
        ids += tokenizer(chunk, add_special_tokens=adds_special and i == 0, split_special_tokens=holds_text).input_ids
    return template.replace(SENTINEL, text), ids


def _no_id_prefix(ids: list[str | None]) -> str:
    """`row:`, with more colons while a real id starts with it: a placeholder id never equals a real one."""
    prefix = "row:"
    while any(i is not None and i.startswith(prefix) for i in ids):
        prefix += ":"
    return prefix


class Prepared(NamedTuple):
    requests: Dataset  # sorted by prompt length
    errors: Dataset  # id, error
    reused: list[str]  # ids of the part's rows whose existing generation still holds: not generated again


def prepare_requests(
    ds: Dataset,
    data: DataConfig,
    prompt: PromptConfig,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    done: dict[str, str],
) -> Prepared:
    """The rows of data.part as requests and errors. A row whose id is in `done` (id → the prompt its existing
    generation was made from) with the same prompt now is reused, not a request; one whose text changed is
    generated again. Ids are checked over the whole dataset, so a duplicate in another part is caught.

    A request has: id, reference (if configured), prompt, input_ids, prompt_tokens, prompt_truncated.
    """
    ids = [str(i) for i in range(len(ds))] if data.id_column is None else [  # [:]: a column at once, not row by row
        v if v is not None and v.strip() else None for v in ds.select_columns(data.id_column)[:][data.id_column]]
    first_row = {}
    for index, row_id in enumerate(ids):
        first_row.setdefault(row_id, index)
    no_id = _no_id_prefix(ids)
    adds_special = not uses_chat(prompt, tokenizer)  # a chat template writes its own special tokens
    specials = special_tokens(tokenizer)
    template = build_prompts([SENTINEL], prompt, tokenizer)[0]

    def tokenize(texts: list[str]) -> tuple[list[str], list[list[int]]]:
        """Prompts and their token ids, in one call: the fast tokenizer encodes a batch in parallel."""
        if not texts:  # a batch whose every row is an error: the tokenizer and the chat template refuse []
            return [], []
        prompt_texts = build_prompts(texts, prompt, tokenizer)
        token_ids = tokenizer(prompt_texts, add_special_tokens=adds_special).input_ids
        for i, text in enumerate(texts):
            if specials.search(text):  # its special-token strings became control tokens: encoded again, as text
                prompt_texts[i], token_ids[i] = encode_as_text(template, text, tokenizer, specials, adds_special)
        return prompt_texts, token_ids

    def fit(text: str, prompt_text: str, token_ids: list[int]) -> tuple[str, list[int], bool] | str:
        """(prompt, its token ids, whether the text was truncated), or why the row cannot be generated."""
        if len(token_ids) <= max_prompt_tokens:
            return prompt_text, token_ids, False
        if prompt.too_long == "error":
            return f"prompt has {len(token_ids)} tokens, over the {max_prompt_tokens} that fit the context"
        text_ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
        keep = len(text_ids) - (len(token_ids) - max_prompt_tokens)
        while keep > 0:  # tokens may merge differently at the cut: shorten until it fits
            [prompt_text], [token_ids] = tokenize([tokenizer.decode(text_ids[:keep])])
            if len(token_ids) <= max_prompt_tokens:
                return prompt_text, token_ids, True
            keep -= len(token_ids) - max_prompt_tokens
        return f"the prompt without its text is over the {max_prompt_tokens} tokens that fit the context"

    def row_error(index: int, row_id: str | None, text: str | None, read_error: str | None) -> str | None:
        if read_error:
            return read_error
        if row_id is None:
            return "missing id"
        if first_row[row_id] != index:
            return f"duplicate id (first seen at row {first_row[row_id]})"
        if text is None or not text.strip():
            return f"empty or missing {data.text_column}"
        return None

    def to_request(batch: dict, indices: list[int]) -> dict:
        out = {"id": [], "prompt": [], "input_ids": [], "prompt_tokens": [], "prompt_truncated": [], "error": [],
               "reused": []}
        if data.reference_column:
            out["reference"] = batch[data.reference_column]
        rows = [part.start + i for i in indices]
        read_errors = batch.get(READ_ERROR, [None] * len(indices))
        errors = [row_error(*row) for row in zip(rows, (ids[i] for i in rows), batch[data.text_column], read_errors)]
        texts = [text.strip() for text, error in zip(batch[data.text_column], errors) if error is None]
        tokenized = zip(texts, *tokenize(texts))
        for index, error in zip(rows, errors):
            fitted = fit(*next(tokenized)) if error is None else error
            if isinstance(fitted, str):  # why the row cannot be generated
                error, fitted = fitted, ("", [], False)
            prompt_text, token_ids, truncated = fitted
            out["id"].append(ids[index] or f"{no_id}{index}")
            out["prompt"].append(prompt_text)
            out["input_ids"].append(token_ids)
            out["prompt_tokens"].append(len(token_ids))
            out["prompt_truncated"].append(truncated)
            out["error"].append(error)
            out["reused"].append(error is None and done.get(ids[index]) == prompt_text)
        return out

    part = data.part_rows(len(ds))
    # Typed: map would otherwise keep an input column's type for an output of the same name (numeric ids).
    features = Features({"id": Value("string"), "prompt": Value("string"), "input_ids": Sequence(Value("int32")),
                         "prompt_tokens": Value("int32"), "prompt_truncated": Value("bool"), "error": Value("string"),
                         "reused": Value("bool"), **({"reference": Value("string")} if data.reference_column else {})})
    prepared = ds.select(part).map(to_request, batched=True, with_indices=True, remove_columns=ds.column_names,
                                   features=features)
    # Batched: a filter calls its function once per 1,000 rows instead of once per row.
    errors = prepared.filter(lambda errors: [e is not None for e in errors], input_columns="error", batched=True)
    reused = prepared.filter(lambda reused: reused, input_columns="reused", batched=True)
    requests = prepared.filter(lambda errors, reused: [e is None and not r for e, r in zip(errors, reused)],
                               input_columns=["error", "reused"], batched=True)
    return Prepared(requests.remove_columns(["error", "reused"]).sort("prompt_tokens"),
                    errors.select_columns(["id", "error"]), reused["id"][:])  # [:]: a list, not a Column


def write_shards(requests: Dataset, directory: Path, shard_rows: int) -> int:
    """Saves the requests as Arrow shards (memory-mapped by every worker); returns the number of work units."""
    shutil.rmtree(directory, ignore_errors=True)
    units = max(1, math.ceil(len(requests) / shard_rows))
    try:
        requests.save_to_disk(str(directory), num_shards=min(units, max(1, len(requests))))
    except OSError as e:
        raise UserError(unwritable(directory, e)) from None
    return units if len(requests) else 0


def load_shards(directory: Path) -> Dataset:
    """The requests written by write_shards, memory-mapped."""
    return load_from_disk(str(directory))


def work_unit(requests: Dataset, units: int, index: int) -> Dataset:
    """Work unit `index` of `units`: a contiguous slice of the (length-sorted) requests."""
    return requests.shard(num_shards=units, index=index, contiguous=True)
