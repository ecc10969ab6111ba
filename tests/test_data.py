"""Reading every supported input format, and prompt building."""

import pytest
from datasets import Dataset

from conftest import SAMPLE, job_config, sample_rows
from splitwiser.config import DataConfig
from splitwiser.data import prepare_requests, read_dataset


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


def test_limit_and_integer_ids(tmp_path, default_model):
    ds = Dataset.from_list([{"n": i, "findings": f"finding {i}"} for i in range(5)])
    ds.to_parquet(str(tmp_path / "ints.parquet"))
    cfg = DataConfig(path=str(tmp_path / "ints.parquet"), id_column="n", reference_column=None, limit=3)
    requests, errors = prepare_requests(read_dataset(cfg), cfg, job_config().prompt, default_model.tokenizer,
                                        1000, done_ids={"1"})
    assert sorted(requests["id"]) == ["0", "2"] and len(errors) == 0


def test_prompts_longer_than_the_context_are_set_aside(default_model):
    cfg = DataConfig(path=str(SAMPLE), limit=4)
    requests, errors = prepare_requests(read_dataset(cfg), cfg, job_config().prompt, default_model.tokenizer,
                                        max_prompt_tokens=100, done_ids=set())
    assert len(requests) + len(errors) == 4 and len(errors) >= 1
    assert all("over the 100 that fit the context" in e for e in errors["error"])
    assert all(n <= 100 for n in requests["prompt_tokens"])


def test_chat_prompt_uses_the_instruction_and_the_model_template(default_model):
    cfg = DataConfig(path=str(SAMPLE), limit=1)
    requests, _ = prepare_requests(read_dataset(cfg), cfg, job_config().prompt, default_model.tokenizer, 1000, set())
    prompt = requests["prompt"][0]
    assert prompt.startswith("<|im_start|>system\nYou are a radiologist.")
    assert "Findings: " + sample_rows(1)[0]["findings"] in prompt
    assert prompt.endswith("Impression:<|im_end|>\n<|im_start|>assistant\n")
