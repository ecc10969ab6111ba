"""Rows that hold a conversation (data.messages_column, issue 17): checked row by row, rendered with the model's chat
template (prompt.instruction as the system message only where the conversation has none), special-token strings
in messages encoded as text, from JSON Lines, Parquet lists of structs, saved datasets and CSV JSON text; a job,
its resume and the nightly key."""

import json
from dataclasses import replace
from datetime import date

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from conftest import job_config, run_cli
from splitwiser import nightly
from splitwiser.config import DataConfig
from splitwiser.data import read_dataset
from splitwiser.job import run
from splitwiser.prepare import prepare_requests
from test_data_safety import INJECTION
from test_errors import assert_user_error

USER = {"role": "user", "content": "Findings: Lungs clear.\nImpression:"}
SYSTEM = {"role": "system", "content": "Answer in three words."}
ROWS = [
    {"id": "plain", "site": "north", "messages": [USER]},
    {"id": "own-system", "site": "south", "messages": [SYSTEM, USER]},
    {"id": "turns", "site": "east", "messages": [USER, {"role": "assistant", "content": "Normal chest."},
                                                 {"role": "user", "content": "Shorter?"}]},
]
BAD = {
    "text": ("Hello", "messages is not a list of messages (nor its JSON text: Expecting value)"),
    "object": ({"role": "user", "content": "x"}, "messages is not a list of {role, content} messages"),
    "empty": ([], "messages is an empty conversation"),
    "no-role": ([{"content": "x"}], "messages: message 1 has no role"),
    "no-content": ([SYSTEM, {"role": "user"}], "messages: message 2 has no content"),
    "not-object": (["hi"], "messages: message 1 is not an object with role and content"),
    "tool": ([{"role": "tool", "content": "x"}],
             "messages: message 1 has the role 'tool'; the roles are system, developer, user, assistant"),
    "image": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
              "messages: message 1's content is not text"),
    "last": ([USER, {"role": "assistant", "content": "a"}],
             "messages: the last message is the assistant's, not the user's: nothing to answer"),
    "missing": (None, "empty or missing messages"),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare(default_model, path, prompt=None, max_prompt_tokens=1000, **data):
    cfg = DataConfig(path=str(path), messages_column="messages", reference_column=None, **data)
    prompt = prompt or job_config().prompt
    return prepare_requests(read_dataset(cfg, prompt), cfg, prompt, default_model.tokenizer, max_prompt_tokens, {})


def template(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_a_conversation_is_rendered_with_the_chat_template(tmp_path, default_model):
    tokenizer, prompt = default_model.tokenizer, replace(job_config().prompt, instruction="Site {site}: be brief.")
    requests, errors, _ = prepare(default_model, write_jsonl(tmp_path / "c.jsonl", ROWS), prompt)
    assert len(errors) == 0
    by_id = {r["id"]: r for r in requests}
    system = {"role": "system", "content": "Site north: be brief."}
    assert by_id["plain"]["prompt"] == template(tokenizer, [system, USER])
    assert by_id["own-system"]["prompt"] == template(tokenizer, [SYSTEM, USER])  # its own: the instruction is not added
    assert by_id["turns"]["prompt"] == template(tokenizer, [{**system, "content": "Site east: be brief."},
                                                            *ROWS[2]["messages"]])
    for r in requests:
        assert r["input_ids"] == tokenizer(r["prompt"], add_special_tokens=False).input_ids


def test_conversations_are_checked_row_by_row(tmp_path, default_model):
    rows = [ROWS[0], *({"id": name, "messages": value} for name, (value, _) in BAD.items())]
    rows[-1].pop("messages")
    requests, errors, _ = prepare(default_model, write_jsonl(tmp_path / "c.jsonl", rows))
    assert requests["id"][:] == ["plain"]
    assert dict(zip(errors["id"][:], errors["error"][:])) == {name: why for name, (_, why) in BAD.items()}


def test_special_token_strings_in_messages_are_text(tmp_path, default_model):
    rows = [ROWS[0], {"id": "evil", "messages": [{**SYSTEM, "content": INJECTION}, {**USER, "content": INJECTION}]},
            {"id": "clean", "messages": [SYSTEM, USER]}]
    requests, _, _ = prepare(default_model, write_jsonl(tmp_path / "c.jsonl", rows))
    by_id = {r["id"]: r for r in requests}
    specials = set(default_model.tokenizer.all_special_ids)
    special = lambda r: [t for t in r["input_ids"] if t in specials]  # noqa: E731
    assert special(by_id["evil"]) == special(by_id["clean"])  # only the template's own turns
    assert default_model.tokenizer.decode(by_id["evil"]["input_ids"]) == by_id["evil"]["prompt"]
    assert INJECTION in by_id["evil"]["prompt"]


def test_parquet_saved_datasets_and_csv_hold_the_same_conversations(tmp_path, default_model):
    """A Parquet list<struct<role, content>>, a datasets list, and a CSV cell of JSON text read the same."""
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({"id": [r["id"] for r in ROWS], "messages": pa.array([r["messages"] for r in ROWS], messages)})
    pq.write_table(table, tmp_path / "c.parquet")
    Dataset(table).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "c.csv").write_text("id,messages\n" + "".join(
        f'{r["id"]},"{json.dumps(r["messages"]).replace(chr(34), chr(34) * 2)}"\n' for r in ROWS))
    prompts = [sorted(prepare(default_model, tmp_path / name).requests["prompt"][:])
               for name in ("c.parquet", "saved", "c.csv")]
    expected = sorted(prepare(default_model, write_jsonl(tmp_path / "c.jsonl", ROWS)).requests["prompt"][:])
    assert prompts == [expected] * 3


def test_truncation_cuts_the_longest_message(tmp_path, default_model):
    long = {"role": "user", "content": "Chronic cough. " * 60}
    rows = [{"id": "long", "messages": [SYSTEM, {"role": "user", "content": "Short."},
                                        {"role": "assistant", "content": "OK."}, long]}]
    prompt = replace(job_config().prompt, too_long="truncate")
    requests, errors, _ = prepare(default_model, write_jsonl(tmp_path / "c.jsonl", rows), prompt, max_prompt_tokens=60)
    assert len(errors) == 0 and requests[0]["prompt_truncated"] and requests[0]["prompt_tokens"] <= 60
    assert "Answer in three words." in requests[0]["prompt"] and "Short." in requests[0]["prompt"]
    prompt = replace(prompt, too_long="error")
    _, errors, _ = prepare(default_model, tmp_path / "c.jsonl", prompt, max_prompt_tokens=60)
    assert errors["error"][0].startswith("prompt has ")


def test_a_messages_job_runs_resumes_and_keeps_its_columns(tmp_path):
    """No findings column: the prompt is the conversation. A rerun generates nothing; the fingerprint holds the
    messages column."""
    data = write_jsonl(tmp_path / "c.jsonl", [{**row, "age": 60 + i} for i, row in enumerate(ROWS)]
                       + [{"id": "last", "messages": BAD["last"][0]}])
    options = [f"data.path={data}", "data.messages_column=messages", "data.reference_column=null",
               f"output.dir={tmp_path}/out", "engine.max_new_tokens=3", "output.keep_columns=[age,site]"]
    manifest = run(job_config(*options))
    assert manifest["rows"] == {"input": 4, "ok": 3, "failed": 1}
    assert manifest["fingerprint"]["messages_column"] == "messages"
    generations = pq.read_table(tmp_path / "out" / "generations.parquet")
    assert generations.schema.field("age").type == pa.int64()
    assert {r["id"]: (r["age"], r["site"]) for r in generations.to_pylist()} == {
        "own-system": (61, "south"), "plain": (60, "north"), "turns": (62, "east")}
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert [(e["id"], e["error"]) for e in errors] == [("last", BAD["last"][1])]
    again = run(job_config(*options))
    assert again["runs"][-1]["rows_generated"] == 0 and again["rows"] == manifest["rows"]


def test_a_nightly_key_follows_the_conversation(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", ROWS[:2])
    job = job_config(f"data.path={data}", "data.messages_column=messages", "data.reference_column=null",
                     f"output.dir={tmp_path}/nightly", "engine.max_new_tokens=2", "output.keep_columns=[site]")
    assert nightly.nightly(job, date(2026, 1, 1))[-1]["rows"] == {"input": 2, "ok": 2, "failed": 0}
    write_jsonl(data, [ROWS[0], {**ROWS[1], "messages": [SYSTEM, {**USER, "content": "Findings: Effusion."}]}])
    [second] = nightly.nightly(job, date(2026, 1, 2))
    assert second["rows"] == {"input": 1, "ok": 1, "failed": 0}
    generated = pq.read_table(tmp_path / "nightly" / "2026-01-02" / "generations.parquet").to_pylist()
    assert [(g["id"], g["site"]) for g in generated] == [("own-system", "south")]
    assert "Findings: Effusion." in generated[0]["prompt"]


def test_an_unknown_messages_column_lists_the_columns(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", ROWS)
    assert_user_error(run_cli(f"data.path={data}", f"output.dir={tmp_path}/o", "data.messages_column=conversation"),
                      "data.messages_column=conversation: no such column; the columns are: id, site, messages")
    assert not (tmp_path / "o").exists()
