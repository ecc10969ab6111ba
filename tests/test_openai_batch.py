"""OpenAI Batch API files in and out (issue 17): a batch input file read as requests, refused fields per row, and
results.jsonl checked line by line against the documented output lines (OpenAI's batch guide and API reference)."""

import json

import pyarrow.parquet as pq
import pytest

from conftest import job_config, run_cli
from splitwiser.config import SamplingConfig
from splitwiser.job import run
from splitwiser.openai_batch import is_batch_file, read_requests
from test_errors import assert_user_error

# The documented example lines, verbatim. Input: the batch guide's "Preparing your batch file"; the completion
# request is the API reference's "Create completion" example body.
DOC_INPUT = [
    '{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-3.5-turbo-0125", '
    '"messages": [{"role": "system", "content": "You are a helpful assistant."},{"role": "user", "content": '
    '"Hello world!"}],"max_tokens": 1000}}',
    '{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-3.5-turbo-0125", '
    '"messages": [{"role": "system", "content": "You are an unhelpful assistant."},{"role": "user", "content": '
    '"Hello world!"}],"max_tokens": 1000}}',
]
DOC_COMPLETION_BODY = '{"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 7, "temperature": 0}'
# Output: the batch guide's output file (a chat.completion each), and the openapi spec's BatchRequestOutput example.
DOC_CHAT_OUTPUT = [
    '{"id": "batch_req_123", "custom_id": "request-2", "response": {"status_code": 200, "request_id": "req_123", "body": '
    '{"id": "chatcmpl-123", "object": "chat.completion", "created": 1711652795, "model": "gpt-3.5-turbo-0125", '
    '"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "logprobs": null, "finish_reason": '
    '"stop"}], "usage": {"prompt_tokens": 22, "completion_tokens": 2, "total_tokens": 24}, "system_fingerprint": '
    '"fp_123"}}, "error": null}',
    '{"id": "batch_req_456", "custom_id": "request-1", "response": {"status_code": 200, "request_id": "req_789", "body": '
    '{"id": "chatcmpl-abc", "object": "chat.completion", "created": 1711652789, "model": "gpt-3.5-turbo-0125", '
    '"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I assist you today?"}, '
    '"logprobs": null, "finish_reason": "stop"}], "usage": {"prompt_tokens": 20, "completion_tokens": 9, '
    '"total_tokens": 29}, "system_fingerprint": "fp_3ba"}}, "error": null}',
    '{"id": "batch_req_wnaDys", "custom_id": "request-2", "response": {"status_code": 200, "request_id": "req_c187b3", '
    '"body": {"id": "chatcmpl-9758Iw", "object": "chat.completion", "created": 1711475054, "model": "gpt-4o-mini", '
    '"choices": [{"index": 0, "message": {"role": "assistant", "content": "2 + 2 equals 4."}, "finish_reason": "stop"}], '
    '"usage": {"prompt_tokens": 24, "completion_tokens": 15, "total_tokens": 39}, "system_fingerprint": null}}, '
    '"error": null}',
]
# The API reference's completion object (Create completion's response), as a batch output line's body.
DOC_TEXT_COMPLETION = (
    '{"id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7", "object": "text_completion", "created": 1589478378, "model": '
    '"gpt-3.5-turbo-instruct", "system_fingerprint": "fp_44709d6fcb", "choices": [{"text": "\\n\\nThis is indeed a test", '
    '"index": 0, "logprobs": null, "finish_reason": "length"}], "usage": {"prompt_tokens": 5, "completion_tokens": 7, '
    '"total_tokens": 12}}')
# The spec's BatchRequestOutput.error: {code, message}, with response null.
DOC_ERROR_OUTPUT = ('{"id": "batch_req_abcxyz", "custom_id": "request-3", "response": null, "error": '
                    '{"code": "invalid_request_error", "message": "Invalid model ID provided."}}')
# Fields a documented line may leave out that ours have: the chat message's refusal (null; the API's real lines
# carry it), the choice's logprobs (the spec's example leaves it out).
OPTIONAL = {"refusal", "logprobs"}


def request(custom_id: str, url: str = "/v1/chat/completions", **body) -> str:
    if url == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "Hello world!"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def with_max_tokens(line: str, max_tokens: int) -> str:
    request = json.loads(line)
    request["body"]["max_tokens"] = max_tokens
    return json.dumps(request)


def same_shape(ours, documented, where: str = "line") -> None:
    """`ours` has every field of `documented`, each of the same JSON type (recursively; null matches anything that
    the field may be), and no field the documented line lacks beyond OPTIONAL."""
    if isinstance(documented, dict):
        assert isinstance(ours, dict), where
        assert set(documented) <= set(ours), f"{where}: missing {set(documented) - set(ours)}"
        assert set(ours) - set(documented) <= OPTIONAL, f"{where}: undocumented {set(ours) - set(documented)}"
        for key, value in documented.items():
            same_shape(ours[key], value, f"{where}.{key}")
    elif isinstance(documented, list):
        assert isinstance(ours, list) and ours, where
        for item in ours:
            same_shape(item, documented[0], f"{where}[]")
    elif documented is not None:
        assert type(ours) is type(documented), f"{where}: {ours!r} is not like {documented!r}"


@pytest.fixture(scope="module")
def batch_job(tmp_path_factory):
    """A batch file of the documented chat requests (max_tokens 3 and 5), the documented completion request (7), and
    refused ones, run with output.format=openai_batch; (its directory, the input lines)."""
    root = tmp_path_factory.mktemp("batch")
    lines = [with_max_tokens(DOC_INPUT[0], 3), with_max_tokens(DOC_INPUT[1], 5),
             json.dumps({"custom_id": "request-3", "method": "POST", "url": "/v1/completions",
                         "body": json.loads(DOC_COMPLETION_BODY)}),
             request("request-4", logit_bias={"50256": -100}),
             request("request-5", url="/v1/embeddings", model="text-embedding-3-small", input="x"),
             request("request-6", max_tokens=100)]
    (root / "batch.jsonl").write_text("".join(f"{line}\n" for line in lines))
    run(job_config(f"data.path={root / 'batch.jsonl'}", f"output.dir={root / 'out'}", "engine.max_new_tokens=8",
                   "output.format=openai_batch"))
    return root / "out", lines


def test_results_follow_the_documented_output_lines(batch_job):
    out, lines = batch_job
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [json.loads(line)["custom_id"] for line in lines]  # the input's order
    for ours in results[:2]:
        for documented in DOC_CHAT_OUTPUT:
            same_shape(ours, json.loads(documented))
    documented = json.loads(DOC_CHAT_OUTPUT[0])
    documented["response"]["body"] = json.loads(DOC_TEXT_COMPLETION)
    same_shape(results[2], documented)
    for ours in results[3:]:
        same_shape(ours, json.loads(DOC_ERROR_OUTPUT))
    assert len({r["id"] for r in results}) == len(results) and all(r["id"].startswith("batch_req_") for r in results)


def test_results_hold_the_generations(batch_job):
    out, _ = batch_job
    results = {r["custom_id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    generations = {g["id"]: g for g in pq.read_table(out / "generations.parquet").to_pylist()}
    assert set(generations) == {"request-1", "request-2", "request-3"}
    for custom_id, max_tokens in (("request-1", 3), ("request-2", 5), ("request-3", 7)):
        body, generation = results[custom_id]["response"]["body"], generations[custom_id]
        assert body["object"] == ("text_completion" if custom_id == "request-3" else "chat.completion")
        choice = body["choices"][0]
        assert choice.get("text", choice.get("message", {}).get("content")) == generation["generation"]
        assert choice["finish_reason"] == generation["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["completion_tokens"] == generation["generated_tokens"] <= max_tokens
        assert usage["prompt_tokens"] == generation["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # request-2 has the instruction its own system message gives, not the job's; request-3's prompt is as written.
    assert "You are an unhelpful assistant." in generations["request-2"]["prompt"]
    assert "radiologist" not in generations["request-2"]["prompt"]
    assert generations["request-3"]["prompt"] == "Say this is a test"


def test_refused_requests_say_why(batch_job):
    out, _ = batch_job
    errors = dict(zip(*pq.read_table(out / "errors.parquet", columns=["id", "error"]).to_pydict().values()))
    assert errors["request-4"].startswith("body.logit_bias is not supported")
    assert errors["request-5"].startswith('url "/v1/embeddings": only /v1/chat/completions and /v1/completions')
    assert errors["request-6"] == "max_tokens=100: must be 1 to engine.max_new_tokens=8"
    results = {r["custom_id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert results["request-4"]["error"] == {"code": "invalid_request_error", "message": errors["request-4"]}


def reasons(*lines: str, **sampling) -> dict:
    """custom_id (or the line's number) → why read_requests refuses it (None: accepted), and the row's settings."""
    _, columns, why = read_requests("\n".join(lines), SamplingConfig(**sampling))
    return {custom_id or str(i + 1): (reason, columns["max_tokens"][i], columns["temperature"][i])
            for i, (custom_id, reason) in enumerate(zip(columns["custom_id"], why))}


def test_a_request_may_repeat_the_jobs_settings_not_change_them():
    got = reasons(request("same", top_p=1, n=1, seed=0, stop=None, stream=False, logprobs=False, presence_penalty=0),
                  request("top_p", top_p=0.5), request("n", n=2), request("seed", seed=42),
                  request("stop", stop="\n"), request("stop-list", stop=["\n", "END"]),
                  request("logprobs", logprobs=True), request("tools", tools=[]), request("format", response_format={}),
                  request("both", max_tokens=4, max_completion_tokens=5), request("bad-max", max_tokens=0),
                  request("hot", temperature=3), request("warm", temperature=0.7, max_completion_tokens=4),
                  stop=["\n", "END"])
    assert got["same"] == (None, None, None) and got["stop-list"] == (None, None, None)
    assert got["warm"] == (None, "4", "0.7")
    assert got["top_p"][0] == ("body.top_p=0.5: this job runs every request with sampling.top_p=1.0; run the "
                               "requests that need another as a job of their own")
    assert got["n"][0].startswith("body.n=2: this job runs every request with sampling.n=1")
    assert got["seed"][0].startswith("body.seed=42: this job runs every request with sampling.seed=0")
    assert got["stop"][0].startswith('body.stop="\\n": this job runs every request with sampling.stop=["\\n", "END"]')
    for name, field in (("logprobs", "logprobs"), ("tools", "tools")):
        assert got[name][0].startswith(f"body.{field} is not supported"), got[name]
    assert got["format"][0].startswith("body.response_format={}: give type text, json_object, or json_schema")
    assert got["both"][0] == "body.max_tokens and body.max_completion_tokens differ: give one"
    assert got["bad-max"][0] == "body.max_tokens=0: must be a whole number of at least 1"
    assert got["hot"][0] == "body.temperature=3: must be a number from 0 to 2"


def test_malformed_lines_are_rows_with_a_reason():
    got = reasons(request("ok"), '{"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}', "not json",
                  '[1]', json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": {}}),
                  request("list", url="/v1/completions", prompt=["a", "b"]),
                  request("chat-without", url="/v1/completions", messages=[]),
                  request("last", messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
                  json.dumps({"custom_id": "no-url", "body": {"prompt": "Say this is a test"}}))
    assert got["ok"][0] is None and got["no-url"][0] is None  # a line without url: its body's kind
    assert got["2"][0] == "missing custom_id"
    assert got["3"][0].startswith("line 3 is not valid JSON") and got["4"][0] == "line 4 is not a JSON object"
    assert got["get"][0] == 'method "GET": the Batch API takes POST'
    assert got["list"][0].startswith("body.prompt must be one string")
    assert got["chat-without"][0].startswith("body.messages is not supported")
    assert got["last"][0] == "body.messages: the last message is the assistant's, not the user's: nothing to answer"


def test_a_batch_file_is_told_by_its_first_line(tmp_path):
    batch, plain = tmp_path / "b.jsonl", tmp_path / "p.jsonl"
    batch.write_text("\n" + request("a") + "\n")
    plain.write_text('{"id": "a", "findings": "x"}\n')
    assert is_batch_file(str(batch)) and not is_batch_file(str(plain))
    assert not is_batch_file(str(tmp_path / "missing.jsonl")) and not is_batch_file(str(tmp_path / "b.csv"))


def test_user_errors_are_one_line(tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text(request("a") + "\n")
    assert_user_error(run_cli(f"data.path={batch}", f"output.dir={tmp_path}/o", "output.format=xml"),
                      "output.format=xml is not one of parquet, openai_batch")
    assert_user_error(run_cli(f"data.path={batch}", f"output.dir={tmp_path}/o", "output.keep_columns=[model]"),
                      "output.keep_columns: no column model in the dataset; the columns are: custom_id, messages")
    assert_user_error(run_cli(f"data.path={batch}", f"output.dir={tmp_path}/n", module="jobs.nightly"),
                      "is an OpenAI batch file: run it with jobs.run")
    assert not (tmp_path / "o").exists()


def test_a_resumed_batch_job_writes_the_same_results(batch_job, tmp_path):
    """A rerun into the same directory generates nothing and writes results.jsonl again with the same lines (but
    `created`, the time of writing)."""
    out, _ = batch_job
    before = (out / "results.jsonl").read_text().splitlines()
    manifest = run(job_config(f"data.path={out.parent / 'batch.jsonl'}", f"output.dir={out}", "engine.max_new_tokens=8",
                              "output.format=openai_batch"))
    assert manifest["runs"][-1]["rows_generated"] == 0
    after = (out / "results.jsonl").read_text().splitlines()
    strip = lambda line: {**json.loads(line), "response": replace_created(json.loads(line)["response"])}  # noqa: E731
    assert list(map(strip, after)) == list(map(strip, before))


def replace_created(response: dict | None) -> dict | None:
    return response and {**response, "body": {**response["body"], "created": 0}}


def test_response_format_constrains_each_request_as_the_api_does(tmp_path):
    """A json_schema request's answer matches its schema, a json_object request's is a JSON object, a text request's
    is free; a schema llguidance refuses goes to the request's error line."""
    schema = {"type": "object", "properties": {"urgent": {"type": "boolean"}, "organ": {"enum": ["lung", "heart"]}},
              "required": ["urgent", "organ"], "additionalProperties": False}
    lines = [request("schema", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                                       "strict": True}}),
             request("object", response_format={"type": "json_object"}),
             request("text", response_format={"type": "text"}),
             request("bad", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}),
             request("malformed", response_format={"type": "json_schema"})]
    (tmp_path / "batch.jsonl").write_text("".join(f"{line}\n" for line in lines))
    run(job_config(f"data.path={tmp_path / 'batch.jsonl'}", f"output.dir={tmp_path / 'out'}",
                   "engine.max_new_tokens=48", "output.format=openai_batch"))
    results = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    content = {k: r["response"]["body"]["choices"][0]["message"]["content"] for k, r in results.items() if r["response"]}
    answer = json.loads(content["schema"])
    assert set(answer) == {"urgent", "organ"} and type(answer["urgent"]) is bool and answer["organ"] in ("lung", "heart")
    assert isinstance(json.loads(content["object"]), dict)
    assert set(content) == {"schema", "object", "text"}
    assert results["bad"]["error"]["message"].startswith("json_schema: llguidance cannot compile it")
    assert results["malformed"]["error"]["message"].startswith('body.response_format={"type": "json_schema"}')
