"""Reading every supported input format, and prompt building."""

import json
import re
from dataclasses import replace

import pytest
from datasets import Dataset

from conftest import SAMPLE, job_config, sample_rows, write_csv
from splitwiser.config import DataConfig
from splitwiser.data import read_dataset
from splitwiser.errors import UserError
from splitwiser.prepare import prepare_requests


@pytest.fixture
def rows():
    return sample_rows(5)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "disk"])
def test_each_format_reads_the_same_rows(tmp_path, rows, fmt):
    ds = Dataset.from_list(rows)
    path = tmp_path / f"rows.{fmt}"
    {"csv": ds.to_csv, "jsonl": ds.to_json, "parquet": ds.to_parquet, "disk": ds.save_to_disk}[fmt](str(path))
    loaded = read_dataset(DataConfig(path=str(path)))
    assert loaded["id"] == [r["id"] for r in rows]
    assert loaded["findings"] == [r["findings"] for r in rows]


@pytest.mark.parametrize("column", ["n", "id"])  # "id": the requests' own id column has the same name
def test_limit_and_integer_ids(tmp_path, default_model, column):
    ds = Dataset.from_list([{column: i, "findings": f"finding {i}"} for i in range(5)])
    ds.to_parquet(str(tmp_path / "ints.parquet"))
    cfg = DataConfig(path=str(tmp_path / "ints.parquet"), id_column=column, reference_column=None, limit=3)
    first = prepare_requests(read_dataset(cfg), cfg, job_config().prompt, default_model.tokenizer, 1000, done={})
    done = {("1", 0): dict(zip(first.requests["id"], first.requests["prompt"]))["1"]}
    requests, errors, reused = prepare_requests(read_dataset(cfg), cfg, job_config().prompt, default_model.tokenizer,
                                                1000, done=done)
    assert sorted(requests["id"]) == ["0", "2"] and len(errors) == 0 and reused == [("1", 0)]
    assert requests.features["id"].dtype == "string"  # what generations.parquet holds


class CountingTokenizer:
    """The real tokenizer, counting the texts it is asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encoded = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.encoded += 1 if isinstance(texts, str) else len(texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_rerun_tokenizes_only_the_rows_without_a_generation_of_their_prompt_on_disk(default_model):
    cfg, prompt = DataConfig(path=str(SAMPLE), limit=20), job_config().prompt
    first = prepare_requests(read_dataset(cfg), cfg, prompt, default_model.tokenizer, 1000, done={})
    prompts = dict(zip(first.requests["id"], first.requests["prompt"]))
    changed, missing = sorted(prompts)[3], sorted(prompts)[7]
    done = {(row_id, 0): text + (" (an older text)" if row_id == changed else "")
            for row_id, text in prompts.items() if row_id != missing}
    counting = CountingTokenizer(default_model.tokenizer)
    requests, errors, reused = prepare_requests(read_dataset(cfg), cfg, prompt, counting, 1000, done=done)
    assert sorted(requests["id"]) == sorted([changed, missing]) and len(errors) == 0 and len(reused) == 18
    assert counting.encoded == 2
    again = dict(zip(requests["id"], requests["input_ids"]))
    assert again == {row_id: ids for row_id, ids in zip(first.requests["id"], first.requests["input_ids"])
                     if row_id in again}


def test_prompts_longer_than_the_context_are_set_aside(default_model):
    cfg = DataConfig(path=str(SAMPLE), limit=4)
    requests, errors, _ = prepare_requests(read_dataset(cfg), cfg, job_config().prompt, default_model.tokenizer,
                                           max_prompt_tokens=100, done={})
    assert len(requests) + len(errors) == 4 and len(errors) >= 1
    assert all("over the 100 that fit the context" in e for e in errors["error"])
    assert all(n <= 100 for n in requests["prompt_tokens"])


def test_too_long_prompts_are_truncated_to_fit_when_asked(default_model):
    cfg = DataConfig(path=str(SAMPLE), limit=4)
    prompt = replace(job_config().prompt, too_long="truncate")
    requests, errors, _ = prepare_requests(read_dataset(cfg), cfg, prompt, default_model.tokenizer,
                                           max_prompt_tokens=100, done={})
    assert len(errors) == 0 and len(requests) == 4
    truncated = [r for r in requests if r["prompt_truncated"]]
    assert truncated and len(truncated) < 4
    for r in requests:
        assert r["prompt_tokens"] == len(r["input_ids"]) <= 100
        assert r["input_ids"] == default_model.tokenizer(r["prompt"], add_special_tokens=False).input_ids
        assert r["prompt"].endswith("Impression:<|im_end|>\n<|im_start|>assistant\n")  # the template is kept whole
    for r in truncated:
        assert r["prompt_tokens"] > 90  # cut only as much as needed


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_with_bytes_that_are_not_utf8_go_to_errors(tmp_path, default_model, fmt):
    rows = sample_rows(3)
    rows[1]["findings"] = "Lungs clear. BAD-BYTES here."
    path = tmp_path / f"rows.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.write_bytes(path.read_bytes().replace(b"BAD-BYTES", b"\xff\xfe\x80"))  # Latin-1 junk, not UTF-8

    cfg = DataConfig(path=str(path))
    requests, errors, _ = prepare_requests(read_dataset(cfg), cfg, job_config().prompt, default_model.tokenizer,
                                           1000, done={})
    assert sorted(requests["id"]) == [rows[0]["id"], rows[2]["id"]]
    assert errors["id"] == [rows[1]["id"]]
    assert errors["error"] == ["findings is not valid UTF-8 (bad bytes shown here as U+FFFD)"]
    assert "\ufffd" not in "".join(requests["prompt"])


def test_chat_prompt_uses_the_instruction_and_the_model_template(default_model):
    cfg = DataConfig(path=str(SAMPLE), limit=1)
    requests = prepare_requests(read_dataset(cfg), cfg, job_config().prompt, default_model.tokenizer, 1000, {}).requests
    prompt = requests["prompt"][0]
    assert prompt.startswith("<|im_start|>system\nYou are a radiologist.")
    assert "Findings: " + sample_rows(1)[0]["findings"] in prompt
    assert prompt.endswith("Impression:<|im_end|>\n<|im_start|>assistant\n")


def excel_csv(path, rows, encoding: str, bom: bool = False):
    """A CSV as Excel writes it in much of Europe: `;` between fields, CRLF line ends, decimal commas, an accented
    text in each row; in `encoding`, with a UTF-8 BOM first where asked."""
    lines = ["id;findings;impression;size_cm"] + [
        f'{r["id"]};"{r["findings"]} Épanchement pleural, côté droit; {n},5 cm.";{r["impression"]};{n},5'
        for n, r in enumerate(rows)]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\r\n".join(lines).encode(encoding) + b"\r\n")
    return path


@pytest.mark.parametrize("encoding, bom", [("utf-8", True), ("cp1252", False)], ids=["utf8_bom", "windows_1252"])
def test_a_csv_as_excel_writes_it_in_europe_reads_every_row_as_written(tmp_path, rows, encoding, bom):
    path = excel_csv(tmp_path / "excel.csv", rows, encoding, bom)
    loaded = read_dataset(DataConfig(path=str(path), encoding=encoding))  # the separator from the header line
    assert loaded["id"] == [r["id"] for r in rows] and "__splitwiser_read_error__" not in loaded.column_names
    assert loaded["findings"] == [f'{r["findings"]} Épanchement pleural, côté droit; {n},5 cm.'
                                  for n, r in enumerate(rows)]
    assert loaded["impression"] == [r["impression"] for r in rows]  # no \r left at the line ends


def test_a_windows_1252_csv_read_as_utf8_sets_its_accented_rows_aside_saying_so(tmp_path, rows):
    loaded = read_dataset(DataConfig(path=str(excel_csv(tmp_path / "excel.csv", rows, "cp1252"))))
    assert loaded["__splitwiser_read_error__"] == ["findings is not valid UTF-8 (bad bytes shown here as U+FFFD)"] * 5


@pytest.mark.parametrize("options, message", [
    ({"delimiter": ","}, "data.id_column=id: no such column; the columns are: id;findings;impression;size_cm "
                         "(one column: is the separator ';'? give data.delimiter=';')"),
    ({"delimiter": "ab"}, "data.delimiter='ab': must be one character"),
    ({"encoding": "klingon"}, "data.encoding=klingon: no such encoding"),
])
def test_a_wrong_separator_or_encoding_is_one_line_naming_the_fix(tmp_path, rows, options, message):
    path = excel_csv(tmp_path / "excel.csv", rows, "utf-8")
    with pytest.raises(UserError, match=re.escape(message)):
        read_dataset(DataConfig(path=str(path), **options))
