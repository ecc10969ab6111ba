"""KV memory by the block: a request holds the blocks its prompt and max_new_tokens need, not a slot as long as
the job's longest request. One long row among short ones no longer shrinks the running batch, and the tokens
stay what generate() gives each prompt alone."""

import json

import pyarrow.parquet as pq

from conftest import job_config, sample_rows, write_csv
from splitwiser.config import EngineConfig
from splitwiser.engine import make_engine
from splitwiser.job import run
from splitwiser.plan import slot_length
from test_families import outputs_of, prompts
from test_job import reference_generation


def long_tail_csv(path):
    """Ten sample reports and one ~20 times as long."""
    rows = sample_rows(10)
    long = " ".join(row["findings"] for row in sample_rows(20))
    return write_csv(path, [*({"id": r["id"], "findings": r["findings"]} for r in rows), {"id": "long", "findings": long}])


def most_at_once(timing) -> int:
    """The most requests decoding at the same time (from first token to finish)."""
    events = sorted([(t, 1) for t in timing["first_token_ms"]] + [(t, -1) for t in timing["finish_ms"]],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def test_short_rows_run_together_beside_a_long_one_in_less_kv_than_two_long_slots(tmp_path, default_model):
    """The KV cache auto-sized to what the longest requests need; then smaller than two of the longest requests:
    short rows still run together beside the long one, each row's tokens those of generate(), in split mode too."""
    data = long_tail_csv(tmp_path / "tail.csv")
    common = (f"data.path={data}", "data.reference_column=null", "engine.max_new_tokens=12", "engine.batch_size=8",
              "engine.prefill_tokens=256", "output.progress=false")
    run(job_config(*common, f"output.dir={tmp_path / 'auto'}"))
    auto = json.loads((tmp_path / "auto" / "manifest.json").read_text())["runs"][0]
    slot_length = auto["slot_length"]
    # kv_tokens=auto: what the 8 longest requests hold at once, in blocks of 16; far less than 8 slots' worth
    longest = sorted(pq.read_table(tmp_path / "auto" / "generations.parquet")["prompt_tokens"].to_pylist())[-8:]
    assert auto["engine"]["kv_tokens"] == sum(-(-(p + 12) // 16) * 16 for p in longest) < 8 * slot_length / 2
    kv_tokens = slot_length + 4 * 128  # the long row and about four short ones; as slots: one request at a time
    out = tmp_path / "paged"
    run(job_config(*common, f"engine.kv_tokens={kv_tokens}", f"output.dir={out}"))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"input": 11, "ok": 11, "failed": 0}
    engine = manifest["runs"][0]["engine"]
    assert engine["kv_tokens"] == kv_tokens and 0 < engine["kv_peak_tokens"] <= kv_tokens
    assert most_at_once(pq.read_table(out / "timing.parquet").to_pydict()) >= 3
    model, tokenizer = default_model.model, default_model.tokenizer
    for row in pq.read_table(out / "generations.parquet").to_pylist():
        ids = tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        assert row["output_token_ids"] == reference_generation(model, ids, 12), row["id"]

    split = tmp_path / "split"  # fixed blocks per slot: as many slots as kv_tokens holds of the longest request
    run(job_config(*common, f"engine.kv_tokens={kv_tokens}", "mode=split", "procs=2", f"output.dir={split}"))
    tokens = {r["id"]: r["output_token_ids"] for r in pq.read_table(out / "generations.parquet").to_pylist()}
    assert {r["id"]: r["output_token_ids"] for r in pq.read_table(split / "generations.parquet").to_pylist()} == tokens


def test_share_prefix_off_computes_every_prompt_whole_and_gives_the_same_tokens(default_model):
    """Four prompts sharing their first 32 tokens: with engine.share_prefix the engine prefills those once, without
    it none; the tokens are the same (fp32)."""
    shared = prompts(default_model.tokenizer, lengths=(40, 70, 130, 300))
    outputs = {}
    for share in (True, False):
        cfg = EngineConfig(batch_size=4, max_new_tokens=8, share_prefix=share)
        engine = make_engine(default_model, cfg, slot_length(300, 8), len(shared))
        outputs[share] = outputs_of(engine, shared)
        assert (engine.prefix is not None) == share
    assert outputs[True] == outputs[False]


def test_no_prefix_is_shared_where_its_blocks_would_leave_too_few_for_the_longest_request(default_model):
    """A KV cache that holds exactly one longest request: a prefix held for good would leave a long prompt that does
    not start with it without room, ever. None is shared, and every request runs."""
    shared = prompts(default_model.tokenizer, lengths=(40, 70, 130, 300))
    other = prompts(default_model.tokenizer, lengths=(340,))[0][40:]  # 300 tokens from elsewhere in the text
    length = slot_length(300, 8)
    cfg = EngineConfig(batch_size=4, max_new_tokens=8, kv_tokens=length)
    engine = make_engine(default_model, cfg, length, 5)
    outputs = outputs_of(engine, [*shared, other])
    assert engine.prefix is None and len(outputs) == 5 and all(len(tokens) for tokens in outputs)
