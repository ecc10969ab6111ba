"""Reads the dataset as written: the configured columns of a file or of a saved dataset, as strings, and
for each row that cannot be used, why.

Reading keeps the data as written, in data.encoding (a CSV's separator is data.delimiter, or the one its header line
holds most). Ids and text are the exact strings of the file: CSV cells are never
converted (`007`, `7`, `1.0`, `NA`, `None` are five ids; only an empty cell is missing), JSON numbers keep
their written text (`7`, `1.0`), typed Parquet values become their text (`7`, never `7.0`). Only the id,
text and reference columns, and those the prompt's templates name, are read, as strings (a named column
other than the text column takes a number as written, like an id). Two kinds of column are read otherwise: a
messages column (a list of {role, content}, or its JSON text in a CSV) becomes its conversation's canonical JSON
text (splitwiser.conversation), and output.keep_columns are read again as typed in the file (an int stays an
int; CSV is text), into columns named kept_column(name). An OpenAI batch input file (splitwiser.openai_batch)
is read as its requests' columns, whatever the data options say.

A row that cannot be used is kept, with its reason in the column READ_ERROR; nothing is dropped silently:
a CSV line with more fields than the header, a JSON line that is not an object (both with their line
number), a text that is not text (a number, a list) or not valid UTF-8, a conversation that is not one, a batch
request that cannot be honoured. splitwiser.prepare turns the rows into requests, and these reasons into errors.
"""

import codecs
import csv
import itertools
import json
import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from splitwiser.config import DataConfig, PromptConfig, SamplingConfig
from splitwiser.conversation import conversation
from splitwiser.errors import UserError
from splitwiser.openai_batch import is_batch_file, read_requests

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
REPLACED = "\ufffd"  # what stands for bytes that are not UTF-8
READ_ERROR = "__splitwiser_read_error__"  # read_dataset's column, where a row has one: why it cannot be used
CSV_CHUNK_ROWS = 65_536  # rows of a CSV's cells held as Python strings at most while it is read
KEPT = "__splitwiser_kept__"  # the prefix of read_dataset's columns of output.keep_columns (kept_column)


class _Read(NamedTuple):
    names: list[str]  # every column of the file
    columns: dict[str, pa.Array | pa.ChunkedArray]  # the configured ones that exist, as strings
    reasons: list[str | None]  # per row: why it cannot be used
    replaced: bool  # bytes that are not UTF-8 were replaced by U+FFFD
    kept: dict[str, pa.Array | pa.ChunkedArray] = {}  # output.keep_columns' columns, typed as in the file


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


def _wanted(cfg: DataConfig, named: list[str] = ()) -> list[str]:
    """The columns to read: the configured ones, then those the prompt names."""
    configured = (cfg.id_column, cfg.text_column, cfg.reference_column, cfg.messages_column,
                  *cfg.per_row_columns().values())
    return list(dict.fromkeys([*(c for c in configured if c is not None), *named]))


def _decode(path: Path, encoding: str = "utf-8") -> tuple[str, bool]:
    """The file's text in `encoding` (data.encoding; UTF-8 with or without a BOM), and whether bytes it cannot read
    were replaced: one bad row must not reject the file."""
    raw = path.read_bytes()
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        return raw.decode(codec), False
    except UnicodeDecodeError:
        return raw.decode(codec, errors="replace"), True


def delimiter(cfg: DataConfig, header: str) -> str:
    """data.delimiter, or the one of , ; tab | that the header line holds most (outside quotes), comma if none."""
    if cfg.delimiter is not None:
        return cfg.delimiter
    unquoted = header.split('"')[::2]
    counts = {candidate: sum(part.count(candidate) for part in unquoted) for candidate in ",;\t|"}
    chosen = max(counts, key=counts.get) if any(counts.values()) else ","
    log.info("data.delimiter: %r, from the header line of %s", chosen, cfg.path)
    return chosen


def kept_column(name: str) -> str:
    """read_dataset's column holding output.keep_columns' `name` as typed in the file (the nightly job's
    input.parquet keeps it under this name too)."""
    return KEPT + name


def _conversations(values: list, column: str, reasons: list[str | None]) -> tuple[pa.Array, list[str | None]]:
    """A messages column's values as canonical JSON text (splitwiser.conversation), and the rows' reasons with
    why a value is not a conversation added; an empty cell is missing, as in any column."""
    checked = [(None, None) if value is None else conversation(value, column) for value in values]
    return (pa.array([text for text, _ in checked], pa.string()),
            [reason or why for reason, (_, why) in zip(reasons, checked)])


def _read_csv(path: Path, cfg: DataConfig, named: list[str], keep: list[str] = ()) -> _Read:
    """Every cell as its exact text, None where empty. Python's csv module, not a reader that infers types or
    missing values (`007` would become 7, `NA` missing); and a line with more fields than the header is set
    aside with its number, not read with its columns shifted. A line with fewer fields has the rest empty.
    The file is read as it is parsed, its cells kept as Arrow strings every CSV_CHUNK_ROWS rows: a file of a
    million rows never sits in memory as text or as Python strings at once. Bytes that are not of the encoding
    are read again as U+FFFD (the file read a second time: one bad row must not reject the file)."""
    try:
        return _read_csv_as(path, cfg, named, keep, errors="strict")
    except UnicodeDecodeError:
        return _read_csv_as(path, cfg, named, keep, errors="replace")


def _read_csv_as(path: Path, cfg: DataConfig, named: list[str], keep: list[str], errors: str) -> _Read:
    codec = "utf-8-sig" if codecs.lookup(cfg.encoding).name == "utf-8" else cfg.encoding
    csv.field_size_limit(max(csv.field_size_limit(), path.stat().st_size))  # a long report is one field
    with open(path, encoding=codec, errors=errors, newline="") as file:
        first = file.readline()
        reader = csv.reader(itertools.chain([first], file), delimiter=delimiter(cfg, first.split("\n", 1)[0]))
        header = next(reader, [])
        where = {name: header.index(name) for name in _wanted(cfg, [*named, *keep]) if name in header}
        columns, chunks, reasons = {name: [] for name in where}, {name: [] for name in where}, []
        line = reader.line_num + 1
        for fields in reader:
            if fields:  # a blank line is no row
                extra = len(fields) > len(header)
                reasons.append(f"line {line} has {len(fields)} fields, the header {len(header)}" if extra else None)
                for name, i in where.items():
                    columns[name].append((fields[i] or None) if i < len(fields) and not extra else None)
                if len(reasons) % CSV_CHUNK_ROWS == 0:
                    _keep_chunk(columns, chunks, reasons, cfg.messages_column)
            line = reader.line_num + 1
    _keep_chunk(columns, chunks, reasons, cfg.messages_column)
    arrays = {name: pa.chunked_array(parts, pa.string()) for name, parts in chunks.items()}
    return _Read(header, arrays, reasons, errors != "strict", {name: arrays[name] for name in keep if name in arrays})


def _keep_chunk(columns: dict[str, list], chunks: dict[str, list[pa.Array]], reasons: list[str | None],
                messages_column: str | None) -> None:
    """The cells read since the last chunk as Arrow strings (a conversation's as its JSON text), the lists emptied."""
    for name, values in columns.items():
        if name == messages_column:
            start = len(reasons) - len(values)
            array, reasons[start:] = _conversations(values, name, reasons[start:])
        else:
            array = pa.array(values, pa.string())
        chunks[name].append(array)
        values.clear()


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


def _json_value(value):
    """A JSON value with its numbers as numbers (int where written without a fraction or exponent)."""
    if isinstance(value, _Number):
        try:
            return int(value)
        except ValueError:
            return float(value)
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return {k: _json_value(v) for k, v in value.items()} if isinstance(value, dict) else value


def _json_typed(values: list, column: str) -> pa.Array:
    """A kept JSON column typed as Arrow infers it from the values (ints, floats, strings, booleans, lists,
    objects); a column whose values mix types (7 and "7") is kept as the values' JSON text instead."""
    values = [_json_value(v) for v in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        log.warning("output.keep_columns: %s mixes types in the JSON; kept as the values' JSON text", column)
        return pa.array([v if v is None or type(v) is str else json.dumps(v) for v in values], pa.string())


def _read_json(path: Path, cfg: DataConfig, named: list[str], keep: list[str] = ()) -> _Read:
    text, replaced = _decode(path, cfg.encoding)
    objects, reasons = map(list, zip(*_json_rows(text))) if text.strip() else ([], [])
    names = list(dict.fromkeys(key for row in objects for key in row))
    if reasons and not names:  # not one object: not JSON at all, say why
        raise ValueError(reasons[0])
    columns = {}
    for name in (name for name in _wanted(cfg, named) if name in names):
        if name == cfg.messages_column:
            columns[name], reasons = _conversations([row.get(name) for row in objects], name, reasons)
            continue
        values, why = zip(*(_json_text(row.get(name), name, name == cfg.text_column) for row in objects))
        columns[name] = pa.array(values, pa.string())
        reasons = [r or w for r, w in zip(reasons, why)]
    kept = {name: _json_typed([row.get(name) for row in objects], name) for name in keep if name in names}
    return _Read(names, columns, reasons, replaced, kept)


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


def _kept_arrow(table: pa.Table, name: str) -> pa.ChunkedArray:
    """A kept column as typed in the table (read_dataset's own copy where the table has one: a nightly partition's
    input.parquet); a dictionary column as its values' type."""
    column = table[kept_column(name) if kept_column(name) in table.column_names else name]
    return column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column


def _read_table(ds: Dataset, cfg: DataConfig, named: list[str], keep: list[str] = ()) -> _Read:
    table = ds.with_format("arrow")[:]
    # A column of reasons is read_dataset's own, written with the rows (the nightly job's input.parquet).
    reasons = table[READ_ERROR].to_pylist() if READ_ERROR in table.column_names else [None] * len(table)
    wanted, replaced = _replace_bad_utf8(table.select([name for name in _wanted(cfg, named) if name in table.column_names]))
    columns = {}
    for name in wanted.column_names:
        if name == cfg.messages_column:  # a list of {role, content} structs, or its JSON text
            columns[name], reasons = _conversations(wanted[name].to_pylist(), name, reasons)
            continue
        columns[name], why = _arrow_text(wanted[name], name, name == cfg.text_column)
        reasons = reasons if why is None else [r or w for r, w in zip(reasons, why)]
    names = table.column_names
    kept = {name: _kept_arrow(table, name) for name in keep if name in names or kept_column(name) in names}
    return _Read(names, columns, reasons, replaced, kept)


def _read_saved(path: Path, cfg: DataConfig, named: list[str], keep: list[str] = ()) -> _Read:
    """A directory written by datasets' save_to_disk."""
    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"data.path={cfg.path}: a directory, but not one written by datasets' save_to_disk") from None
    if isinstance(ds, DatasetDict):
        if len(ds) != 1:
            raise UserError(f"data.path={cfg.path} holds several splits ({', '.join(ds)}); save the one to run")
        ds = next(iter(ds.values()))
    return _read_table(ds, cfg, named, keep)


def _read_batch(path: Path, sampling: SamplingConfig) -> _Read:
    """An OpenAI batch input file (splitwiser.openai_batch), as the columns its reader makes."""
    text, replaced = _decode(path)
    names, columns, reasons = read_requests(text, sampling)
    return _Read(names, {name: pa.array(values, pa.string()) for name, values in columns.items()}, reasons, replaced)


def _read_file(path: Path, cfg: DataConfig, named: list[str], keep: list[str] = (),
               sampling: SamplingConfig | None = None) -> _Read:
    suffix = Path(cfg.path).suffix  # the name given, not that of a symbolic link's target
    builder = FORMATS.get(suffix.lower())
    if builder is None:
        raise UserError(f"data.path={cfg.path}: unknown format {suffix!r}; use .csv, .jsonl, .json, .parquet")
    try:
        if builder == "csv":
            return _read_csv(path, cfg, named, keep)
        if builder == "json":
            batch = is_batch_file(cfg.path)  # a Batch API request per line: read as such, whatever data.* say
            return _read_batch(path, sampling or SamplingConfig()) if batch else _read_json(path, cfg, named, keep)
        return _read_table(load_dataset(builder, data_files=str(path), split="train"), cfg, named, keep)
    except OSError:  # read_dataset says what it is
        raise
    except Exception as e:  # a user's file that the reader rejects: say why, in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data.path={cfg.path}: cannot be read as {builder}: {reason}") from None


def _check_columns(cfg: DataConfig, prompt: PromptConfig | None, names: list[str], keep: list[str] = ()) -> None:
    """A UserError, in one line, for a configured, named or kept column that the dataset does not have. The text
    column is needed only where a template names {text} (not with a messages column: the prompt is the
    conversation)."""
    options = ("id_column", "text_column", "messages_column", "reference_column", "max_new_tokens_column",
               "temperature_column")
    text_unused = cfg.messages_column or (prompt and "text" not in prompt_columns(cfg, prompt))
    for option in (o for o in options if not (o == "text_column" and text_unused)):
        column = getattr(cfg, option)
        if column is not None and column not in names:
            raise UserError(f"data.{option}={column}: no such column; the columns are: {', '.join(names)}"
                            + _one_column_hint(names))
    for placeholder, column in (prompt_columns(cfg, prompt) if prompt else {}).items():
        if column not in names:
            raise UserError(f"prompt: the placeholder {{{placeholder}}} names no column of the dataset; "
                            f"the columns are: {', '.join(names)}")
    unknown = [name for name in keep if name not in names and kept_column(name) not in names]
    if unknown:
        raise UserError(f"output.keep_columns: no column {', '.join(unknown)} in the dataset; the columns are: "
                        f"{', '.join(n for n in names if not n.startswith(KEPT) and n != READ_ERROR)}")


def _one_column_hint(names: list[str]) -> str:
    """Where the header read as one column that holds a separator: which, and the option that names it."""
    seen = [candidate for candidate in ",;\t|" if len(names) == 1 and candidate in names[0]]
    return f" (one column: is the separator {seen[0]!r}? give data.delimiter='{seen[0]}')" if seen else ""


def prompt_columns(cfg: DataConfig, prompt: PromptConfig) -> dict[str, str]:
    """placeholder → column, of the templates the job's prompt may use (with a messages column: the instruction's;
    with prompt.style=auto, before the tokenizer says which: chat's and plain's)."""
    chat = {"chat": True, "plain": False}.get(prompt.style)
    return prompt.columns(cfg.text_column, chat, conversation=cfg.messages_column is not None)


def _bad_bytes(read: _Read, columns: list[str], encoding: str) -> list[str | None]:
    """The rows' reasons, with a column's bytes that were not of the encoding as one where a row has none yet."""
    reasons = read.reasons
    name = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
    for column in (c for c in columns if c in read.columns):
        bad = pc.fill_null(pc.match_substring(read.columns[column], REPLACED), False).to_pylist()
        why = f"{column} is not valid {name} (bad bytes shown here as U+FFFD)"
        reasons = [r or (why if b else None) for r, b in zip(reasons, bad)]
    return reasons


def read_dataset(cfg: DataConfig, prompt: PromptConfig | None = None, keep: list[str] = (),
                 sampling: SamplingConfig | None = None) -> Dataset:
    """The configured columns of the input, and those `prompt`'s templates name, as strings (see the module's
    docstring), checked to exist; where a row cannot be used, the column READ_ERROR says why."""
    path = data_path(cfg.path)
    named = list(prompt_columns(cfg, prompt).values()) if prompt else []
    keep = list(keep)
    datasets.disable_progress_bars()
    try:
        read = _read_saved(path, cfg, named, keep) if path.is_dir() else _read_file(path, cfg, named, keep, sampling)
    except OSError as e:  # unreadable: no permission, a directory that vanished, an I/O error
        raise UserError(f"data.path={cfg.path}: {(e.strerror or str(e)).lower()}") from None
    if not read.reasons:
        raise UserError(f"data.path={cfg.path}: the dataset has no rows")
    _check_columns(cfg, prompt, read.names, keep)
    checked = [c for c in (cfg.text_column, cfg.messages_column, *named) if c in read.columns]
    reasons = _bad_bytes(read, list(dict.fromkeys(checked)), cfg.encoding) if read.replaced else read.reasons
    columns = {**read.columns, **{kept_column(name): values for name, values in read.kept.items()},
               **({READ_ERROR: pa.array(reasons, pa.string())} if any(reasons) else {})}
    # A fingerprint of its own: datasets would hash (pickle) the whole table to make one, a copy of it in memory.
    ds = Dataset(pa.table(columns), fingerprint="splitwiser-input")
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    return ds
