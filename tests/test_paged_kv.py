"""KV memory by the block: a request holds the blocks its prompt and max_new_tokens need, not a slot as long as
the job's longest request. One long row among short ones no longer shrinks the running batch, and the tokens
stay what generate() gives each prompt alone."""

import json
from dataclasses import replace

import pyarrow.parquet as pq

from conftest import job_config, sample_rows, write_csv
from splitwiser.config import EngineConfig
from splitwiser.engine import GenerateEngine, make_engine
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
    """Four prompts that start alike (each the start of the next): with engine.share_prefix the later ones read the
    blocks the earlier computed, without it none; the tokens are the same (fp32)."""
    shared = prompts(default_model.tokenizer, lengths=(40, 70, 130, 300))
    outputs = {}
    for share in (True, False):
        cfg = EngineConfig(batch_size=4, max_new_tokens=8, share_prefix=share, prefill_tokens=400)
        engine = make_engine(default_model, cfg, slot_length(300, 8), len(shared))
        outputs[share] = outputs_of(engine, shared)
        assert (engine.cached_tokens > 0) == share
    assert outputs[True] == outputs[False]


def few_shot(tokenizer, headers: int, per_header: int) -> list[list[int]]:
    """Prompts of `headers` different headers (~100 tokens of examples each), each followed by other texts."""
    text = prompts(tokenizer, lengths=(2000,))[0]
    return [[*text[100 * h:100 * h + 100 + h * 7], *text[1000 + 37 * i:1000 + 37 * i + 20 + i]]
            for i in range(per_header) for h in range(headers)]


def test_prompts_with_three_headers_read_each_from_the_cache_and_give_generates_tokens(default_model):
    """Few-shot prompts under three headers, in a KV cache too small to keep every header's blocks: each prompt's
    tokens are those of generate on it alone (fp32); later prompts read their header from the cache, and cached
    blocks no request holds give way to new requests (least recently used first)."""
    token_ids = few_shot(default_model.tokenizer, headers=3, per_header=4)
    cfg = EngineConfig(batch_size=4, max_new_tokens=6, prefill_tokens=300)
    generate = GenerateEngine(default_model, EngineConfig(batch_size=1, max_new_tokens=6))
    expected = outputs_of(generate, token_ids)
    length = slot_length(max(map(len, token_ids)), 6)
    for kv_tokens in ("auto", 20 * length):  # auto: what the four longest requests hold; then room for all
        engine = make_engine(default_model, replace(cfg, kv_tokens=kv_tokens), length, len(token_ids))
        assert outputs_of(engine, token_ids) == expected
        assert engine.cached_tokens >= 6 * 96  # at least half of the prompts read six blocks of their header
        assert (engine.blocks.evicted > 0) == (kv_tokens == "auto")


def test_prompts_that_share_more_or_fewer_blocks_take_no_more_prefills_than_without_the_cache(default_model):
    """Prompts under one head, some of them sharing a middle part with a prompt of the first prefill: each group
    starts after the blocks all its prompts have cached (a prompt with more computes those again), so the cache
    saves work without splitting the prefills into more groups than without it; the tokens are generate's."""
    text = prompts(default_model.tokenizer, lengths=(1000,))[0]
    head, middles = text[:32], [text[100 + 40 * m:132 + 40 * m] for m in range(5)]
    token_ids = [[*head, *middles[i % 5], *text[400 + 30 * i:420 + 31 * i]] for i in range(8)]  # shortest first
    generate = GenerateEngine(default_model, EngineConfig(batch_size=1, max_new_tokens=4))
    expected = outputs_of(generate, token_ids)
    groups, length = {}, slot_length(max(map(len, token_ids)), 4)
    for share in (True, False):
        cfg = EngineConfig(batch_size=8, max_new_tokens=4, share_prefix=share, prefill_tokens=400,
                           kv_tokens=16 * length)  # room for all eight at once
        engine = make_engine(default_model, cfg, length, len(token_ids))
        assert outputs_of(engine, token_ids) == expected
        groups[share] = engine.prefill_groups
        assert (engine.cached_tokens > 0) == share
    assert groups[True] == groups[False] == 2
