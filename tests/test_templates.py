"""Prompt templates over any columns of the dataset (issue 17): `{indication}`, `{findings}`, ... beside `{text}`."""

import copy
import hashlib
import json
from dataclasses import replace
from datetime import date

import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, job_config, run_cli, sample_rows, write_csv
from splitwiser import nightly
from splitwiser.config import DataConfig, PromptConfig
from splitwiser.data import read_dataset
from splitwiser.errors import UserError
from splitwiser.job import fingerprint
from splitwiser.prepare import build_prompts, prepare_requests
from test_data_safety import INJECTION
from test_errors import assert_user_error

TEMPLATE = "Indication: {indication}\nComparison: {comparison}\nFindings: {text}\n### impressions:"
ROWS = [{"id": "r1", "indication": "Cough.", "comparison": "None.", "findings": "Lungs clear.", "impression": "ok"},
        {"id": "r2", "indication": "Fever", "comparison": "2020 film", "findings": "Small effusion.", "impression": ""},
        {"id": "r3", "indication": "Pain", "comparison": "", "findings": "Normal heart.", "impression": "x"}]


def prepare(default_model, path, prompt, max_prompt_tokens=1000, **data):
    cfg = DataConfig(path=str(path), **data)
    return prepare_requests(read_dataset(cfg, prompt), cfg, prompt, default_model.tokenizer, max_prompt_tokens, {})


def plain(template=TEMPLATE, **options):
    return replace(job_config().prompt, style="plain", template=template, **options)


def test_a_template_names_any_columns(tmp_path, default_model):
    requests, errors, _ = prepare(default_model, write_csv(tmp_path / "r.csv", ROWS), plain())
    by_id = {r["id"]: r for r in requests}
    assert by_id["r1"]["prompt"] == "Indication: Cough.\nComparison: None.\nFindings: Lungs clear.\n### impressions:"
    assert by_id["r2"]["input_ids"] == default_model.tokenizer(by_id["r2"]["prompt"]).input_ids
    assert errors[:] == {"id": ["r3"], "error": ["empty or missing comparison"]}


def test_chat_message_and_instruction_name_columns(tmp_path, default_model):
    prompt = replace(job_config().prompt, style="chat", instruction="Indication: {indication}.",
                     chat_message="Findings: {findings}\nImpression:")
    requests, _, _ = prepare(default_model, write_csv(tmp_path / "r.csv", ROWS[:1]), prompt)
    assert "Indication: Cough.." in requests[0]["prompt"] and "Findings: Lungs clear.\n" in requests[0]["prompt"]
    ids = default_model.tokenizer(requests[0]["prompt"], add_special_tokens=False).input_ids
    assert requests[0]["input_ids"] == ids


def test_a_template_over_three_columns_of_the_sample(default_model):
    requests, errors, _ = prepare(default_model, SAMPLE, plain(), limit=3)
    rows = {row["id"]: row for row in sample_rows(3)}
    for request in requests:
        row = rows[request["id"]]
        assert request["prompt"] == TEMPLATE.format(text=row["findings"], indication=row["indication"],
                                                    comparison=row["comparison"])
    assert len(requests) == 3 and not len(errors)


def test_the_text_column_is_needed_only_where_a_template_names_text(tmp_path, default_model):
    rows = [{"id": row["id"], "report": row["findings"], "indication": row["indication"]} for row in ROWS[:2]]
    requests, errors, _ = prepare(default_model, write_csv(tmp_path / "r.csv", rows),
                                  plain("Indication: {indication}\nReport: {report}\n### impressions:"),
                                  reference_column=None)  # no `findings` column (data.text_column's default)
    prompts = dict(zip(requests["id"], requests["prompt"]))
    assert sorted(prompts) == ["r1", "r2"] and "Report: Lungs clear." in prompts["r1"] and not len(errors)


def test_template_columns_end_to_end(tmp_path):
    data = write_csv(tmp_path / "r.csv", ROWS)
    result = run_cli(f"data.path={data}", f"output.dir={tmp_path}/out", "engine.max_new_tokens=2", "prompt.style=plain",
                     f"prompt.template='{TEMPLATE}'")
    assert result.returncode == 0, result.stderr
    generated = {r["id"]: r["prompt"] for r in pq.read_table(tmp_path / "out" / "generations.parquet").to_pylist()}
    assert generated["r2"] == "Indication: Fever\nComparison: 2020 film\nFindings: Small effusion.\n### impressions:"
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert errors == [{"id": "r3", "sample": None, "error": "empty or missing comparison"}]


def test_an_unknown_placeholder_lists_the_columns(tmp_path):
    data = write_csv(tmp_path / "r.csv", ROWS)
    assert_user_error(run_cli(f"data.path={data}", f"output.dir={tmp_path}/o", "prompt.style=plain",
                              "prompt.template='{text} {history}'"),
                      "the placeholder {history} names no column",
                      "the columns are: id, indication, comparison, findings, impression")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("template, message", [
    ("no placeholder", "prompt.template has no placeholder"),
    ("{text:>9}", "prompt.template: {text:>9} is not a column's name"),
    ("{0}", "prompt.template: {0} is not a column's name"),
    ("{text", "prompt.template: expected '}' before end of string"),
])
def test_a_template_must_name_columns(template, message):
    with pytest.raises(UserError, match="^" + message.replace("{", r"\{").replace("}", r"\}")
                       .replace("(", r"\(").replace(".", r"\.")):
        PromptConfig(template=template)


def test_truncation_cuts_the_longest_value(tmp_path, default_model):
    rows = [{**ROWS[0], "indication": "Chronic cough. " * 40}]
    requests, errors, _ = prepare(default_model, write_csv(tmp_path / "r.csv", rows), plain(too_long="truncate"),
                                  max_prompt_tokens=60)
    assert len(errors) == 0 and requests[0]["prompt_truncated"] and requests[0]["prompt_tokens"] <= 60
    prompt = requests[0]["prompt"]
    assert prompt.startswith("Indication: Chronic cough.") and "Chronic cough. " * 40 not in prompt
    assert prompt.endswith("\nComparison: None.\nFindings: Lungs clear.\n### impressions:")


def test_special_token_strings_in_any_column_are_text(tmp_path, default_model):
    rows = [{**ROWS[0], "indication": INJECTION}, ROWS[1]]
    prompt = replace(job_config().prompt, style="chat", chat_message=TEMPLATE)
    requests, _, _ = prepare(default_model, write_csv(tmp_path / "r.csv", rows), prompt)
    evil, clean = sorted(requests, key=lambda r: r["id"])
    specials = set(default_model.tokenizer.all_special_ids)
    assert [t for t in evil["input_ids"] if t in specials] == [t for t in clean["input_ids"] if t in specials]
    assert INJECTION[:15] in evil["prompt"] and default_model.tokenizer.decode(evil["input_ids"]) == evil["prompt"]


def test_a_number_in_a_named_json_column_keeps_its_written_form(tmp_path, default_model):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "age": 63.0, "findings": "x"}\n')
    requests, _, _ = prepare(default_model, path, plain("Age {age}: {text}"), reference_column=None)
    assert requests[0]["prompt"] == "Age 63.0: x"


@pytest.mark.parametrize("style, digest", [
    ("chat", "69d9adc951a73aff5814f83001246cbe912567ed3081b683dfa6b987cfecb8fa"),
    ("plain", "baa349da2beaa4345e134a58113b08d3fba86e9438f9d0e8cbd43fc91af3396e"),
])
def test_the_default_prompts_are_unchanged(default_model, style, digest):
    """The digest of the prompts and token ids that the code before issue 17 made of data/radiology.csv."""
    requests, _, _ = prepare(default_model, SAMPLE, replace(job_config().prompt, style=style))
    rows = sorted((r["id"], r["prompt"], r["input_ids"], r["prompt_truncated"]) for r in requests)
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest() == digest


def test_a_nightly_key_follows_every_named_column(tmp_path):
    """A changed indication makes a row new (the job of the night prompts with it); the default key is the one
    before issue 17."""
    data = write_csv(tmp_path / "r.csv", ROWS)
    job = job_config(f"data.path={data}", f"output.dir={tmp_path}/out", "prompt.style=plain", "engine.max_new_tokens=2",
                     f"prompt.template='{TEMPLATE}'")
    assert nightly.nightly(job, date(2026, 1, 1))[-1]["rows"] == {"input": 3, "ok": 2, "failed": 1}
    write_csv(data, [{**ROWS[0], "indication": "Fever."}, *ROWS[1:]])
    [second] = nightly.nightly(job, date(2026, 1, 2))
    assert second["rows"] == {"input": 1, "ok": 1, "failed": 0}
    prompts = pq.read_table(tmp_path / "out" / "2026-01-02" / "generations.parquet")["prompt"].to_pylist()
    assert prompts == [TEMPLATE.format(indication="Fever.", comparison="None.", text="Lungs clear.")]

    default = job_config()
    salt = json.dumps({k: v for k, v in fingerprint(default).items() if k not in ("data", "part")}, sort_keys=True)
    before = hashlib.sha256(json.dumps([salt, "r1", "x"]).encode()).hexdigest()
    assert nightly.row_keys(default, ["r1"], ["x"]) == [before]


@pytest.mark.parametrize("content", ["message['content'] | upper",  # changes every value: PROBES show it
                                     "('FLAGGED ' if 'effusion' in message['content'] else '') + message['content']"])
def test_a_chat_template_that_changes_or_inspects_values_renders_each_row(default_model, content):
    """Prompts are made by filling the template rendered once with the row's values, where the template puts
    values in as they are; one that changes a value (PROBES) or inspects it (seen in a batch's first rows: here
    the sample's third report has an effusion) is rendered for each row: every prompt is the template's own."""
    tokenizer = copy.deepcopy(default_model.tokenizer)
    tokenizer.chat_template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ " + content +
                               " }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                               "{% endif %}")
    prompt = replace(job_config().prompt, style="chat")
    cfg = DataConfig(path=str(SAMPLE), limit=200)
    requests = prepare_requests(read_dataset(cfg, prompt), cfg, prompt, tokenizer, 1000, {}).requests
    findings = {row["id"]: row["findings"].strip() for row in sample_rows(200)}
    assert len(requests) > 150
    for request in requests:
        assert request["prompt"] == build_prompts([findings[request["id"]]], prompt, tokenizer)[0]
    assert any("FLAGGED" in r["prompt"] or "LUNGS" in r["prompt"] for r in requests)
