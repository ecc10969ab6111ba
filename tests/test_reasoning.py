"""Reasoning models (prompt.thinking): the chat template's thinking switch; the thinking kept apart from the answer
(the `reasoning` column) and a constraint applied to the answer alone. On the CPU, with the default model made into a
reasoning model in miniature (thinking_model): real tokenizer, real llguidance, real Parquet files."""

import json
import shutil
from dataclasses import replace

import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import job_config, run_cli, sample_rows, write_csv
from splitwiser.config import DataConfig
from splitwiser.data import read_dataset
from splitwiser.errors import UserError
from splitwiser.grammar import Grammars, from_choice, from_json_schema, from_regex
from splitwiser.job import run
from splitwiser.prepare import prepare_requests
from splitwiser.request import Request
from test_constrained import SCHEMA, SCHEMA_PATH, errors, outputs
from test_errors import assert_user_error
from test_openai_batch import request as batch_line
from test_templates import ROWS, plain

# A reasoning model's chat template in miniature (Qwen3's switch): with enable_thinking false the answer starts after
# an empty thinking block.
THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n"
                     "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
                     "{% endif %}")
THINK, END_THINK, IM_END = 8, 10, 2  # two of SmolLM2's unused special tokens become <think> and </think>
REQUEST = Request(id="r", prompt="", input_ids=[1], prompt_tokens=1)  # without a grammar of its own: the job's applies


@pytest.fixture(scope="session")
def thinking_model(default_model, tmp_path_factory):
    """The default model as a reasoning model: <think> and </think> tokens (not special, as Qwen3's), THINKING_TEMPLATE,
    and </think>'s embedding (tied: its output row too) 1% longer than <|im_end|>'s, so that where the model would end
    its turn it ends its thinking instead, then answers. The model's directory."""
    path = tmp_path_factory.mktemp("thinking-model")
    shutil.copytree(default_model.source, path, dirs_exist_ok=True)
    vocab = json.loads((path / "tokenizer.json").read_text())
    for token in vocab["added_tokens"]:
        if token["id"] in (THINK, END_THINK):
            content = "<think>" if token["id"] == THINK else "</think>"
            vocab["model"]["vocab"][content] = vocab["model"]["vocab"].pop(token["content"])
            token.update(content=content, special=False)
    (path / "tokenizer.json").write_text(json.dumps(vocab))
    (path / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[END_THINK] = 1.01 * embeddings[IM_END]
    model.save_pretrained(path)
    return path


def thinking_job(out, model, rows: int, *overrides: str) -> dict[str, dict]:
    run(job_config(f"model.path={model}", f"data.limit={rows}", "engine.max_new_tokens=160", f"output.dir={out}",
                   *overrides))
    return outputs(out)


def test_thinking_then_an_answer_that_validates(tmp_path, thinking_model):
    """The constraint applies after </think>: the thinking is free text (in `reasoning`), the answer (in `generation`
    and `parsed`) validates against the schema; a row cut short goes to errors.parquet with the reason."""
    rows = thinking_job(tmp_path, thinking_model, 6, "prompt.thinking=true", f"sampling.json_schema={SCHEMA_PATH}",
                        "engine.max_new_tokens=120")
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    assert len(rows) >= 3, errors(tmp_path)
    assert all("before its constraint was complete" in e for e in errors(tmp_path).values())
    for row in rows.values():
        tokens = row["output_token_ids"]
        assert tokens.count(END_THINK) == 1 and row["finish_reason"] == "stop"
        thinking = tokenizer.decode(tokens[:tokens.index(END_THINK)], skip_special_tokens=True).strip()
        assert row["reasoning"] == thinking and len(thinking) > 20 and not thinking.startswith("{")
        jsonschema.validate(json.loads(row["generation"]), SCHEMA)
        assert row["parsed"] == json.loads(row["generation"])


def test_the_reasoning_column_without_a_constraint_and_without_thinking(tmp_path, thinking_model):
    """Unconstrained, from an OpenAI batch file: the text before </think> in `reasoning` (and results.jsonl's
    message.reasoning_content, as vLLM writes it), after it in `generation` (a request cut short while thinking: all
    reasoning). prompt.thinking unset: the whole text in `generation` (</think> is not a special token: it stays in
    the text) and `reasoning` null."""
    instruction = job_config().prompt.instruction
    lines = [batch_line(f"request-{i}", max_tokens=48,
                        messages=[{"role": "system", "content": instruction},
                                  {"role": "user", "content": f"Findings: {row['findings']}\nImpression:"}])
             for i, row in enumerate(sample_rows(3))]
    (tmp_path / "batch.jsonl").write_text("".join(f"{line}\n" for line in lines))
    batch = (f"data.path={tmp_path / 'batch.jsonl'}", "output.format=openai_batch")
    apart = thinking_job(tmp_path / "apart", thinking_model, 3, *batch, "prompt.thinking=true")
    whole = thinking_job(tmp_path / "whole", thinking_model, 3, *batch)
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    ended = [END_THINK in row["output_token_ids"] for row in apart.values()]
    assert any(ended) and not all(ended)  # both cases, in these requests
    for row_id, row in apart.items():
        tokens = row["output_token_ids"]
        assert tokens == whole[row_id]["output_token_ids"]  # the same prompt: the template's switch is not given
        end = tokens.index(END_THINK) if END_THINK in tokens else len(tokens)
        assert row["reasoning"] == tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
        assert row["generation"] == tokenizer.decode(tokens[end + 1:], skip_special_tokens=True).strip()
        assert whole[row_id]["reasoning"] is None
        assert whole[row_id]["generation"] == tokenizer.decode(tokens, skip_special_tokens=True).strip()
    for result in map(json.loads, (tmp_path / "apart" / "results.jsonl").read_text().splitlines()):
        [choice] = result["response"]["body"]["choices"]
        row = apart[result["custom_id"]]
        assert choice["message"]["content"] == row["generation"]
        assert choice["message"]["reasoning_content"] == row["reasoning"] != ""


def allowed(grammars, matcher) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(grammars.masks([matcher])[0].numpy().view(np.uint8), bitorder="little"))


@pytest.mark.parametrize("grammar", [lambda: from_json_schema(json.dumps(SCHEMA), "s"), lambda: from_regex("[0-9]+"),
                                     lambda: from_choice(("yes", "no"))], ids=["schema", "regex", "choice"])
def test_a_grammar_applies_after_the_thinking_alone(thinking_model, grammar):
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    vocab = len(tokenizer)
    thinking = Grammars(tokenizer, {IM_END}, vocab, grammar(), thinking_end=END_THINK)
    matcher = thinking.of(REQUEST)
    assert len(allowed(thinking, matcher)) == vocab  # thinking: any token
    matcher.consume_tokens(tokenizer.encode("<think>Let me look: 7 and {yes}, no.</think>\n"))
    after = allowed(thinking, matcher)
    plain_grammar = Grammars(tokenizer, {IM_END}, vocab, grammar())
    fresh = allowed(plain_grammar, plain_grammar.of(REQUEST))
    assert END_THINK not in after and set(fresh) <= set(after) < set(range(vocab))  # the answer's (and whitespace)


@pytest.mark.parametrize("thinking, closed", [(False, True), (True, False), (None, False)])
def test_the_thinking_switch_reaches_a_chat_template_that_has_one(tmp_path, thinking_model, thinking, closed):
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    prompt = replace(job_config().prompt, style="chat", thinking=thinking)
    cfg = DataConfig(path=str(write_csv(tmp_path / "r.csv", ROWS)))
    requests, errors, _ = prepare_requests(read_dataset(cfg, prompt), cfg, prompt, tokenizer, 1000, {})
    assert len(errors) == 0 and len(requests) == len(ROWS)
    for request in requests:
        assert request["prompt"].endswith("<think>\n\n</think>\n\n") == closed, request["prompt"]
        assert request["input_ids"] == tokenizer(request["prompt"], add_special_tokens=False).input_ids


def test_what_a_thinking_setting_needs_is_checked_before_any_row(tmp_path, default_model):
    """SmolLM2 has neither a thinking switch nor a </think> token: one line, before any row is generated."""
    assert_user_error(run_cli("prompt.thinking=false", "data.limit=2", f"output.dir={tmp_path}/o"),
                      "prompt.thinking=false: the model's chat template has no thinking switch")
    assert not list(tmp_path.rglob("generations.parquet"))
    cfg, prompt = DataConfig(path=str(write_csv(tmp_path / "r.csv", ROWS))), replace(job_config().prompt, thinking=True)
    with pytest.raises(UserError, match="prompt.thinking=true: the model's tokenizer has no </think> token"):
        prepare_requests(read_dataset(cfg, prompt), cfg, prompt, default_model.tokenizer, 1000, {})


def test_plain_prompts_refuse_the_thinking_switch(tmp_path, thinking_model):
    cfg = DataConfig(path=str(write_csv(tmp_path / "r.csv", ROWS)))
    with pytest.raises(UserError, match="prompt.thinking=true: a chat template's switch"):
        prepare_requests(read_dataset(cfg, plain(thinking=True)), cfg, plain(thinking=True),
                         AutoTokenizer.from_pretrained(thinking_model), 1000, {})
