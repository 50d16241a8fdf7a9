"""fp8 matmuls are used where a row-wise `torch._scaled_mm` really works, found by a probe at load.

There is no GPU here, so the tests let the probe run on the CPU (`SCALED_MM_DEVICES`), where this
PyTorch has a real row-wise `_scaled_mm`; a build or GPU without it is imitated by making
`torch._scaled_mm` raise. The upcast reference is computed here from the fp8 weight and its scales.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from dit360_blender.pipeline import fp8
from dit360_blender.pipeline.fp8 import Fp8Linear, enable_fp8_matmul, probe_scaled_mm, quantize_rowwise


def _model(seed: int = 0) -> tuple[torch.nn.ModuleList, torch.Tensor]:
    """Two fp8 Linears (in 64, out 48, with bias) and an input of 32 rows; the weights ~ N(0, 1/64)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(2):
        layer = Fp8Linear(64, 48, bias=True)
        q, scale = quantize_rowwise(torch.randn(48, 64, generator=gen) / 8)
        layer.weight.data, layer.scale_weight = q, scale
        layer.bias.data = torch.randn(48, generator=gen)
        layers.append(layer)
    model = torch.nn.ModuleList(layers)
    return model, torch.randn(2, 16, 64, generator=gen)


def upcast_reference(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer as an ordinary Linear: dequantised weight (fp8 value x row scale) in float64."""
    w = layer.weight.double() * layer.scale_weight.double()
    return F.linear(x.double(), w, layer.bias.double())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _raising(*args, **kwargs):
    raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 8.9")


def test_probe_finds_the_real_rowwise_scaled_mm():
    assert probe_scaled_mm(torch.device("cpu"), torch.bfloat16)[0]


def test_no_fp8_matmul_on_devices_outside_the_list():
    model, x = _model()
    assert not enable_fp8_matmul(model, torch.device("cpu"), torch.float32)
    assert not any(layer.use_scaled_mm for layer in model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_probe_passes_and_layers_use_scaled_mm(monkeypatch, dtype):
    monkeypatch.setattr(fp8, "SCALED_MM_DEVICES", ("cpu",))  # stands in for a GPU with fp8
    model, x = _model()
    assert enable_fp8_matmul(model, torch.device("cpu"), dtype)
    assert all(layer.use_scaled_mm and layer.scaled_out_dtype == dtype for layer in model)
    got = model[0](x.to(dtype))
    assert got.dtype == dtype
    err = _rel(got, upcast_reference(model[0], x))
    # the activations are quantised to e4m3 (3 mantissa bits) per row: a few % off, never exact
    assert 1e-3 < err < 0.1, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_failed_probe_falls_back_to_upcasting(monkeypatch, caplog, dtype):
    monkeypatch.setattr(fp8, "SCALED_MM_DEVICES", ("cpu",))
    monkeypatch.setattr(torch, "_scaled_mm", _raising)  # a GPU/build without row-wise fp8
    model, x = _model()
    with caplog.at_level(logging.INFO, logger=fp8.__name__):
        assert not enable_fp8_matmul(model, torch.device("cpu"), dtype)
    assert not any(layer.use_scaled_mm for layer in model)
    assert "fp8 matmul" in caplog.text and "unavailable" in caplog.text
    assert "upcast" in caplog.text
    for layer in model:
        got = layer(x.to(dtype))  # would raise if it still called _scaled_mm
        tol = 1e-3 if dtype == torch.float16 else 1e-6  # the compute dtype's rounding
        assert got.dtype == dtype and _rel(got, upcast_reference(layer, x)) < tol


def test_probe_refuses_a_scaled_mm_that_gives_wrong_numbers(monkeypatch, caplog):
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: real(*a, **k) * 1.5)
    with caplog.at_level(logging.WARNING, logger=fp8.__name__):
        assert probe_scaled_mm(torch.device("cpu"), torch.bfloat16) == (False, False)
    assert "wrong results" in caplog.text
