"""FP8 weights (model.quantization=fp8). On the CPU: a job refuses it (no FP8 matrix units) before the model loads; the
arithmetic is checked through torch's own CPU _scaled_mm on the real default model: each quantized layer within
e4m3's error of the layer it replaces, the model's next-token choices mostly unchanged, the output head and
embeddings as they were. On the GPU (tests/test_gpu.py): the Triton quantizer, and jobs with CUDA graphs."""

import copy
from collections import defaultdict

import pytest
import torch
from torch import nn

from splitwiser.config import ModelConfig
from splitwiser.errors import UserError
from splitwiser.fp8 import E4M3_MAX, FP8Linear, quantize
from splitwiser.models import load_model
from test_families import prompts


def test_fp8_is_refused_on_the_cpu_before_the_model_loads():
    with pytest.raises(UserError, match="^model.quantization=fp8: the CPU has no FP8 matrix units"):
        load_model(ModelConfig(path="no/such/model", device="cpu", quantization="fp8"))


@pytest.fixture(scope="module")
def quantized(default_model):
    return quantize(copy.deepcopy(default_model.model))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def test_each_layer_is_within_e4m3s_error_of_its_own(default_model, quantized):
    """e4m3 keeps 3 bits of mantissa: a value's rounding error is up to 1/16 of it, and a product's errors, of both
    signs, partly cancel. Each output channel's largest weight becomes e4m3's largest value (448)."""
    errors = defaultdict(list)
    torch.manual_seed(0)
    for (name, linear), (_, fp8) in zip(default_model.model.named_modules(), quantized.named_modules()):
        if isinstance(linear, nn.Linear) and linear is not default_model.model.get_output_embeddings():
            assert isinstance(fp8, FP8Linear), name
            x = torch.randn(3, 5, linear.in_features)
            errors[name.rsplit(".", 1)[-1]].append(relative_error(fp8(x), linear(x)))
            largest = (fp8.weight_t.float() * fp8.weight_scale).abs().amax(dim=0)
            torch.testing.assert_close(largest, linear.weight.abs().amax(dim=1), rtol=1e-6, atol=0)
            assert fp8.weight_t.float().abs().amax() == E4M3_MAX
    print({kind: f"{max(e):.4f}" for kind, e in errors.items()})  # the largest relative error of each layer type
    assert set(errors) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert max(max(e) for e in errors.values()) < 0.05


def test_the_quantized_model_mostly_chooses_the_same_next_tokens(default_model, quantized):
    """Teacher-forced over real report text: the quantized model's most likely next token equals the model's at most
    positions; the output head and the embeddings are untouched."""
    assert type(quantized.get_output_embeddings()) is nn.Linear
    assert torch.equal(quantized.get_input_embeddings().weight, default_model.model.get_input_embeddings().weight)
    ids = torch.tensor([prompts(default_model.tokenizer, lengths=(96,))[0]])
    with torch.no_grad():
        reference, ours = default_model.model(ids).logits[0], quantized(ids).logits[0]
    agree = (reference.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"fp8 against fp32: next tokens {agree:.1%} the same, logits' relative error {relative_error(ours, reference):.3f}")
    assert agree >= 0.85 and relative_error(ours, reference) < 0.15


def test_a_layer_whose_sizes_fp8_cannot_take_keeps_its_dtype():
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 20), nn.Linear(20, 32))
    model.get_output_embeddings = lambda: None
    assert [type(layer) for layer in quantize(model)] == [FP8Linear, nn.Linear, nn.Linear]
    model[0].bias.data.fill_(3.0)
    assert torch.allclose(model(torch.zeros(2, 64)), model[2](model[1](torch.full((2, 48), 3.0))))
