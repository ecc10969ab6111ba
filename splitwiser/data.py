"""Read → validate → prompt → tokenize → Arrow shards.

Rows that cannot be generated (no id, a duplicate id, empty text, text that is not valid UTF-8,
a prompt longer than the model's context unless prompt.too_long=truncate) come back as errors
with a reason; nothing is dropped silently.
"""

import math
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, Sequence, Value, load_dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from splitwiser.config import DataConfig, PromptConfig, UserError
from splitwiser.output import unwritable

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
REPLACED = "\ufffd"  # what stands for bytes that are not UTF-8
BAD_UTF8 = "__splitwiser_bad_utf8__"  # read_dataset's flag column: the row's text had such bytes


def _load_file(path: Path, builder: str) -> tuple[Dataset, bool]:
    """load_dataset → (rows, whether bytes that are not UTF-8 were replaced by U+FFFD): one bad row must not
    reject the file. CSV is re-read with errors="replace"; JSON and Parquet keep such bytes in their string
    columns (and fail later, when read), so those columns are decoded again with errors="replace"."""
    try:
        ds = load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        if builder == "csv" and isinstance(e.__cause__, UnicodeDecodeError):
            return load_dataset(builder, data_files=str(path), split="train", encoding_errors="replace"), True
        raise
    table = ds.data.table
    try:
        table.validate(full=True)
        return ds, False
    except pa.ArrowInvalid:
        pass
    for name in table.column_names:
        if pa.types.is_string(table.schema.field(name).type):
            raw = table[name].cast(pa.binary()).to_pylist()
            ds = ds.remove_columns(name).add_column(name, [None if v is None else v.decode(errors="replace") for v in raw])
    return ds.select_columns(table.column_names), True


def read_dataset(cfg: DataConfig) -> Dataset:
    """Loads the input with `datasets` and checks that the configured columns exist."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"data.path={cfg.path}: no such file or directory")
    datasets.disable_progress_bars()
    replaced = False
    if path.is_dir():
        try:
            ds = load_from_disk(str(path))
        except FileNotFoundError:
            raise UserError(f"data.path={cfg.path}: a directory, but not one written by datasets' save_to_disk") from None
        if isinstance(ds, DatasetDict):
            if len(ds) != 1:
                raise UserError(f"data.path={cfg.path} holds several splits ({', '.join(ds)}); save the one to run")
            ds = next(iter(ds.values()))
    else:
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"data.path={cfg.path}: unknown format {path.suffix!r}; use .csv, .jsonl, .json, .parquet")
        try:
            ds, replaced = _load_file(path, builder)
        except Exception as e:  # a user's file that the reader rejects: say why, in one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "corresponds to no data" in reason:  # what datasets says of a file with a header only
                raise UserError(f"data.path={cfg.path}: the dataset has no rows") from None
            raise UserError(f"data.path={cfg.path}: cannot be read as {builder}: {reason}") from None
    if len(ds) == 0:
        raise UserError(f"data.path={cfg.path}: the dataset has no rows")
    for option in ("id_column", "text_column", "reference_column"):
        column = getattr(cfg, option)
        if column is not None and column not in ds.column_names:
            raise UserError(f"data.{option}={column}: no such column; the columns are: {', '.join(ds.column_names)}")
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if replaced:
        ds = ds.add_column(BAD_UTF8, [isinstance(t, str) and REPLACED in t for t in ds[cfg.text_column]])
    return ds


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


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


def prepare_requests(
    ds: Dataset,
    data: DataConfig,
    prompt: PromptConfig,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    done_ids: set[str],
) -> tuple[Dataset, Dataset]:
    """Returns (requests sorted by prompt length, errors) for the rows of data.part, leaving out ids
    in done_ids. Ids are checked over the whole dataset, so a duplicate in another part is caught.

    A request has: id, reference (if configured), prompt, input_ids, prompt_tokens, prompt_truncated.
    """
    ids = [str(i) for i in range(len(ds))] if data.id_column is None else [  # [:]: a column at once, not row by row
        None if _missing(v) or str(v).strip() == "" else str(v) for v in ds.select_columns(data.id_column)[:][data.id_column]]
    first_row = {}
    for index, row_id in enumerate(ids):
        first_row.setdefault(row_id, index)
    adds_special = not uses_chat(prompt, tokenizer)  # a chat template writes its own special tokens

    def tokenize(texts: list[str]) -> tuple[list[str], list[list[int]]]:
        """Prompts and their token ids, in one call: the fast tokenizer encodes a batch in parallel."""
        if not texts:  # a batch whose every row is an error: the tokenizer and the chat template refuse []
            return [], []
        prompt_texts = build_prompts(texts, prompt, tokenizer)
        return prompt_texts, tokenizer(prompt_texts, add_special_tokens=adds_special).input_ids

    def fit(text: str, prompt_text: str, token_ids: list[int]) -> tuple[str, list[int], bool] | str:
        """(prompt, its token ids, whether the text was truncated), or why the row cannot be generated."""
        if len(token_ids) <= max_prompt_tokens:
            return prompt_text, token_ids, False
        if prompt.too_long == "error":
            return f"prompt has {len(token_ids)} tokens, over the {max_prompt_tokens} that fit the context"
        text_ids = tokenizer(text, add_special_tokens=False).input_ids
        keep = len(text_ids) - (len(token_ids) - max_prompt_tokens)
        while keep > 0:  # tokens may merge differently at the cut: shorten until it fits
            [prompt_text], [token_ids] = tokenize([tokenizer.decode(text_ids[:keep])])
            if len(token_ids) <= max_prompt_tokens:
                return prompt_text, token_ids, True
            keep -= len(token_ids) - max_prompt_tokens
        return f"the prompt without its text is over the {max_prompt_tokens} tokens that fit the context"

    def row_error(index: int, row_id: str | None, text, bad_utf8: bool) -> str | None:
        if row_id is None:
            return "missing id"
        if first_row[row_id] != index:
            return f"duplicate id (first seen at row {first_row[row_id]})"
        if _missing(text) or not isinstance(text, str) or not text.strip():
            return f"empty or missing {data.text_column}"
        if bad_utf8:
            return f"{data.text_column} is not valid UTF-8 (bad bytes shown here as U+FFFD)"
        return None

    def to_request(batch: dict, indices: list[int]) -> dict:
        out = {"id": [], "prompt": [], "input_ids": [], "prompt_tokens": [], "prompt_truncated": [], "error": []}
        if data.reference_column:
            out["reference"] = [None if _missing(v) else str(v) for v in batch[data.reference_column]]
        rows = [part.start + i for i in indices]
        bad_utf8 = batch.get(BAD_UTF8, [False] * len(indices))
        errors = [row_error(index, ids[index], text, bad) for index, text, bad in zip(rows, batch[data.text_column], bad_utf8)]
        texts = [text.strip() for text, error in zip(batch[data.text_column], errors) if error is None]
        tokenized = zip(texts, *tokenize(texts))
        for index, error in zip(rows, errors):
            fitted = fit(*next(tokenized)) if error is None else error
            if isinstance(fitted, str):  # why the row cannot be generated
                error, fitted = fitted, ("", [], False)
            prompt_text, token_ids, truncated = fitted
            out["id"].append(ids[index] or f"row:{index}")
            out["prompt"].append(prompt_text)
            out["input_ids"].append(token_ids)
            out["prompt_tokens"].append(len(token_ids))
            out["prompt_truncated"].append(truncated)
            out["error"].append(error)
        return out

    part = data.part_rows(len(ds))
    # Typed: map would otherwise keep an input column's type for an output of the same name (numeric ids).
    features = Features({"id": Value("string"), "prompt": Value("string"), "input_ids": Sequence(Value("int32")),
                         "prompt_tokens": Value("int32"), "prompt_truncated": Value("bool"), "error": Value("string"),
                         **({"reference": Value("string")} if data.reference_column else {})})
    prepared = ds.select(part).map(to_request, batched=True, with_indices=True, remove_columns=ds.column_names,
                                   features=features)
    # Batched: a filter calls its function once per 1,000 rows instead of once per row.
    if done_ids:
        prepared = prepared.filter(lambda row_ids: [i not in done_ids for i in row_ids], input_columns="id", batched=True)
    errors = prepared.filter(lambda errors: [e is not None for e in errors], input_columns="error", batched=True)
    requests = prepared.filter(lambda errors: [e is None for e in errors], input_columns="error", batched=True)
    errors, requests = errors.select_columns(["id", "error"]), requests.remove_columns("error")
    return requests.sort("prompt_tokens"), errors


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
