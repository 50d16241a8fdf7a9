"""fp8 (e4m3) Linear layers: weights stored in fp8 with one scale per output row.

On a GPU where a row-wise fp8 `torch._scaled_mm` works (tried once at load: fp8 tensor cores are
Ada, Hopper, Blackwell, but the PyTorch build, the driver and ROCm decide too) the matmul runs in
fp8, with the activations quantised per token on the fly; elsewhere (older GPUs, MPS, CPU, or a
batch of fewer than 16 rows such as the modulation's single conditioning vector) the weight is
dequantised to the compute dtype per call. Either way the weights take half the memory of bf16.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fp8_fused

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
_MIN_SCALED_MM_ROWS = 16  # _scaled_mm needs every dimension to be a multiple of 16
# Where fp8 matmuls can beat upcasting: GPUs (ROCm builds report "cuda" too). On the CPU they run
# but gain nothing, and quantising the activations costs accuracy.
SCALED_MM_DEVICES = ("cuda",)


def quantize_rowwise(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) weight → (fp8 weight, fp32 scale (out, 1)) with weight ≈ q * scale per row."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_activations(x2: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, in) activations → (e4m3 rows, fp32 scales (rows, 1)): one scale per token, its abs-max
    mapped to 448; what the fp8 matmuls multiply (fp8_fused.py computes the same in one kernel)."""
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), x_scale


class Fp8Linear(nn.Module):
    """A Linear with an fp8 weight and a per-row (or per-tensor, broadcast) fp32 scale."""

    # set per model by `enable_fp8_matmul`, from what the probe found
    use_scaled_mm = False
    fuse_bias = False
    scaled_out_dtype = torch.bfloat16
    fuse_gelu_input = False  # forward_gelu in one fused kernel: set with use_scaled_mm, from a probe

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
        if self.use_scaled_mm and rows % _MIN_SCALED_MM_ROWS == 0:
            return self._scaled_forward(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if x.dtype == torch.float16:  # fp16 could overflow on unscaled fp8 values (up to 448)
            return F.linear(x, self.dequantized(x.dtype), bias)
        # Scale the output rows instead of the weight: one cast of the weight, no fp32 copy of it.
        out = F.linear(x, self.weight.to(x.dtype)) * self.scale_weight.t().to(x.dtype)
        return out + bias if bias is not None else out

    def forward_gelu(self, first: Tensor | None, second: Tensor) -> Tensor:
        """self(cat(first, gelu_tanh(second))) along the last axis. On the fp8 matmul path the
        GELU, the concatenation and the quantisation are one kernel (fp8_fused.py); elsewhere, or
        with a hook on this layer (a LoRA side path), exactly the plain layers."""
        rows = second.numel() // second.shape[-1]
        width = second.shape[-1] + (0 if first is None else first.shape[-1])
        fused = (
            self.use_scaled_mm
            and self.fuse_gelu_input
            and rows % _MIN_SCALED_MM_ROWS == 0
            and width <= fp8_fused.MAX_ROW
            and fp8_fused.available(second)
            and not self._forward_hooks
            and not self._forward_pre_hooks
        )
        if fused:
            # the kernel reads rows with a unit inner stride (a split's view of linear1 is one)
            first_rows = None if first is None else first.reshape(rows, first.shape[-1]).contiguous()
            second_rows = second.reshape(rows, second.shape[-1])
            if second_rows.stride(1) != 1:
                second_rows = second_rows.contiguous()
            xq, x_scale = fp8_fused.gelu_quantize_rows(first_rows, second_rows)
            out = self._scaled_matmul(xq, x_scale)
            return out.reshape(*second.shape[:-1], self.out_features).to(second.dtype)
        x = F.gelu(second, approximate="tanh")
        return self(x if first is None else torch.cat((first, x), dim=-1))

    def _scaled_forward(self, x: Tensor) -> Tensor:
        xq, x_scale = quantize_activations(x.reshape(-1, self.in_features))
        return self._scaled_matmul(xq, x_scale).reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _scaled_matmul(self, xq: Tensor, x_scale: Tensor) -> Tensor:
        """(rows, in) e4m3 activations with per-row scales @ the weight, + bias, in scaled_out_dtype."""
        out_dtype = self.scaled_out_dtype
        bias = self.bias.to(out_dtype) if self.bias is not None else None
        scale_b = self.scale_weight.t().contiguous()
        fused_bias = bias if self.fuse_bias else None
        out = torch._scaled_mm(
            xq, self.weight.t(), scale_a=x_scale, scale_b=scale_b, bias=fused_bias, out_dtype=out_dtype
        )
        if bias is not None and not self.fuse_bias:
            out = out + bias
        return out


def probe_scaled_mm(device: torch.device, out_dtype: torch.dtype) -> tuple[bool, bool]:
    """(a row-wise fp8 `torch._scaled_mm` giving `out_dtype` runs on `device` and is right, it
    also takes a fused bias), found by trying one 16x32 @ 32x16 product."""
    gen = torch.Generator().manual_seed(0)
    a, a_scale = quantize_rowwise(torch.randn(16, 32, generator=gen).to(device))
    b, b_scale = quantize_rowwise(torch.randn(16, 32, generator=gen).to(device))
    bias = torch.randn(16, generator=gen).to(device, out_dtype)
    expected = (a.float() * a_scale) @ (b.float() * b_scale).t()
    try:
        out = torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=out_dtype)
    except Exception as exc:  # RuntimeError, NotImplementedError, ...: whatever this build raises
        logger.info("fp8 matmul (%s out) unavailable on %s: %s", out_dtype, device, first_line(exc))
        return False, False
    # out_dtype rounding only (bf16: 2^-8); a wrong kernel is off by far more
    if (out.float() - expected).abs().max() > 1e-2 * expected.abs().max():
        logger.warning("fp8 matmul on %s gives wrong results; not using it", device)
        return False, False
    try:
        torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.t(), bias=bias, out_dtype=out_dtype)
    except Exception:  # some builds refuse a bias together with row-wise scales
        return True, False
    return True, True


def enable_fp8_matmul(model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Use fp8 matmuls in the model's Fp8Linear layers if the probe finds they work on `device`,
    with results in the compute `dtype` where the build allows (else bf16, then cast); otherwise
    they upcast the weights, and a log line says so."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    if not layers:
        return False
    enabled, fuse_bias, out_dtype = False, False, torch.bfloat16
    if device.type in SCALED_MM_DEVICES:
        half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        for out_dtype in dict.fromkeys((half, torch.bfloat16)):
            enabled, fuse_bias = probe_scaled_mm(device, out_dtype)
            if enabled:
                break
    if not enabled:
        logger.info("fp8 weights on %s are upcast to %s per layer (no fp8 matmul there)", device, dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    fuse_gelu = enabled and half and fp8_fused.probe(device, dtype, gelu_input_widths(model))
    for layer in layers:
        layer.use_scaled_mm, layer.fuse_bias, layer.scaled_out_dtype = enabled, fuse_bias, out_dtype
        layer.fuse_gelu_input = fuse_gelu
    return enabled


def gelu_input_widths(model: nn.Module) -> list[tuple[int, int]]:
    """The (first, second) widths a FLUX model hands `Fp8Linear.forward_gelu`: a double block's
    gelu(mlp) alone and a single block's cat(attention, gelu(mlp)); a small pair otherwise."""
    params = getattr(model, "params", None)
    if params is None or not hasattr(params, "hidden_size"):
        return [(64, 192)]
    mlp_hidden = int(params.hidden_size * params.mlp_ratio)
    return [(0, mlp_hidden), (params.hidden_size, mlp_hidden)]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
