"""The fused sampling kernel (splitwiser/sampling_kernel.py) against the reference sampler (splitwiser/sampler.py):
the same noise, and the same token for every setting alone and combined, on rows of many shapes (ties, one
repeated value, -inf entries, the largest noise), temperature-0 rows mixed in.

A token may differ only where the reference itself is arbitrary or at float rounding: among equal logits the
reference's sort order is arbitrary (the kernel ranks them by id, as a stable sort does), and a token whose
top_p or min_p test lands within rounding of the bound may go either way. Each differing row must be one of
these (it matches the stable-sort reference at top_p, min_p moved by a relative 1e-5).

Runs on a GPU, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton 3.9 installed: 3.6's
interpreter cannot loop to a runtime bound; slow, so the kernel's gather size and block are made small, which
also walks more of its search: about 2.5 minutes); skipped elsewhere.
"""

import os

import pytest
import torch

from splitwiser import sampler, sampling_kernel
from splitwiser.config import SamplingConfig

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(sampling_kernel.triton is None or not (CUDA or INTERPRETED),
                                reason="needs triton and a GPU, or triton's interpreter (TRITON_INTERPRET=1)")
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
# (top_k, top_p, min_p): each alone, and all together; one kernel variant each
SETTINGS = [(0, 1.0, 0.0), (50, 1.0, 0.0), (1, 1.0, 0.0), (0, 0.9, 0.0), (0, 0.3, 0.0), (0, 1.0, 0.1),
            (40, 0.95, 0.02)]
SHORT = [(40, 0.95, 0.02)]  # for the other dtypes: each kernel variant compiles (seconds on a GPU)
KINDS = ("normal", "wide", "peaked", "ties", "one value", "half -inf")


@pytest.fixture(autouse=True)
def interpreter_sizes(monkeypatch):
    if INTERPRETED:  # the interpreter sorts slowly; small gathers also take the search through more passes
        monkeypatch.setattr(sampling_kernel, "CAP", 32)
        monkeypatch.setattr(sampling_kernel, "BLOCK", 256)


def logits_of(kind: str, rows: int, vocab: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    normal = torch.randn(rows, vocab, generator=generator)
    if kind == "wide":
        normal = normal * 4
    elif kind == "peaked":  # a few tokens far above the rest, like a trained model's
        normal[:, torch.randint(0, vocab, (5,), generator=generator)] += 12
    elif kind == "ties":  # few distinct values: ties at every threshold
        normal = (normal * 4).round() / 4
    elif kind == "one value":
        normal = torch.zeros(rows, vocab)
    elif kind == "half -inf":
        normal[:, vocab // 2:] = float("-inf")
    return normal.to(dtype).to(DEVICE)


def stable_filtered(logits: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: float,
                    min_p: float) -> torch.Tensor:
    """sampler.filtered with a stable sort (equal logits ranked by id): the order the kernel defines."""
    scaled = logits.float() / torch.where(temperature > 0, temperature, 1)[:, None]
    if top_k:
        kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if min_p:
        probs = scaled.softmax(-1)
        scaled = scaled.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if top_p < 1:
        ordered, order = scaled.sort(dim=-1, descending=True, stable=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
        ordered = ordered.masked_fill(before > top_p, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, ordered)
    return scaled


def drawn(filtered: torch.Tensor, noise: torch.Tensor, logits: torch.Tensor, temperature: torch.Tensor):
    return torch.where(temperature > 0, (filtered + noise).argmax(-1), logits.argmax(-1))


def noise_of(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """The reference's noise; under the interpreter the kernel's, which is numpy's log there, within 1e-6 of
    torch's (test_the_noise_is_the_references): the comparison is then of the filtering alone."""
    if INTERPRETED:
        return sampling_kernel.gumbel_noise_fused(keys, steps, vocab)
    return sampler.gumbel_noise(keys, steps, vocab)


def judged(kernel, logits, keys, steps, temperature, top_k, top_p, min_p) -> tuple[list[int], int]:
    """(the rows whose kernel token matches no reading of the reference, the rows whose token differs from the
    reference's). The readings: its own sort's, or a stable sort's at top_p and min_p as given or moved by a
    relative 1e-5 (float rounding at the bound)."""
    noise = noise_of(keys, steps, logits.shape[1])
    settings = SamplingConfig(top_k=top_k, top_p=top_p, min_p=min_p)
    if INTERPRETED:
        reference = drawn(sampler.filtered(logits, temperature, settings), noise, logits, temperature)
    else:  # the noise is the same bits: the reference itself
        reference = sampler.reference_tokens(logits, settings, keys, steps, temperature)
    explained = kernel == reference
    for nudge in (1.0, 1 - 1e-5, 1 + 1e-5):
        filtered = stable_filtered(logits, temperature, top_k, min(top_p * nudge, 1.0), min_p * nudge)
        explained |= kernel == drawn(filtered, noise, logits, temperature)
    return (~explained).nonzero().flatten().tolist(), int((kernel != reference).sum())


def compare(kind: str, rows: int, vocab: int, dtype: torch.dtype, seed: int) -> tuple[int, int]:
    """(rows whose token differs from the reference's, rows compared) over the settings; fails on any row that
    differs indefensibly."""
    generator = torch.Generator().manual_seed(seed)
    logits = logits_of(kind, rows, vocab, dtype, generator)
    keys = torch.randint(0, 2**31, (rows,), generator=generator).to(DEVICE)
    steps = torch.randint(0, 4096, (rows,), generator=generator).to(DEVICE)
    temperature = torch.tensor([0.0, 0.5, 0.8, 1.3])[torch.randint(0, 4, (rows,), generator=generator)].to(DEVICE)
    differ = 0
    settings = SETTINGS if dtype == torch.float16 else SHORT
    for top_k, top_p, min_p in settings:
        kernel = sampling_kernel.next_tokens_fused(logits, keys, steps, temperature, top_k, top_p, min_p)
        bad, d = judged(kernel, logits, keys, steps, temperature, top_k, top_p, min_p)
        assert not bad, f"{kind} {dtype} top_k={top_k} top_p={top_p} min_p={min_p}: rows {bad}"
        differ += d
    return differ, rows * len(settings)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_kernel_draws_the_references_token(dtype):
    """Vocabulary 1000, every kind of row; float16 at every setting, the others at all three filters together.
    Rows without planted ties differ from the reference itself (sampler.reference_tokens) at float rounding
    only: at most 1 in 200; any difference must be defensible."""
    rows = 12 if INTERPRETED else 256
    differ = compared = 0
    for seed, kind in enumerate(KINDS):
        d, c = compare(kind, rows, 1000, dtype, seed)
        if kind not in ("ties", "one value"):  # there the reference's own order decides
            differ, compared = differ + d, compared + c
    assert differ <= compared // 200, f"{differ} of {compared} rows differ"


def test_the_kernel_at_a_real_vocabulary():
    """OPT's vocabulary, 50,272 (not a power of two, many blocks and passes), float16."""
    rows = 2 if INTERPRETED else 128
    for seed, kind in enumerate(("normal", "peaked", "ties", "one value")):
        compare(kind, rows, 50_272, torch.float16, 100 + seed)


def test_the_noise_is_the_references():
    """Bit for bit on a GPU (libdevice's logf is CUDA's); within 1e-6 under the interpreter (numpy's log)."""
    keys = torch.tensor([0, 1, 12345, 2**31 - 1] * 4, device=DEVICE)
    steps = torch.arange(16, device=DEVICE) * 977
    fused, reference = sampling_kernel.gumbel_noise_fused(keys, steps, 5000), sampler.gumbel_noise(keys, steps, 5000)
    if INTERPRETED:
        torch.testing.assert_close(fused, reference, rtol=0, atol=2e-6)
    else:
        assert torch.equal(fused, reference)


# Keys whose hash, at step 0, hits all ones in its top 24 bits (one token in 2**24) at these tokens below 1000
ALL_ONES = {7969: 964, 17513: 172, 31120: 66}


def test_the_largest_noise_is_finite_and_a_filtered_token_never_wins():
    """Where the hash's 24 bits are all ones the uniform rounds to 1.0: the reference clamps it below 1, so the
    noise is finite (an unclamped +inf would win even filtered out, through -inf + inf = NaN). The kernel's is
    the same, the row's largest, and top_k=1 leaves the argmax, as in the reference."""
    keys = torch.tensor(list(ALL_ONES), device=DEVICE)
    steps = torch.zeros_like(keys)
    tokens = torch.tensor(list(ALL_ONES.values()), device=DEVICE)
    row = sampler._mix(sampler._mix(keys) ^ steps)
    assert torch.equal(sampler._mix(row ^ sampler._mix(tokens + 0x9E3779B9 & sampler.MASK32)) >> 8,
                       torch.full_like(keys, 0xFFFFFF))  # the keys do hit all ones there
    fused = sampling_kernel.gumbel_noise_fused(keys, steps, 1000)
    assert torch.isfinite(fused).all() and torch.equal(fused.argmax(-1), tokens)
    atol = 2e-6 if INTERPRETED else 0  # numpy's log under the interpreter, as test_the_noise_is_the_references
    torch.testing.assert_close(fused, sampler.gumbel_noise(keys, steps, 1000), rtol=0, atol=atol)
    logits = torch.randn(len(keys), 1000, generator=torch.Generator().manual_seed(5)).half().to(DEVICE)
    assert not (logits.argmax(-1) == tokens).any()  # the all-ones token is filtered out at top_k=1
    temperature = torch.ones(len(keys), device=DEVICE)
    kernel = sampling_kernel.next_tokens_fused(logits, keys, steps, temperature, 1, 1.0, 0.0)
    reference = sampler.reference_tokens(logits, SamplingConfig(top_k=1), keys, steps, temperature)
    assert torch.equal(kernel, logits.argmax(-1)) and torch.equal(kernel, reference)
    for top_k, top_p, min_p in [(0, 1.0, 0.0), (0, 0.5, 0.0), (2, 1.0, 0.0)]:
        kernel = sampling_kernel.next_tokens_fused(logits, keys, steps, temperature, top_k, top_p, min_p)
        bad, differ = judged(kernel, logits, keys, steps, temperature, top_k, top_p, min_p)
        assert not bad and not differ, (top_k, top_p, min_p)


def test_minus_zero_ties_with_zero_in_the_sorted_bracket(monkeypatch):
    """-0.0 equals 0.0: where top_p's cut falls among zeros of both signs, the kernel keeps them by id as the
    stable sort does. Its bracket gathers them all and sorts them on chip, as at the GPU's sizes (the
    interpreter's small CAP would split them into one value's path, which never sorts)."""
    if INTERPRETED:
        monkeypatch.setattr(sampling_kernel, "CAP", 512)
    vocab = 300
    logits = torch.zeros(32, vocab)
    logits[:, 1::2] = -0.0
    logits[:, :5] = 2.0  # above the zeros: the cut lands inside them
    logits = logits[:, torch.randperm(vocab, generator=torch.Generator().manual_seed(2))].half().to(DEVICE)
    keys, steps = torch.arange(32, device=DEVICE), torch.zeros(32, dtype=torch.int64, device=DEVICE)
    temperature = torch.ones(32, device=DEVICE)
    kernel = sampling_kernel.next_tokens_fused(logits, keys, steps, temperature, 0, 0.5, 0.0)
    filtered = stable_filtered(logits, temperature, 0, 0.5, 0.0)
    assert torch.equal(kernel, drawn(filtered, noise_of(keys, steps, vocab), logits, temperature))


@pytest.mark.skipif(not CUDA or INTERPRETED, reason="CUDA graphs need a GPU")
def test_the_kernel_replays_in_a_cuda_graph():
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(64, 50_272, generator=generator).half().cuda()
    keys, steps = torch.arange(64).cuda(), torch.zeros(64, dtype=torch.int64).cuda()
    temperature = torch.full((64,), 0.8).cuda()
    eager = sampling_kernel.next_tokens_fused(logits, keys, steps, temperature, 0, 0.95, 0.0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sampling_kernel.next_tokens_fused(logits, keys, steps, temperature, 0, 0.95, 0.0)
    logits.copy_(torch.randn(64, 50_272, generator=generator).half())
    steps.fill_(1)
    graph.replay()
    assert torch.equal(captured, sampling_kernel.next_tokens_fused(logits, keys, steps, temperature, 0, 0.95, 0.0))
    assert not torch.equal(captured, eager)
