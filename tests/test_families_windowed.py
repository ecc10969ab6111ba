"""The families whose attention is more than causal softmax attention, on the fast engine (CPU, fp32): sliding
windows (Mistral on every layer, Qwen2 above max_window_layers, Gemma on alternate layers), Gemma 2's soft-capped
attention scores and final logits, Gemma 3's q/k norms and per-layer-type RoPE, in both of its config layouts.
Windows (but Mistral's default, longer than any slot) are well under the harness's longest prompt (300 tokens), so
every windowed layer drops keys.

The final soft-cap never changes a greedy choice (tanh is increasing), so the logits themselves are compared with
the model's forward too. The live decode kernel's window and soft-cap need Triton: on a GPU, or on the CPU with
TRITON_INTERPRET=1 (Triton's interpreter: the kernel's arithmetic, not its compilation)."""

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

from test_families import check_family, prompts, tiny
from splitwiser import kernels
from splitwiser.runner import SlotRunner, capped_attention, visible

WINDOW = 32


def gemma(vocab: int, **fields) -> dict:
    """tiny()'s fields for a Gemma: a head size of 16 (Gemma's default is 256), a query_pre_attn_scalar that is not
    the head size, so that a scale taken from head_dim would show, and untied embeddings (tied, the input token's
    own logit, sqrt(hidden) times larger, wins every step: the model would only repeat it)."""
    return tiny(vocab, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, tie_word_embeddings=False,
                **fields)


CONFIGS = {
    "mistral (a window on every layer)": lambda vocab: MistralConfig(**tiny(vocab, sliding_window=WINDOW)),
    "mistral, its default window (4096) longer than the slots": lambda vocab: MistralConfig(**tiny(vocab)),
    "qwen2 with use_sliding_window (layer 0 full, layer 1 windowed)": lambda vocab: Qwen2Config(
        **tiny(vocab, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    # caps low enough to bite on these small random scores and logits (the real ones are 50 and 30)
    "gemma2 (soft-caps; windowed, full)": lambda vocab: Gemma2Config(
        **gemma(vocab, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3_text, 5.x rope_parameters, 5 local : 1 global": lambda vocab: Gemma3TextConfig(**gemma(vocab) | dict(
        num_hidden_layers=6, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                              "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                 "rope_theta": 1_000_000.0}})),
    "gemma3_text, 4.x rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern": lambda vocab:
        Gemma3TextConfig(**gemma(vocab, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                                 rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=2,
                                 final_logit_softcapping=3.0)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_windowed_family_on_the_fast_engine_equals_generate(tmp_path, default_model, name):
    check_family(tmp_path, default_model, CONFIGS[name](len(default_model.tokenizer)))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_the_models_forward(default_model, name):
    """Prefill of two right-padded prompts, then a decode step each, give the logits of the model's own forward.
    The norms' weights are made random (Gemma starts them all at 0, Llama at 1): a norm in the wrong place shows."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](len(default_model.tokenizer)), dtype=torch.float32).eval()
    with torch.no_grad():
        for weight in (p for n, p in model.named_parameters() if "norm" in n):
            weight.add_(torch.randn_like(weight) * 0.2)
    short, long = (torch.tensor(ids) for ids in prompts(default_model.tokenizer, lengths=(40, 130)))
    runner = SlotRunner(model, slots=2, max_len=160)
    padded = torch.stack([torch.cat([short, torch.zeros(len(long) - len(short), dtype=torch.long)]), long])
    first = runner.prefill(padded, torch.tensor([len(short), len(long)]), torch.tensor([0, 1]))
    nexts = first.argmax(-1)
    second = runner.decode(nexts, torch.tensor([len(short), len(long)]))
    with torch.inference_mode():
        for row, ids in enumerate((short, long)):
            logits = model(torch.cat([ids, nexts[row:row + 1]])[None]).logits[0, -2:]
            torch.testing.assert_close(torch.stack([first[row], second[row]]), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(kernels.triton is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")),
                    reason="needs Triton, on a GPU or with TRITON_INTERPRET=1")
@pytest.mark.parametrize("window, cap", [(None, None), (1, None), (32, None), (64, None), (100, None), (None, 50.0),
                                         (32, 5.0)])
@pytest.mark.parametrize("dim", [16, 24])
def test_live_kernel_equals_the_sdpa_path(window, cap, dim):
    """kernels.decode_attention with a window and a soft-cap gives the attention of the SDPA path (fp32, GQA), at
    positions on both sides of the window and of the kernel's 64-key blocks, reading shuffled KV blocks through a
    table; a head of 24 (not a power of two) is padded."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    keys, values = (torch.randn(12, 2, 320, dim, device=device) for _ in range(2))
    q = torch.randn(12, 2, 3, dim, device=device) * 2
    positions = torch.tensor([0, 1, 30, 31, 32, 33, 63, 64, 65, 127, 200, 319], device=device)
    mask = visible(positions[:, None, None], torch.arange(320, device=device), window)
    want = (F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3) if cap is None else
            capped_attention(q, keys, values, mask, 0.3, cap))
    table, paged_keys, paged_values = paged(keys, values)
    got = kernels.decode_attention(q, paged_keys, paged_values, table, positions, 0.3, window, cap)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def paged(keys: torch.Tensor, values: torch.Tensor, page: int = 16):
    """Slots' caches [S, Hkv, L, D] as blocks of `page` positions in shuffled order, and the table that finds them."""
    slots, heads, length, dim = keys.shape
    order = torch.randperm(slots * length // page, generator=torch.Generator().manual_seed(1)).to(keys.device)
    blocks = [cache.unflatten(2, (length // page, page)).transpose(1, 2).flatten(0, 1) for cache in (keys, values)]
    shuffled = [torch.empty_like(b).index_copy_(0, order, b) for b in blocks]
    return order.view(slots, length // page), *shuffled
