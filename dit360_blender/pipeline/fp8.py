"""fp8 (e4m3) Linear layers: weights stored in fp8 with one scale per output row.

On GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell) the matmul runs
in fp8 through `torch._scaled_mm`, with the activations quantised per token on the fly; elsewhere
(older GPUs, MPS, CPU, or a batch of fewer than 16 rows such as the modulation's single
conditioning vector) the weight is dequantised to the compute dtype per call. Either way the
weights take half the memory of bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
_MIN_SCALED_MM_ROWS = 16  # _scaled_mm needs every dimension to be a multiple of 16


def quantize_rowwise(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) weight → (fp8 weight, fp32 scale (out, 1)) with weight ≈ q * scale per row."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_matmul_supported(device: torch.device) -> bool:
    """fp8 tensor cores: CUDA compute capability 8.9 or newer."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A Linear with an fp8 weight and a per-row (or per-tensor, broadcast) fp32 scale."""

    use_scaled_mm = False  # set per model by `enable_fp8_matmul`
    fuse_bias = False

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.register_buffer("scale_weight", torch.ones(out_features, 1, dtype=torch.float32))

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return (self.weight.to(torch.float32) * self.scale_weight).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if self.use_scaled_mm and rows % _MIN_SCALED_MM_ROWS == 0 and x.is_cuda:
            return self._scaled_forward(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if x.dtype == torch.float16:  # fp16 could overflow on unscaled fp8 values (up to 448)
            return F.linear(x, self.dequantized(x.dtype), bias)
        # Scale the output rows instead of the weight: one cast of the weight, no fp32 copy of it.
        out = F.linear(x, self.weight.to(x.dtype)) * self.scale_weight.t().to(x.dtype)
        return out + bias if bias is not None else out

    def _scaled_forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        xq = (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        bias = self.bias.to(out_dtype) if self.bias is not None else None
        scale_b = self.scale_weight.t().contiguous()
        fused_bias = bias if self.fuse_bias else None
        out = torch._scaled_mm(
            xq, self.weight.t(), scale_a=x_scale, scale_b=scale_b, bias=fused_bias, out_dtype=out_dtype
        )
        if bias is not None and not self.fuse_bias:
            out = out + bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def _scaled_mm_takes_bias(device: torch.device) -> bool:
    """Some PyTorch builds refuse a bias together with row-wise scales: ask once."""
    a = torch.ones(16, 16, device=device).to(FP8)
    b = torch.ones(16, 16, device=device).to(FP8)
    ones = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(
            a,
            b.t(),
            scale_a=ones,
            scale_b=ones.t(),
            bias=torch.zeros(16, device=device, dtype=torch.bfloat16),
            out_dtype=torch.bfloat16,
        )
        return True
    except RuntimeError:
        return False


def enable_fp8_matmul(model: nn.Module, device: torch.device) -> bool:
    """Use fp8 tensor-core matmuls in the model's Fp8Linear layers where the device has them."""
    enabled = fp8_matmul_supported(device)
    fuse_bias = enabled and _scaled_mm_takes_bias(device)
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.use_scaled_mm, module.fuse_bias = enabled, fuse_bias
    return enabled
