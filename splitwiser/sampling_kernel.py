"""The fused sampling kernel: one Triton kernel that picks each row's next token from its logits, the same token
as sampler.next_tokens, without the reference's dozen [batch, vocab] int64 passes and its sort (CUDA only).

Status: not yet wired into the engine (the decode step still samples with sampler.next_tokens), and not yet run
on a GPU: it has been tested only on the CPU, under Triton's interpreter, whose log is numpy's. Its bit-identity
with the reference on a GPU (libdevice's logf), its speed and its CUDA-graph capture are unverified until a
device run checks them (tests/test_sampling_kernel.py, bench/sampling_kernel.py); bench/NOTES.md will say.

One program per row. Temperature 0: the plain argmax. Otherwise the Gumbel-max choice argmax(filtered(logits / T)
+ gumbel_noise(key, step)), its noise hashed bit for bit as sampler.gumbel_noise hashes it (its uniform clamped to
at most 1 - 2**-24 as the reference's is, so the noise is finite, below 16.64, and a token left out never
wins). top_k, min_p and top_p each keep an upper set of the row's values, so each is a threshold, found without a
sort: min_p by a test of each token; top_k and top_p by passes over the row that each test CANDIDATES thresholds
at once (the count of values above each and, for top_p, their softmax weight), until the two candidates that
bracket the cut hold at most CAP tokens between them: those are gathered, sorted on chip and the cut placed
exactly, as the reference's sort and cumsum place it. The last pass hashes the noise and takes the argmax over the
kept tokens; it skips the logs (and the exact division) for every block of tokens whose noise cannot lift any of
them to the best score so far.

Ties: top_k keeps every value equal to the k-th largest (as the reference's `logits < kth` mask); top_p ranks
equal values by token id (what a stable sort gives; the reference's own order among equal values is
arbitrary), so of equal values straddling the top_p cut the lowest ids are kept.
Rounding: the softmax weights are this kernel's float32 (its exp2 and summation order, not torch's), so a token
whose mass before it lands within rounding of top_p, or whose probability ratio lands within rounding of min_p,
may be kept by one and not the other: both answers are defensible, and such a token must also win the draw to
change a row's token (tests/test_sampling_kernel.py checks that every differing row is such a case).
"""

import math
import os
import statistics

import torch

try:
    import triton
    import triton.language as tl
    try:
        from triton.language.extra import libdevice
    except ImportError:  # Triton before 3.0 kept it under cuda
        libdevice = tl.extra.cuda.libdevice
except ImportError:  # CPU-only installs: sampler.next_tokens does the sampling
    triton = None

CANDIDATES = 8  # thresholds tested per pass over the row: each pass narrows the bracket about 9x
CAP = 1024  # a bracket holding at most this many tokens is gathered and sorted on chip
BLOCK = 512  # tokens per step of a pass
WARPS = 8


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
    BIG = tl.constexpr(2147483647)  # "no index": above any token id
    MAX_PASSES = tl.constexpr(40)  # every pass at least halves the bracket's float32 range: 33 suffice
    UNIFORM_MAX = tl.constexpr(1 - 2**-24)  # the float32 below 1: the reference's clamp, exactly
    NOISE_MAX = tl.constexpr(16.64)  # above the largest noise, -log(-log(1 - 2**-24)) = 16.6355...

    @triton.jit
    def _log(x):
        """libdevice's log is CUDA's logf, the one torch calls; Triton's interpreter has only tl.log (numpy's)."""
        if INTERPRETED:
            return tl.log(x)
        return libdevice.log(x)

    @triton.jit
    def _mix(x):
        """sampler._mix in uint32: products wrap mod 2**32, exactly the reference's `& MASK32`."""
        x = (x ^ (x >> 16)) * tl.full([], 0x045D9F3B, tl.uint32)
        x = (x ^ (x >> 16)) * tl.full([], 0x045D9F3B, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _mix64(x):
        """sampler._mix on int64 as torch does it (same wrapping products and arithmetic shifts): the row's
        part of the hash takes any int64 key and step."""
        x = ((x ^ (x >> 16)) * 0x045D9F3B) & 0xFFFFFFFF
        x = ((x ^ (x >> 16)) * 0x045D9F3B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _uniform(row_hash, idx):
        """sampler.gumbel_noise's uniform for token ids idx of the row whose _mix(_mix(key) ^ step) is row_hash
        (uint32). Its 24 bits all ones round to 1.0 (the + 0.5 rounds to 2**24): clamped, as the reference
        clamps it, to the float32 below 1."""
        bits = _mix(row_hash ^ _mix(idx.to(tl.uint32) + tl.full([], 0x9E3779B9, tl.uint32))) >> 8
        uniform = (bits.to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # the reference's / 2**24, exactly
        return tl.minimum(uniform, UNIFORM_MAX)

    @triton.jit
    def _gumbel(uniform):
        """-log(-log(uniform)), bit-identical to torch's on a GPU (libdevice's logf)."""
        return -_log(-_log(uniform))

    @triton.jit
    def _may_win(uniform, x, bar):
        """Whether x + gumbel(uniform) may reach bar, the best score so far, told without a log: the noise must
        exceed bar - x, i.e. uniform > exp(-exp(x - bar)), and can: it is at most NOISE_MAX. Generous margins
        (1e-4 and 1e-5 * |bar| on the score, 2e-6 on the uniform) cover the fast exp2's error and the score's
        rounding. A dropped token (x = -inf) never passes."""
        log2e = 1.4426950408889634
        gap = x - bar + 1e-4 + 1e-5 * tl.abs(bar)
        return (gap >= -NOISE_MAX) & (uniform >= tl.exp2(-tl.exp2(gap * log2e) * log2e) - 2e-6)

    @triton.jit
    def _order_key(h):
        """float32 → uint32 that orders as the floats do (negatives flipped, positives above them)."""
        bits = h.to(tl.uint32, bitcast=True)
        return tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)

    @triton.jit
    def _from_order_key(key):
        bits = tl.where((key >> 31) == 1, key & 0x7FFFFFFF, ~key)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _load(row, start, V, BLOCK: tl.constexpr):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < V
        return tl.load(row + idx, mask=valid, other=float("-inf")).to(tl.float32), idx, valid

    @triton.jit
    def _better(value, idx, best, best_idx, nan_idx):
        """One step of torch's argmax per lane: a NaN beats everything, then the larger value, then (as the
        earlier step of the same lane) the lower index."""
        nan_idx = tl.minimum(nan_idx, tl.where(value != value, idx, BIG))
        wins = value > best
        return tl.where(wins, value, best), tl.where(wins, idx, best_idx), nan_idx

    @triton.jit
    def _argmax_of(best, best_idx, nan_idx):
        top = tl.max(best, axis=0)
        first = tl.min(tl.where(best == top, best_idx, BIG), axis=0)
        first = tl.where(first == BIG, 0, first)  # every value -inf: torch says 0
        nan_first = tl.min(nan_idx, axis=0)
        return tl.where(nan_first < BIG, nan_first, first)

    @triton.jit
    def _argmax(row, V, BLOCK: tl.constexpr):
        """The plain argmax of the logits (temperature 0)."""
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.full([BLOCK], BIG, tl.int32)
        nan_idx = tl.full([BLOCK], BIG, tl.int32)
        for start in range(0, V, BLOCK):
            h, idx, valid = _load(row, start, V, BLOCK)
            best, best_idx, nan_idx = _better(h, tl.where(valid, idx, BIG), best, best_idx, nan_idx)
        return _argmax_of(best, best_idx, nan_idx)

    @triton.jit
    def _range(row, V, BLOCK: tl.constexpr):
        """The row's largest value, its smallest finite one, how many are finite, and their mean and standard
        deviation (sums taken from the first value, so that a row far from 0 keeps its precision)."""
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        low = tl.full([BLOCK], float("inf"), tl.float32)
        finite = tl.zeros([BLOCK], tl.int32)
        first = tl.load(row).to(tl.float32)
        first = tl.where(tl.abs(first) < float("inf"), first, 0.0)
        sum1 = tl.zeros([BLOCK], tl.float32)
        sum2 = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            h, idx, valid = _load(row, start, V, BLOCK)
            top = tl.maximum(top, h)
            seen = h > float("-inf")
            low = tl.minimum(low, tl.where(seen, h, float("inf")))
            finite += seen.to(tl.int32)
            shifted = tl.where(seen, h - first, 0.0)
            sum1 += shifted
            sum2 += shifted * shifted
        count = tl.sum(finite, axis=0)
        mean = tl.sum(sum1, axis=0) / count
        spread = tl.sqrt(tl.maximum(tl.sum(sum2, axis=0) / count - mean * mean, 0.0))
        return tl.max(top, axis=0), tl.min(low, axis=0), count, first + mean, spread

    @triton.jit
    def _weight(h, h_max, scale):
        """exp((h - h_max) / T), the unnormalised softmax: the same expression in every pass, so a token's
        weight is the same number wherever it is summed or tested."""
        return tl.exp2((h - h_max) * scale)

    @triton.jit
    def _survives(h, valid, h_max, scale, kth, min_p, MASS: tl.constexpr):
        """Tokens still in play for the threshold being searched (top_p's: those top_k and min_p keep) and
        their weights (zero when only counting)."""
        if MASS:
            weight = _weight(h, h_max, scale)
            return valid & (h >= kth) & (weight >= min_p), weight
        return valid, tl.zeros_like(h)

    @triton.jit
    def _pass(row, V, h_max, scale, kth, min_p, lo, hi, cands, NC: tl.constexpr, BLOCK: tl.constexpr,
              MASS: tl.constexpr):
        """One pass: for each candidate c, the count (and weight) of surviving tokens above c; and the
        smallest and largest surviving value in the bracket (lo, hi]."""
        # Counts in float32 (exact below 2**24 tokens): one select and one add per candidate and token.
        count = tl.zeros([NC, BLOCK], tl.float32)
        mass = tl.zeros([NC, BLOCK], tl.float32)
        low = tl.full([BLOCK], float("inf"), tl.float32)
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            h, idx, valid = _load(row, start, V, BLOCK)
            alive, weight = _survives(h, valid, h_max, scale, kth, min_p, MASS)
            live = tl.where(alive, h, float("-inf"))  # a token out of play is above no candidate
            above = tl.where(live[None, :] > cands[:, None], 1.0, 0.0)
            count += above
            if MASS:
                mass = tl.fma(above, weight[None, :], mass)  # adds the weight or nothing, exactly
            inside = alive & (h > lo) & (h <= hi)
            low = tl.minimum(low, tl.where(inside, h, float("inf")))
            top = tl.maximum(top, tl.where(inside, h, float("-inf")))
        return (tl.sum(count, axis=1).to(tl.int32), tl.sum(mass, axis=1), tl.min(low, axis=0),
                tl.max(top, axis=0))

    @triton.jit
    def _spread(lo, hi, NC: tl.constexpr):
        """NC - 1 candidates evenly inside (lo, hi) and, so that every pass makes progress however narrow the
        bracket, the midpoint of its float32 range."""
        j = tl.arange(0, NC)
        even = lo + (hi - lo) * ((j + 1).to(tl.float32) / NC)
        a, b = _order_key(lo), _order_key(hi)
        middle = _from_order_key(a + (b - a) // 2)
        return tl.where(j == NC - 1, middle, even)

    @triton.jit
    def _first_candidates(h_max, h_min, floor, guess, spread, NC: tl.constexpr, MASS: tl.constexpr):
        """The first pass's candidates: slot 0 just below the smallest value (its count and weight are the
        totals). top_p: two even steps from `floor` (below which no token can be kept) to the max, and the
        rest close around `guess`, where the cut would be if the row were normal, so that one pass brackets
        the cut tightly for rows near normal and loosely for any other. top_k: halving steps down from the
        max (the k-th largest may be near the top or anywhere)."""
        j = tl.arange(0, NC)
        below = _from_order_key(_order_key(h_min) - 1)
        below = tl.where(below == h_min, _from_order_key(_order_key(h_min) - 2), below)  # +0's neighbour is -0
        if MASS:
            tl.static_assert(NC >= 5)
            start = tl.maximum(floor, below)
            even = start + (h_max - start) * (j.to(tl.float32) / 3)
            near = 2 * (j - 3).to(tl.float32) / (NC - 4) - 1  # -1 .. 1
            cands = tl.where(j < 3, even, guess + spread * 0.25 * near * tl.abs(near))
        else:
            cands = h_max - (h_max - h_min) * tl.exp2((j - NC).to(tl.float32))
        return tl.where(j == 0, below, cands), below

    @triton.jit
    def _narrow(cands, mass, count, target, lo, hi, mass_lo, mass_hi, count_lo, count_hi, MASS: tl.constexpr):
        """The bracket (lo, hi] around the threshold: lo the highest candidate with more than `target` above
        it (so the threshold is above lo), hi the lowest with at most `target` (the threshold is at most hi)."""
        if MASS:
            over = mass > target
        else:
            over = count.to(tl.float32) > target
        lo_new = tl.max(tl.where(over, cands, lo), axis=0)
        hi_new = tl.min(tl.where(over, hi, cands), axis=0)
        mass_lo = tl.min(tl.where(over, mass, mass_lo), axis=0)
        mass_hi = tl.max(tl.where(over, mass_hi, mass), axis=0)
        count_lo = tl.min(tl.where(over, count, count_lo), axis=0)
        count_hi = tl.max(tl.where(over, count_hi, count), axis=0)
        return lo_new, hi_new, mass_lo, mass_hi, count_lo, count_hi

    @triton.jit
    def _search(row, V, h_max, h_min, scale, kth, min_p, floor, guess, spread, share, target, CAP: tl.constexpr,
                NC: tl.constexpr, BLOCK: tl.constexpr, MASS: tl.constexpr):
        """Passes until the bracket holds at most CAP surviving tokens, or one value. top_p (MASS): the
        threshold keeps the tokens with at most share * (their total weight) above them; top_k: those with
        at most target (k - 1) tokens above them. Returns the bracket, the weight and count above its top,
        its count and its smallest value (its only one when `single`)."""
        cands, lo = _first_candidates(h_max, h_min, floor, guess, spread, NC, MASS)
        hi = h_max
        count, mass, low, top = _pass(row, V, h_max, scale, kth, min_p, lo, hi, cands, NC, BLOCK, MASS)
        if MASS:
            target = share * tl.sum(tl.where(tl.arange(0, NC) == 0, mass, 0.0), axis=0)
        lo, hi, mass_lo, mass_hi, count_lo, count_hi = _narrow(
            cands, mass, count, target, lo, hi, float("inf"), 0.0, BIG, 0, MASS)
        passes = 1
        while (count_lo - count_hi > CAP) & (low != top) & (passes < MAX_PASSES):
            cands = _spread(lo, hi, NC)
            count, mass, low, top = _pass(row, V, h_max, scale, kth, min_p, lo, hi, cands, NC, BLOCK, MASS)
            lo, hi, mass_lo, mass_hi, count_lo, count_hi = _narrow(
                cands, mass, count, target, lo, hi, mass_lo, mass_hi, count_lo, count_hi, MASS)
            passes += 1
        single = (count_lo - count_hi > CAP) & (low == top)
        return lo, hi, mass_hi, count_hi, count_lo - count_hi, low, target, single

    @triton.jit
    def _gather(row, V, h_max, scale, kth, min_p, lo, hi, scratch, CAP: tl.constexpr, BLOCK: tl.constexpr,
                MASS: tl.constexpr):
        """The surviving tokens in (lo, hi] (at most CAP), sorted by value down then id up, each as one int64:
        (2**32 - 1 - order key) << 31 | id. Past the last one: int64 max. Each token takes its slot from a
        counter (scratch[CAP]): the slots' order varies from run to run, the sorted result does not."""
        tl.store(scratch + CAP, 0)
        tl.debug_barrier()
        for start in range(0, V, BLOCK):
            h, idx, valid = _load(row, start, V, BLOCK)
            alive, weight = _survives(h, valid, h_max, scale, kth, min_p, MASS)
            inside = alive & (h > lo) & (h <= hi)
            at = tl.atomic_add(scratch + CAP + tl.zeros_like(idx), 1, mask=inside, sem="relaxed", scope="cta")
            same_zero = tl.where(h == 0, 0.0, h)  # -0.0 equals 0.0: it must rank by id among them, not below
            packed = ((0xFFFFFFFF - _order_key(same_zero)).to(tl.int64) << 31) | idx.to(tl.int64)
            tl.store(scratch + at, packed, mask=inside & (at < CAP))
        tl.debug_barrier()  # the whole program's stores before its loads
        base = tl.load(scratch + CAP)
        slots = tl.arange(0, CAP)
        packed = tl.load(scratch + slots, mask=slots < base, other=9223372036854775807)
        return tl.sort(packed), base

    @triton.jit
    def _unpack(packed):
        value = _from_order_key((0xFFFFFFFF - (packed >> 31)).to(tl.uint32))
        return value, (packed & 0x7FFFFFFF).to(tl.int32)

    @triton.jit
    def _nth_equal(row, V, value, nth, h_max, scale, kth, min_p, BLOCK: tl.constexpr):
        """The id of the nth (from 1) surviving token equal to `value`, in id order."""
        base = 0
        found = -1
        for start in range(0, V, BLOCK):
            h, idx, valid = _load(row, start, V, BLOCK)
            alive, weight = _survives(h, valid, h_max, scale, kth, min_p, True)
            equal = (alive & (h == value)).to(tl.int32)
            rank = base + tl.cumsum(equal, axis=0)
            found = tl.maximum(found, tl.max(tl.where((equal == 1) & (rank == nth), idx, -1), axis=0))
            base += tl.sum(equal, axis=0)
        return found

    @triton.jit
    def _top_k(row, V, top_k, h_max, h_min, finite, scratch, CAP: tl.constexpr, NC: tl.constexpr,
               BLOCK: tl.constexpr):
        """The k-th largest value (counted with repeats), -inf where fewer than k are finite."""
        kth = float("-inf")
        if finite >= top_k:
            lo, hi, mass_hi, count_hi, inside, low, target, single = _search(
                row, V, h_max, h_min, 1.0, float("-inf"), 0.0, 0.0, 0.0, 0.0, 0.0, (top_k - 1).to(tl.float32),
                CAP, NC, BLOCK, False)
            kth = low
            if single == 0:
                packed, found = _gather(row, V, h_max, 1.0, float("-inf"), 0.0, lo, hi, scratch, CAP, BLOCK,
                                        False)
                pick = tl.sum(tl.where(tl.arange(0, CAP) == top_k - 1 - count_hi, packed, 0), axis=0)
                kth, idx = _unpack(pick)
        return kth

    @triton.jit
    def _top_p_sorted(packed, found, mass_hi, target, h_max, scale, CAP: tl.constexpr):
        """From the bracket's tokens sorted: the last one whose mass before (the bracket's tokens ranked
        above it plus all above the bracket) is at most target: its value and id."""
        value, idx = _unpack(packed)
        slots = tl.arange(0, CAP)
        weight = tl.where(slots < found, _weight(value, h_max, scale), 0.0)
        before = mass_hi + (tl.cumsum(weight, axis=0) - weight)
        last = tl.max(tl.where((slots < found) & (before <= target), slots, 0), axis=0)
        return tl.sum(tl.where(slots == last, value, 0.0), axis=0), tl.sum(tl.where(slots == last, idx, 0), axis=0)

    @triton.jit
    def _top_p(row, V, top_p, floor, guess, spread, h_max, h_min, scale, kth, min_p, scratch, CAP: tl.constexpr,
               NC: tl.constexpr, BLOCK: tl.constexpr):
        """top_p's cut: tokens above `cut_value` are kept, and those equal to it up to id `cut_id`."""
        lo, hi, mass_hi, count_hi, inside, low, target, single = _search(
            row, V, h_max, h_min, scale, kth, min_p, floor, guess, spread, top_p, 0.0, CAP, NC, BLOCK, True)
        cut_value = low
        cut_id = BIG
        if single:  # one value, more than CAP times: the first r of them (by id) fit under top_p
            room = tl.floor((target - mass_hi) / _weight(low, h_max, scale)) + 1  # mass before the j-th: j * weight
            keep = tl.minimum(room, inside.to(tl.float32)).to(tl.int32)
            if keep < inside:
                cut_id = _nth_equal(row, V, low, keep, h_max, scale, kth, min_p, BLOCK)
        else:
            packed, found = _gather(row, V, h_max, scale, kth, min_p, lo, hi, scratch, CAP, BLOCK, True)
            cut_value, cut_id = _top_p_sorted(packed, found, mass_hi, target, h_max, scale, CAP)
        return cut_value, cut_id

    @triton.jit
    def _draw(row, V, temperature, row_hash, h_max, scale, kth, min_p, cut_value, cut_id,
              BLOCK: tl.constexpr, MIN_P: tl.constexpr):
        """argmax(filtered logits / T + noise), as torch computes it: a dropped token is -inf, plus the (finite)
        noise -inf, so it never wins."""
        kth_scaled = tl.math.div_rn(kth, temperature)
        inverse = 1.0 / temperature  # for the screen only: h * inverse is within 2 ulp of h / T
        kth_loose = kth_scaled - tl.abs(kth_scaled) * 1e-6  # so the screen keeps at least what top_k keeps
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.full([BLOCK], BIG, tl.int32)
        nan_idx = tl.full([BLOCK], BIG, tl.int32)
        bar = float("-inf")  # the best score so far
        for start in range(0, V, BLOCK):
            h, idx, valid = _load(row, start, V, BLOCK)
            kept = valid & ((h > cut_value) | ((h == cut_value) & (idx <= cut_id)))
            if MIN_P:
                kept = kept & (_weight(h, h_max, scale) >= min_p)
            rough = h * inverse
            uniform = _uniform(row_hash, idx)
            # The logs and the exact division are most of the work: skip them for a block where no token can
            # reach the best so far.
            maybe = _may_win(uniform, tl.where(kept & (rough >= kth_loose), rough, float("-inf")), bar)
            if tl.max((valid & maybe).to(tl.int32), axis=0) > 0:
                x = tl.math.div_rn(h, temperature)  # the reference's logits.float() / temperature
                x = tl.where(kept & (x >= kth_scaled), x, float("-inf"))
                score = tl.where(valid, x + _gumbel(uniform), float("-inf"))
                best, best_idx, nan_idx = _better(score, tl.where(valid, idx, BIG), best, best_idx, nan_idx)
                bar = tl.max(best, axis=0)
        return _argmax_of(best, best_idx, nan_idx)

    @triton.jit
    def _sampled(row, V, temperature, row_hash, top_k, top_p, min_p, floor, quantile, scratch, TOP_K: tl.constexpr,
                 TOP_P: tl.constexpr, MIN_P: tl.constexpr, CAP: tl.constexpr, NC: tl.constexpr,
                 BLOCK: tl.constexpr):
        kth = float("-inf")
        cut_value = float("-inf")
        cut_id = BIG
        h_max = 0.0
        scale = tl.math.div_rn(1.4426950408889634, temperature)  # log2(e) / T: weights by exp2
        if TOP_K | TOP_P | MIN_P:
            h_max, h_min, finite, mean, spread = _range(row, V, BLOCK)
            if TOP_K:
                kth = _top_k(row, V, top_k, h_max, h_min, finite, scratch, CAP, NC, BLOCK)
            if TOP_P:  # a normal row's softmax, reweighted, is normal: mean + spread**2 / T, same spread
                guess = mean + spread * spread / temperature - quantile * spread
                cut_value, cut_id = _top_p(row, V, top_p, h_max - floor * temperature, guess, spread, h_max,
                                           h_min, scale, kth, min_p, scratch, CAP, NC, BLOCK)
        return _draw(row, V, temperature, row_hash, h_max, scale, kth, min_p, cut_value, cut_id, BLOCK, MIN_P)

    @triton.jit(do_not_specialize=["V", "stride", "top_k"])  # one compiled kernel for every vocabulary and k
    def _next_tokens(logits, keys, steps, temperatures, out, scratch, V, stride, top_k, top_p, min_p, floor,
                     quantile, TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr, CAP: tl.constexpr,
                     NC: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        row = logits + b.to(tl.int64) * stride
        temperature = tl.load(temperatures + b)
        if temperature == 0:
            token = _argmax(row, V, BLOCK)
        else:
            row_hash = _mix64(_mix64(tl.load(keys + b)) ^ tl.load(steps + b)).to(tl.uint32)
            token = _sampled(row, V, temperature, row_hash, top_k, top_p, min_p, floor, quantile,
                             scratch + b.to(tl.int64) * (CAP + 1), TOP_K, TOP_P, MIN_P, CAP, NC, BLOCK)
        tl.store(out + b, token.to(tl.int64))

    @triton.jit
    def _noise(keys, steps, out, V, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        row_hash = _mix64(_mix64(tl.load(keys + b)) ^ tl.load(steps + b)).to(tl.uint32)
        for start in range(0, V, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            tl.store(out + b.to(tl.int64) * V + idx, _gumbel(_uniform(row_hash, idx)), mask=idx < V)


def next_tokens_fused(logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, temperature: torch.Tensor,
                      top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """logits [B, V] (float16/bfloat16/float32, rows contiguous), keys and steps [B] int64, temperature [B]
    float32 → next token ids [B] int64: a row of temperature 0 its argmax, any other the token
    sampler.next_tokens draws at that temperature and these top_k / top_p / min_p. No host synchronisation and
    only shape-sized allocations: it may be captured in a CUDA graph."""
    batch, vocab = logits.shape
    assert logits.stride(1) == 1 and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert keys.dtype == steps.dtype == torch.int64 and temperature.dtype == torch.float32
    assert keys.shape == steps.shape == temperature.shape == (batch,) and vocab <= 2**24
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    use_k, use_p, use_min_p = 0 < top_k < vocab, top_p < 1, min_p > 0
    # per row: CAP gathered tokens and a counter
    scratch = torch.empty((batch, CAP + 1) if use_k or use_p else (1,), dtype=torch.int64, device=logits.device)
    # Below max - floor * T no token can be kept by top_p: all of them weigh under (1 - top_p) of the max's.
    floor = math.log(vocab / (1 - top_p)) + 1 if use_p else 0.0
    quantile = statistics.NormalDist().inv_cdf(top_p) if use_p else 0.0  # where a normal row's top_p cut is
    _next_tokens[(batch,)](logits, keys, steps, temperature, out, scratch, vocab, logits.stride(0), top_k,
                           float(top_p), float(min_p), floor, quantile, TOP_K=use_k, TOP_P=use_p, MIN_P=use_min_p,
                           CAP=CAP, NC=CANDIDATES, BLOCK=BLOCK, num_warps=WARPS,
                           enable_fp_fusion=False)  # the arithmetic as written, as torch's separate kernels do it
    return out


def gumbel_noise_fused(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """The kernel's noise, [B, vocab] float32: to check it against sampler.gumbel_noise bit for bit."""
    out = torch.empty(keys.shape[0], vocab, dtype=torch.float32, device=keys.device)
    _noise[(keys.shape[0],)](keys, steps, out, vocab, BLOCK=1024, enable_fp_fusion=False)
    return out
