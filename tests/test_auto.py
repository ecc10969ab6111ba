"""engine.batch_size=auto and procs=auto: the probe, the choice, and what the manifest says (CPU; the GPU
side, where both probe for real, is in test_gpu.py)."""

import json
from dataclasses import replace

from conftest import SAMPLE, run_cli
from splitwiser.bench import workload, write_workload
from splitwiser.config import EngineConfig, PromptConfig
from splitwiser.engine import ContinuousEngine, slots_the_pool_holds
from splitwiser.plan import choose_procs, seconds_since_process_start, slot_length


def test_the_probe_times_every_bucket_and_leaves_the_engine_as_it_was(tmp_path, default_model):
    requests = workload(default_model, write_workload(SAMPLE, 12, tmp_path / "w.csv"), PromptConfig())
    cfg = EngineConfig(batch_size=16, max_new_tokens=6)
    length = slot_length(max(r.prompt_tokens for r in requests), cfg.max_new_tokens)
    probed = ContinuousEngine(default_model, cfg, length)
    probe = probed.probe(steps=2)
    assert sorted(probe) == [8, 16] and all(tokens_per_s > 0 for tokens_per_s in probe.values())
    fresh = ContinuousEngine(default_model, cfg, length)
    outputs = {g.request.id: g.token_ids for g in probed.run(requests)}
    assert len(outputs) == 12 and outputs == {g.request.id: g.token_ids for g in fresh.run(requests)}


def test_the_best_batch_is_the_smallest_within_five_percent_of_the_fastest(tmp_path, default_model):
    requests = workload(default_model, write_workload(SAMPLE, 18, tmp_path / "w.csv"), PromptConfig())
    cfg = EngineConfig(batch_size=64, max_new_tokens=20)  # answers past a KV block: requests grow
    engine = ContinuousEngine(default_model, cfg, slot_length(max(r.prompt_tokens for r in requests), 20))
    engine.use_best_batch_size({8: 100.0, 16: 180.0, 32: 192.0, 64: 200.0})
    assert engine.cfg.batch_size == 32
    engine.use_best_batch_size({8: 100.0, 16: 300.0, 32: 200.0})  # a wider batch can be slower
    assert engine.cfg.batch_size == 16
    # fewer slots run than the engine has: 16 at once, each as it would alone
    alone = ContinuousEngine(default_model, replace(cfg, batch_size=16), engine.runner.max_len)
    assert {g.request.id: g.token_ids for g in engine.run(requests)} == \
        {g.request.id: g.token_ids for g in alone.run(requests)}


def test_auto_slots_are_as_many_requests_as_the_kv_pool_holds_at_once():
    # run 32's 70B job: 204,736 positions, prompts of ~100 tokens, 128 new each (~11 blocks of 16 a request)
    cfg = EngineConfig(batch_size="auto", max_new_tokens=128)
    assert slots_the_pool_holds(cfg, 204_736, 228, (120,) * 1000 + (80,) * 1000) == 1024
    assert slots_the_pool_holds(cfg, 4_000_000, 228, (100,) * 2048) >= 2048
    assert slots_the_pool_holds(cfg, 228, 228, ()) == 8  # one longest request: the fewest slots
    longer = EngineConfig(batch_size="auto", max_new_tokens=2048)
    assert slots_the_pool_holds(longer, 204_736, 2148, (100,) * 2048) == 128


def test_procs_auto_on_a_cpu_runs_one_process_and_says_why(tmp_path, default_model):
    engine = ContinuousEngine(default_model, EngineConfig(batch_size=8, max_new_tokens=4), 64)
    procs, why = choose_procs(engine, requests=10**6, start_up_s=1.0)
    assert procs == 1 and "CUDA" in why["why"]
    assert 0 < seconds_since_process_start() < 24 * 3600
    result = run_cli("procs=auto", "data.limit=3", "engine.max_new_tokens=2", f"output.dir={tmp_path}/o",
                     "output.progress=false")
    assert result.returncode == 0, result.stderr
    last = json.loads((tmp_path / "o" / "manifest.json").read_text())["runs"][-1]
    assert last["procs"] == 1 and last["mode"] == "single" and last["procs_auto"]["procs"] == 1
