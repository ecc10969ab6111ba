"""Times sampling on a GPU: the fused kernel (splitwiser/sampling_kernel.py) against the torch reference
(sampler.reference_tokens) and against argmax alone, each captured in a CUDA graph and replayed, as the decode step
runs it. Prints a markdown table of microseconds per call.

    python bench/sampling_kernel.py          # B 256 and 1024, OPT's vocabulary 50,272, float16 logits
    python bench/sampling_kernel.py --tune   # then the fused kernel at B=1024 under other CANDIDATES/BLOCK/WARPS

Logits are random: "flat" N(0, 1) rows (top_p's cut deep in the vocabulary: the kernel's most passes) and
"peaked" rows (N(0, 2) plus a few tokens 12 above, like a trained model's).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitwiser import sampler, sampling_kernel  # noqa: E402
from splitwiser.config import SamplingConfig  # noqa: E402

VOCAB = 50_272
BATCHES = (256, 1024)
REPLAYS = 50
SETTINGS = {"T=0.8": (0, 1.0, 0.0), "T=0.8 top_p=0.95": (0, 0.95, 0.0), "T=0.8 top_k=50": (50, 1.0, 0.0),
            "T=0.8 min_p=0.05": (0, 1.0, 0.05), "T=0.8 top_k=50 top_p=0.95 min_p=0.05": (50, 0.95, 0.05)}


def replay_us(step) -> float:
    """Microseconds per replay of `step` captured in a CUDA graph (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / REPLAYS


def inputs(batch: int, kind: str):
    generator = torch.Generator(device="cuda").manual_seed(batch)
    logits = torch.randn(batch, VOCAB, device="cuda", generator=generator)
    if kind == "peaked":
        logits = logits * 2
        logits[:, torch.randint(0, VOCAB, (5,), device="cuda", generator=generator)] += 12
    keys = torch.randint(0, 2**31, (batch,), device="cuda", generator=generator)
    return logits.half(), keys, torch.zeros_like(keys), torch.full((batch,), 0.8, device="cuda")


def timings(batch: int, kind: str) -> dict[str, float]:
    logits, keys, steps, temperature = inputs(batch, kind)
    times = {"argmax": replay_us(lambda: logits.argmax(-1))}
    for name, (top_k, top_p, min_p) in SETTINGS.items():
        settings = SamplingConfig(top_k=top_k, top_p=top_p, min_p=min_p)
        times[f"torch {name}"] = replay_us(lambda: sampler.reference_tokens(logits, settings, keys, steps, temperature))
        times[f"fused {name}"] = replay_us(
            lambda: sampling_kernel.next_tokens_fused(logits, keys, steps, temperature, top_k, top_p, min_p))
    return times


def tune() -> None:
    """The fused kernel at B=1024 for each (CANDIDATES, BLOCK, WARPS): which the module's constants should be."""
    print("\n| CANDIDATES, BLOCK, WARPS | logits | " + " | ".join(SETTINGS) + " |")
    print("| --- | --- |" + " ---: |" * len(SETTINGS))
    for knobs in [(8, 512, 8), (8, 512, 4), (8, 1024, 8), (8, 1024, 16), (6, 512, 8), (12, 512, 8), (8, 256, 4)]:
        sampling_kernel.CANDIDATES, sampling_kernel.BLOCK, sampling_kernel.WARPS = knobs
        for kind in ("flat", "peaked"):
            logits, keys, steps, temperature = inputs(1024, kind)
            times = [replay_us(lambda: sampling_kernel.next_tokens_fused(logits, keys, steps, temperature, *setting))
                     for setting in SETTINGS.values()]
            print(f"| {knobs} | {kind} | " + " | ".join(f"{t:,.1f}" for t in times) + " |", flush=True)


def main() -> None:
    assert sampling_kernel.available(torch.device("cuda")), "needs a GPU and triton"
    for kind in ("flat", "peaked"):
        columns = {batch: timings(batch, kind) for batch in BATCHES}
        print(f"\n{kind} logits, vocabulary {VOCAB:,}, float16; µs per call (CUDA-graph replay, mean of {REPLAYS})\n")
        print("| op | " + " | ".join(f"B={batch}" for batch in BATCHES) + " |")
        print("| --- |" + " ---: |" * len(BATCHES))
        for name in columns[BATCHES[0]]:
            print(f"| {name} | " + " | ".join(f"{columns[batch][name]:,.1f}" for batch in BATCHES) + " |")
    if "--tune" in sys.argv:
        tune()


if __name__ == "__main__":
    main()
