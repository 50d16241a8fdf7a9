"""`Fp8Linear.forward_gelu`: the wiring around the fused GELU-quantisation kernel (fp8_fused.py).

The kernel itself needs CUDA and Triton (bench/step_variants.py checks it against the plain path on
the GPU: scales and e4m3 values). Here the row-wise `_scaled_mm` of this CPU build runs the matmul,
and the kernel is stood in for by the formula its docstring states (GELU in float64, rounded to
bf16, abs-max per row over cat(first, gelu(second)) mapped to 448), so what is tested is everything
around it: row views of a split, shapes, bias, the plain path when a LoRA hook sits on the layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit360_blender.pipeline import fp8, fp8_fused
from dit360_blender.pipeline.flux_layers import _gelu_linear
from dit360_blender.pipeline.fp8 import FP8, FP8_MAX, Fp8Linear, enable_fp8_matmul, quantize_rowwise


def _kernel_by_formula(first, second):
    gelu = (
        0.5
        * second.double()
        * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (second.double() + 0.044715 * second.double() ** 3)))
    )
    x = gelu.to(second.dtype).double()
    if first is not None:
        x = torch.cat((first.double(), x), dim=1)
    scale = (x.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.float()


@pytest.fixture
def layer(monkeypatch):
    monkeypatch.setattr(fp8_fused, "available", lambda x: True)
    monkeypatch.setattr(fp8_fused, "probe", lambda device, dtype, shapes: True)
    calls = []

    def kernel(first, second):
        calls.append((None if first is None else first.shape, second.shape, second.stride()))
        return _kernel_by_formula(first, second)

    monkeypatch.setattr(fp8_fused, "gelu_quantize_rows", kernel)
    gen = torch.Generator().manual_seed(3)
    linear = Fp8Linear(48 + 80, 64, bias=True)
    q, scale = quantize_rowwise(torch.randn(64, 128, generator=gen) / 11)
    linear.weight.data, linear.scale_weight = q, scale
    linear.bias.data = torch.randn(64, generator=gen)
    model = torch.nn.ModuleList([linear])
    monkeypatch.setattr(fp8, "SCALED_MM_DEVICES", ("cuda", "cpu"))
    assert enable_fp8_matmul(model, torch.device("cpu"), torch.bfloat16)  # this CPU build's _scaled_mm
    return linear, calls, gen


def _reference(linear, first, second):
    """The layer on cat(first, gelu(second)) with float64 activations and dequantised weights."""
    x = F.gelu(second.double(), approximate="tanh")
    x = torch.cat((first.double(), x), dim=-1) if first is not None else x
    return F.linear(x, linear.weight.double() * linear.scale_weight.double(), linear.bias.double())


def test_fused_path_reads_a_split_view_and_matches_the_layer(layer):
    linear, calls, gen = layer
    both = torch.randn(2, 16, 80 + 40, generator=gen).to(torch.bfloat16) * 2
    second = both[..., :80]  # a split's view: row stride 120, not contiguous
    first = torch.randn(2, 16, 48, generator=gen).to(torch.bfloat16)
    out = _gelu_linear(linear, first, second)
    assert calls == [(torch.Size([32, 48]), torch.Size([32, 80]), (120, 1))]
    assert out.shape == (2, 16, 64) and out.dtype == torch.bfloat16
    ref = _reference(linear, first, second)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 0.06  # e4m3 activations: ~3-4 %
    plain = linear(torch.cat((first, F.gelu(second, approximate="tanh")), dim=-1))
    assert ((out.double() - plain.double()).norm() / plain.double().norm()).item() < 0.01


def test_without_first_part(layer):
    linear, calls, gen = layer
    wide = Fp8Linear(128, 64, bias=False)
    wide.weight.data, wide.scale_weight = linear.weight.data, linear.scale_weight
    enable_fp8_matmul(torch.nn.ModuleList([wide]), torch.device("cpu"), torch.bfloat16)
    second = torch.randn(1, 32, 128, generator=gen).to(torch.bfloat16)
    out = _gelu_linear(wide, None, second)
    assert calls == [(None, torch.Size([32, 128]), (128, 1))]
    ref = F.linear(
        F.gelu(second.double(), approximate="tanh"), wide.weight.double() * wide.scale_weight.double()
    )
    assert ((out.double() - ref).norm() / ref.norm()).item() < 0.06


def test_a_lora_hook_keeps_the_plain_path(layer):
    linear, calls, gen = layer
    added = torch.randn(64, generator=gen).to(torch.bfloat16)
    linear.register_forward_hook(lambda module, args, out: out + added)
    first = torch.randn(1, 16, 48, generator=gen).to(torch.bfloat16)
    second = torch.randn(1, 16, 80, generator=gen).to(torch.bfloat16)
    out = _gelu_linear(linear, first, second)
    assert calls == []  # the fused kernel would skip the hook's side path
    ref = _reference(linear, first, second) + added.double()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 0.06


def test_rows_not_a_multiple_of_16_and_no_scaled_mm_take_the_plain_path(layer):
    linear, calls, gen = layer
    first = torch.randn(1, 15, 48, generator=gen).to(torch.bfloat16)
    second = torch.randn(1, 15, 80, generator=gen).to(torch.bfloat16)
    out = _gelu_linear(linear, first, second)
    linear.use_scaled_mm = False
    upcast = _gelu_linear(linear, first, second)
    assert calls == []
    for got in (out, upcast):
        ref = _reference(linear, first, second)
        assert ((got.double() - ref).norm() / ref.norm()).item() < 0.01  # bf16 activations, not e4m3


def test_without_triton_or_cuda_the_kernel_is_not_available():
    x = torch.randn(16, 32).to(torch.bfloat16)
    assert not fp8_fused.available(x)  # a CPU tensor, whatever Triton says
    with pytest.raises(ValueError, match="unit inner stride"):
        fp8_fused.gelu_quantize_rows(None, x.t())


def test_rows_too_wide_for_the_kernel_or_strided_take_a_safe_path(layer, monkeypatch):
    linear, calls, gen = layer
    first = torch.randn(1, 16, 48, generator=gen).to(torch.bfloat16)
    every_other = torch.randn(1, 16, 160, generator=gen).to(torch.bfloat16)[..., ::2]  # inner stride 2
    out = _gelu_linear(linear, first, every_other)
    assert calls and calls[-1][2] == (80, 1)  # handed over as a contiguous copy
    ref = _reference(linear, first, every_other)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 0.06
    calls.clear()
    monkeypatch.setattr(fp8_fused, "MAX_ROW", 64)  # a row of 128 no longer fits one program
    wide = _gelu_linear(linear, first, every_other)
    assert calls == []
    assert ((wide.double() - ref).norm() / ref.norm()).item() < 0.06


def test_the_plain_path_is_bit_for_bit_the_old_block_code():
    """Where nothing is fused, _gelu_linear / _mlp are exactly what the blocks ran before:
    nn.Sequential(Linear, GELU(tanh), Linear) and linear2(cat(attn, GELU(tanh)(mlp)))."""
    from dit360_blender.pipeline.flux_layers import _mlp

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(128, 32)
    ).to(torch.bfloat16)
    x = torch.randn(1, 24, 32, generator=gen).to(torch.bfloat16)
    assert torch.equal(_mlp(mlp, x), mlp(x))
    linear2 = torch.nn.Linear(48 + 80, 64).to(torch.bfloat16)
    first = torch.randn(1, 24, 48, generator=gen).to(torch.bfloat16)
    second = torch.randn(1, 24, 200, generator=gen).to(torch.bfloat16)[..., 40:120]
    old = linear2(torch.cat((first, torch.nn.GELU(approximate="tanh")(second)), dim=2))
    assert torch.equal(_gelu_linear(linear2, first, second), old)
    fp8_layer = Fp8Linear(128, 64, bias=True)
    q, scale = quantize_rowwise(torch.randn(64, 128, generator=gen) / 11)
    fp8_layer.weight.data, fp8_layer.scale_weight = q, scale
    fp8_layer.bias.data = torch.randn(64, generator=gen)
    assert not fp8_layer.fuse_gelu_input  # off until a probe on the model's device says otherwise
    old = fp8_layer(torch.cat((first, torch.nn.GELU(approximate="tanh")(second)), dim=2))
    assert torch.equal(_gelu_linear(fp8_layer, first, second), old)
