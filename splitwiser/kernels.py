"""Decode attention that reads only the live part of each KV slot (Triton, CUDA only).

SDPA over a slot pool reads every slot's whole max_len whatever its length; decode is bound by
exactly those reads. This kernel stops at each slot's own position: one program per (slot,
kv head) walks the keys in blocks with an online softmax, serving all the query heads that share
the kv head (GQA) from one read, on the matrix units; softmax in float32. A slot's positions are found
through its row of the block table (runner.KVPool); a head size that is not a power of two is padded.
A layer's sliding window (Mistral, Qwen2, Gemma) starts the walk at the block holding its oldest key and masks the
older ones; soft-capped scores (Gemma 2: cap * tanh(score / cap)) are capped before the running max. Both are
compile-time switches: a model without them runs the same code as before.
"""

import torch

try:
    import triton
    import triton.language as tl
    try:
        from triton.language.extra import libdevice
    except ImportError:  # Triton before 3.0 kept it under cuda
        libdevice = tl.extra.cuda.libdevice
except ImportError:  # CPU-only installs: runner.py falls back to SDPA
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    @triton.jit
    def _decode_attention(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, positions_ptr, row_pages, scale, window, softcap,
                          stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_ob, stride_oh, stride_tb,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                          BLOCK: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr, WINDOWED: tl.constexpr,
                          CAPPED: tl.constexpr):
        slot, head = tl.program_id(0), tl.program_id(1)
        length = tl.load(positions_ptr + slot) + 1
        oldest = 0  # the first key the query sees: within a window, position - window + 1
        if WINDOWED:
            oldest = tl.maximum(length - window, 0)
        rows, dims, cols = tl.arange(0, GROUP_PAD), tl.arange(0, DIM_PAD), tl.arange(0, BLOCK)
        # The query rows are padded to the matrix units' minimum of 16, and the head to a power of two; the
        # padding is zeros in, dropped out.
        in_head = dims[None, :] < DIM
        q = tl.load(q_ptr + slot * stride_qb + head * stride_qh + rows[:, None] * DIM + dims[None, :],
                    mask=(rows[:, None] < GROUP) & in_head, other=0.0)  # [GROUP_PAD, DIM_PAD]
        table = table_ptr + slot * stride_tb
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        # The first block holds the oldest key, so no block is all masked (its running max stays finite).
        first = oldest // BLOCK * BLOCK
        # each key's KV block; masked by the table's width, not the slot's length: read beside the position
        pages = tl.load(table + (first + cols) // PAGE, mask=(first + cols) // PAGE < row_pages, other=0)
        for start in range(first, length, BLOCK):
            live = (start + cols) < length
            if WINDOWED:
                live = live & (start + cols >= oldest)
            offsets = pages[:, None] * stride_kb + head * stride_kh + ((start + cols) % PAGE)[:, None] * stride_kl \
                + dims[None, :]
            k = tl.load(k_ptr + offsets, mask=live[:, None] & in_head, other=0.0)  # [BLOCK, DIM_PAD]
            v = tl.load(v_ptr + offsets, mask=live[:, None] & in_head, other=0.0)
            # the next keys' blocks, read while these keys arrive: the table's read is off the loop's critical path
            pages = tl.load(table + (start + BLOCK + cols) // PAGE, mask=start + BLOCK + cols < length, other=0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK], float32
            if CAPPED:  # libdevice's tanh: as exact as torch's (an exp-based one flipped fp32 tokens on a GPU)
                scores = softcap * libdevice.tanh(scores / softcap)
            scores = tl.where(live[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            total = total * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
            best = new_best
        out = acc / total[:, None]
        tl.store(out_ptr + slot * stride_ob + head * stride_oh + rows[:, None] * DIM + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < GROUP) & in_head)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                     positions: torch.Tensor, scale: float, window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """q [B, Hkv, G, D] (contiguous), keys/values [blocks, Hkv, P, D] (blocks of P positions), table [B, L // P]
    (each slot's blocks), positions [B] (the last live index per slot) → [B, Hkv, G, D]. window: each query
    sees its last `window` positions (itself included); softcap: scores → softcap * tanh(scores / softcap)
    before the softmax."""
    batch, kv_heads, group, dim = q.shape
    out = torch.empty_like(q)
    dim_pad = triton.next_power_of_2(dim)
    _decode_attention[(batch, kv_heads)](
        q, keys, values, out, table, positions, table.shape[1], scale, window or 0, softcap or 1.0,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), out.stride(0), out.stride(1),
        table.stride(0),
        # keys per block: a head of 256 (Gemma) in blocks of 64 needs more shared memory than an H200 has
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, DIM_PAD=dim_pad,
        BLOCK=64 if dim_pad <= 128 else 32, PAGE=keys.shape[2],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", WINDOWED=window is not None,
        CAPPED=softcap is not None, num_warps=4,
    )
    return out
