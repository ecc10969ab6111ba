"""OpenAI Batch API files: a batch input file read as a dataset, and results.jsonl written in the Batch API's
output format (output.format=openai_batch), so that a script written for the Batch API or `vllm run-batch` reads
Splitwiser's results unchanged.

Input (https://platform.openai.com/docs/guides/batch; the openapi spec's BatchRequestInput): one JSON object a line,
`{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": ..., "messages":
[...], "max_tokens": 1000}}`. A .jsonl whose first line has `custom_id` and `body` is one. Each line becomes a row:
custom_id → the id; /v1/chat/completions' body.messages → a conversation (splitwiser.conversation, rendered with the
model's chat template), /v1/completions' body.prompt (one string) → the prompt as it is (no template); max_tokens
(or max_completion_tokens) and temperature → the row's own (data.max_new_tokens_column, data.temperature_column);
a chat request's response_format `{"type": "json_schema", "json_schema": {"schema": {...}}}` or `{"type":
"json_object"}` → the row's own JSON schema (data.json_schema_column: its answer is JSON that matches it).
top_p, stop, n and seed are the job's for every row: a request may repeat them, not change them. Any other body
field changes what the API would answer in a way the engine cannot honour, and refuses its request (the row goes
to errors.parquet naming it), unless its value is the API's default (`"logprobs": false`, `"presence_penalty": 0`)
or null; `model` is accepted and the job's model answers. A line without custom_id, with another url or method, or
whose body is not one of these is refused the same way. A request's prompt is its own: prompt.instruction is not
added to its messages (configure empties it).

Output (the spec's BatchRequestOutput): one line per input line, in the input's order, `{"id": "batch_req_...",
"custom_id": ..., "response": {"status_code": 200, "request_id": "req_...", "body": <a chat.completion or
text_completion object>}, "error": null}`, and for a row set aside `{"id", "custom_id", "response": null, "error":
{"code", "message"}}` (OpenAI writes those to a separate error file; here they are in the same file, as vllm
run-batch does).
"""

import hashlib
import json
import time
from collections import defaultdict, deque
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

from splitwiser.config import JobConfig, SamplingConfig
from splitwiser.conversation import conversation, raw_prompt
from splitwiser.output import atomic_write

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# The columns the reader makes, and the data options a batch job runs with (configure).
COLUMNS = {"id_column": "custom_id", "messages_column": "messages", "max_new_tokens_column": "max_tokens",
           "temperature_column": "temperature", "json_schema_column": "json_schema"}
# Per endpoint, the documented body fields honoured: the prompt, the per-request settings, the job's settings that a
# request may repeat, and those that change nothing in the answer (model: the job's model answers; user, metadata:
# labels).
FIELDS = {
    CHAT: {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "seed", "model",
           "user", "metadata", "response_format"},
    COMPLETIONS: {"prompt", "max_tokens", "temperature", "top_p", "stop", "n", "seed", "model", "user"},
}
DEFAULTS = {"stream": False, "logprobs": False, "echo": False, "best_of": 1, "presence_penalty": 0,
            "frequency_penalty": 0, "store": False, "parallel_tool_calls": True}  # the API's own: as if absent
RESULTS = "results.jsonl"


def is_batch_file(path: str) -> bool:
    """Whether data.path is a .jsonl whose first line is a Batch API request (has custom_id and body)."""
    if not path.lower().endswith(".jsonl"):
        return False
    try:
        with open(Path(path).expanduser(), encoding="utf-8-sig", errors="replace") as f:
            line = next((line for line in f if line.strip()), "")
        first = json.loads(line)
    except (OSError, ValueError):  # missing or unreadable: read_dataset says why
        return False
    return isinstance(first, dict) and "custom_id" in first and "body" in first


def configure(job: JobConfig) -> JobConfig:
    """The job as it runs over a batch file: its data options are the reader's columns (COLUMNS), with no reference,
    and no instruction is added to a request's messages; any other job as it is."""
    if not is_batch_file(job.data.path):
        return job
    data = replace(job.data, reference_column=None, **COLUMNS)
    return replace(job, data=data, prompt=replace(job.prompt, instruction=""))


def _is_default(name: str, value) -> bool:
    """Whether a body field has the API's default value, which asks for nothing (a boolean for a boolean: the
    completions endpoint's `"logprobs": 0` asks for log-probabilities, `false` does not)."""
    default = DEFAULTS.get(name, object())
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def _same_as_job(name: str, value, sampling: SamplingConfig) -> str | None:
    """Why a request's top_p, stop, n or seed cannot be honoured (it is not the job's), or None."""
    job = getattr(sampling, name)
    given = [value] if name == "stop" and isinstance(value, str) else value
    if given == job and type(value) is not bool:
        return None
    return (f"body.{name}={json.dumps(value)}: this job runs every request with sampling.{name}={json.dumps(job)}; "
            f"run the requests that need another as a job of their own")


def _settings(url: str, body: dict, sampling: SamplingConfig) -> tuple[dict, str | None]:
    """The request's own settings ({max_tokens, temperature}, as text), or why the body cannot be honoured."""
    given = {k: v for k, v in body.items() if v is not None and not _is_default(k, v)}
    refused = sorted(k for k in given if k not in FIELDS[url])
    if refused:
        return {}, (f"body.{refused[0]} is not supported: Splitwiser cannot honour it "
                    f"(it honours {', '.join(sorted(FIELDS[url]))})")
    for name in ("top_p", "stop", "n", "seed"):
        why = name in given and _same_as_job(name, given[name], sampling)
        if why:
            return {}, why
    limits = {k: given[k] for k in ("max_tokens", "max_completion_tokens") if k in given}
    for name, value in limits.items():
        if type(value) is not int or value < 1:
            return {}, f"body.{name}={json.dumps(value)}: must be a whole number of at least 1"
    if len(set(limits.values())) > 1:
        return {}, "body.max_tokens and body.max_completion_tokens differ: give one"
    temperature = given.get("temperature")
    if temperature is not None and not (type(temperature) in (int, float) and 0 <= temperature <= 2):
        return {}, f"body.temperature={json.dumps(temperature)}: must be a number from 0 to 2"
    schema, why = _response_schema(given.get("response_format"))
    if why:
        return {}, why
    return {"max_tokens": str(next(iter(limits.values()))) if limits else None,
            "temperature": None if temperature is None else str(temperature), "json_schema": schema}, None


def _response_schema(response_format) -> tuple[str | None, str | None]:
    """The JSON schema (as text) a response_format asks the answer to match (None: free text), or why it cannot."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if response_format is None or kind == "text":
        return None, None
    if kind == "json_object":
        return json.dumps({"type": "object"}), None
    schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    if not isinstance(schema, dict):
        return None, (f"body.response_format={json.dumps(response_format)}: give type text, json_object, or json_schema "
                      "with json_schema.schema an object")
    return json.dumps(schema), None


def _prompt(url: str, body: dict) -> tuple[str | None, str | None]:
    """The request's prompt in a messages column's form (a conversation, or a prompt as it is), or why it has none."""
    if url == CHAT:
        return conversation(body.get("messages"), "body.messages")
    prompt = body.get("prompt")
    if type(prompt) is not str:
        return None, ("body.prompt is missing" if prompt is None else
                      "body.prompt must be one string: a list of prompts (or of token ids) is not supported")
    return (raw_prompt(prompt), None) if prompt.strip() else (None, "body.prompt is empty")


def _url(request: dict) -> tuple[str | None, str | None]:
    """The request's endpoint (from its body where the line has no url, as some providers' files), or why none."""
    url, body = request.get("url"), request["body"]
    if request.get("method", "POST") != "POST":
        return None, f"method {json.dumps(request['method'])}: the Batch API takes POST"
    if url is None:
        url = CHAT if "messages" in body else COMPLETIONS if "prompt" in body else None
    if url not in FIELDS:
        return None, f"url {json.dumps(url)}: only {CHAT} and {COMPLETIONS} are supported"
    return url, None


def _request(request: dict, sampling: SamplingConfig) -> tuple[dict, str | None]:
    """One line's row (COLUMNS' values), and why it cannot be generated, if so."""
    custom_id = request.get("custom_id")
    row = {"custom_id": custom_id if type(custom_id) is str and custom_id.strip() else None, "messages": None,
           "max_tokens": None, "temperature": None, "json_schema": None}
    if row["custom_id"] is None:
        return row, "missing custom_id" if custom_id is None else f"custom_id {json.dumps(custom_id)} is not a string"
    if not isinstance(request.get("body"), dict):
        return row, "body is not a JSON object"
    url, why = _url(request)
    settings, why = (None, why) if why else _settings(url, request["body"], sampling)
    messages, why = (None, why) if why else _prompt(url, request["body"])
    return {**row, "messages": messages, **(settings or {})}, why


def read_requests(text: str, sampling: SamplingConfig) -> tuple[list[str], dict[str, list], list[str | None]]:
    """A batch input file's text as (its columns, the rows by column, why each row cannot be used); a line that is
    not a JSON object is a row with its reason (`line 3 is not valid JSON: ...`), as data.py reads JSON Lines."""
    columns, reasons = {name: [] for name in COLUMNS.values()}, []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may be in a string
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            row, why = dict.fromkeys(columns), f"line {number} is not valid JSON: {e.msg}"
        else:
            row, why = _request(request, sampling) if isinstance(request, dict) else (
                dict.fromkeys(columns), f"line {number} is not a JSON object")
        for name in columns:
            columns[name].append(row[name])
        reasons.append(why)
    return list(columns), columns, reasons


def _error_code(reason: str) -> str:
    """The Batch API error code of a row set aside (its reason in errors.parquet)."""
    if reason.startswith("out of memory"):
        return "server_error"
    if "that fit the context" in reason:
        return "context_length_exceeded"
    return "invalid_request_error"  # OpenAI's error type for a request it refuses


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _body(samples: list[dict], chat: bool, model: str, ident: str, fingerprint: str, created: int) -> dict:
    """A chat.completion or text_completion object of a request's generations (its sampling.n samples, in order)."""
    choices = [{"index": i, **({"message": _message(s)} if chat else {"text": s["generation"]}),
                "logprobs": None, "finish_reason": s["finish_reason"]} for i, s in enumerate(samples)]
    prompt_tokens, completion_tokens = samples[0]["prompt_tokens"], sum(s["generated_tokens"] for s in samples)
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{ident}",
            "object": "chat.completion" if chat else "text_completion", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _message(sample: dict) -> dict:
    """A chat answer's message; a reasoning model's thinking (prompt.thinking=true) as vLLM writes it."""
    message = {"role": "assistant", "content": sample["generation"], "refusal": None}
    if sample.get("reasoning") is not None:
        message["reasoning_content"] = sample["reasoning"]
    return message


def _grouped(directory: Path) -> tuple[dict[str, list[dict]], dict[str, deque]]:
    """generations.parquet's rows by id (samples in order) and errors.parquet's reasons by id (in order)."""
    generations = pq.read_table(directory / "generations.parquet").to_pylist()
    by_id = defaultdict(list)
    for row in sorted(generations, key=lambda row: (row["id"], row.get("sample") or 0)):
        by_id[row["id"]].append(row)
    errors = defaultdict(deque)
    for row in pq.read_table(directory / "errors.parquet", columns=["id", "error"]).to_pylist():
        errors[row["id"]].append(row["error"])
    return by_id, errors


def write_results(directory: Path, requests: list[tuple[str, str | None, bool]], model: str, fingerprint: dict,
                  job_id: str) -> None:
    """directory/results.jsonl, from its generations.parquet and errors.parquet: a line per request (id as the
    outputs name it, custom_id as written or None, whether it is a chat request), in their order. The lines' ids
    are derived from the job's id and the line's number, so that writing them again gives the same."""
    by_id, errors = _grouped(directory)
    system_fingerprint, created, lines = f"fp_{_digest(fingerprint)[:10]}", int(time.time()), []
    for number, (name, custom_id, chat) in enumerate(requests):
        ident = _digest(job_id, number)[:24]
        line = {"id": f"batch_req_{ident}", "custom_id": custom_id}
        if name in by_id:
            body = _body(by_id.pop(name), chat, model, ident, system_fingerprint, created)
            line |= {"response": {"status_code": 200, "request_id": f"req_{ident}", "body": body}, "error": None}
        else:  # set aside (a second row with its id comes here too)
            reason = errors[name].popleft() if errors[name] else "not generated"
            line |= {"response": None, "error": {"code": _error_code(reason), "message": reason}}
        lines.append(json.dumps(line, ensure_ascii=False))
    text = "".join(f"{line}\n" for line in lines)
    atomic_write(directory / RESULTS, lambda tmp: tmp.write_text(text, encoding="utf-8"))
