"""FP8 weights (model.quantization=fp8): the decoder's linear layers in 8-bit floats (e4m3) with a scale per output
channel, each input scaled per token as it arrives, the products on the GPU's FP8 matrix units (torch._scaled_mm:
twice bf16's rate on Hopper). Half the weights' memory, so twice the room for KV. The embeddings, norms and output
head keep the model's dtype (as vLLM's fp8 does: the head's error would move every logit).

A layer's output is x @ W.T computed as (x / s_x) @ (W / s_w).T * s_x * s_w, where s_x is each token's largest
|value| / 448 (e4m3's largest) and s_w each output channel's: every row uses e4m3's whole range.
"""

import torch
from torch import nn

from splitwiser.errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: FP8 is refused there, and weights are quantized with torch
    triton = None

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def check_device(device: torch.device) -> None:
    """Raises UserError where the device has no FP8 matrix units (compute capability 8.9+: Ada, Hopper and later)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        raise UserError(f"model.quantization=fp8: {name} has no FP8 matrix units (a GPU of compute capability 8.9 or "
                        "later: Ada, Hopper); leave model.quantization unset")


def quantize(model: nn.Module) -> nn.Module:
    """The model with each linear layer but the output head as an FP8Linear, made one at a time (each layer's
    weights freed as its FP8 copy is made, so memory never holds both for the whole model)."""
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        quantize_children(parent, head)
    return model


def quantize_children(parent: nn.Module, head: nn.Module) -> None:
    """Each linear layer directly under `parent`, but the output head, as an FP8Linear."""
    for name, child in list(parent.named_children()):
        if type(child) is nn.Linear and child is not head and fits(child):
            setattr(parent, name, FP8Linear(child))


def fits(linear: nn.Linear) -> bool:
    """torch._scaled_mm takes sizes that are multiples of 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


class FP8Linear(nn.Module):
    """A linear layer with e4m3 weights, one scale per output channel, and inputs scaled per token."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_t", weight.t())  # [in, out], column-major: the layout _scaled_mm takes
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out], float32
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = quantize_rows(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(rows, self.weight_t, scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] as e4m3 values and each row's float32 scale [rows, 1]: x ≈ values * scale."""
    if triton is None or not x.is_cuda:
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
        return (x.float() / scale).to(E4M3), scale
    x = x.contiguous()
    values = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    _quantize_rows[(x.shape[0],)](x, values, scale, x.shape[1], BLOCK=1024, E4M3_MAX=E4M3_MAX)
    return values, scale


if triton is not None:
    @triton.jit
    def _quantize_rows(x_ptr, values_ptr, scale_ptr, cols, BLOCK: tl.constexpr, E4M3_MAX: tl.constexpr):
        """One program a row, in one kernel (torch's abs, amax, divide and cast are five launches and passes)."""
        row = tl.program_id(0).to(tl.int64) * cols
        offsets = tl.arange(0, BLOCK)
        largest = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            x = tl.load(x_ptr + row + start + offsets, mask=start + offsets < cols, other=0.0).to(tl.float32)
            largest = tl.maximum(largest, tl.abs(x))
        scale = tl.maximum(tl.math.div_rn(tl.max(largest, axis=0), E4M3_MAX), 1e-12)
        for start in range(0, cols, BLOCK):
            inside = start + offsets < cols
            x = tl.load(x_ptr + row + start + offsets, mask=inside, other=0.0).to(tl.float32)
            # div_rn: IEEE division, as torch's (the default approximate one moves ~0.1% of values a step)
            tl.store(values_ptr + row + start + offsets, tl.math.div_rn(x, scale).to(tl.float8e4nv), mask=inside)
        tl.store(scale_ptr + tl.program_id(0), scale)
