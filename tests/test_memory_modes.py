"""Memory modes on the CPU: the ones that can run here give resident's image; the others refuse."""

from __future__ import annotations

import pytest
import torch

from dit360_blender.pipeline.dit360 import DiT360Pipeline, GenerateRequest
from dit360_blender.pipeline.errors import BadParametersError, DeviceError
from dit360_blender.pipeline.fp8 import Fp8Linear, quantize_rowwise
from dit360_blender.pipeline.memory import plan_memory
from dit360_blender.pipeline.streaming import spread_indices

REQUEST = dict(prompt="This is a panorama. A canyon at noon", seed=3, steps=3, width=128, height=64)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_fp8_mode_matches_resident_within_fp8_tolerance(tiny_paths):
    resident = DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32", memory_mode="resident")
    fp8 = DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32", memory_mode="fp8")
    layer = fp8.transformer.single_blocks[0].linear1
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert fp8.transformer.img_in.weight.dtype == torch.float32  # embedders stay in dtype
    a = resident.generate(GenerateRequest(**REQUEST)).image
    b = fp8.generate(GenerateRequest(**REQUEST)).image
    err = rel(b, a)
    assert 0 < err < 0.1, err


def test_auto_is_resident_on_cpu_and_stream_refuses_clearly():
    assert plan_memory("auto", torch.device("cpu")).mode == "resident"
    with pytest.raises(DeviceError, match="CUDA") as exc:
        plan_memory("stream", torch.device("cpu"))
    assert "resident" in exc.value.hint
    with pytest.raises(BadParametersError):
        plan_memory("turbo", torch.device("cpu"))


def test_rowwise_quantisation_error_is_bounded():
    """Per-row e4m3: each weight within half a step of 3 mantissa bits of its row's scale."""
    w = torch.randn(64, 48, dtype=torch.float64) * torch.logspace(-3, 1, 64, dtype=torch.float64)[:, None]
    q, scale = quantize_rowwise(w)
    back = q.double() * scale.double()
    row_max = w.abs().amax(dim=1, keepdim=True)
    assert ((back - w).abs() <= row_max * 2**-4 + 1e-12).all()
    assert ((back - w).abs() / row_max).mean() < 0.02


def test_streamed_blocks_are_spread_evenly():
    assert spread_indices(10, 0) == []
    assert spread_indices(10, 10) == list(range(10))
    picked = spread_indices(57, 19)
    assert len(picked) == 19 and len(set(picked)) == 19
    gaps = [b - a for a, b in zip(picked, picked[1:])]
    assert max(gaps) - min(gaps) <= 1


def test_streamed_blocks_leave_the_resident_rest_within_the_room():
    from dit360_blender.pipeline.dit360 import _streamed_blocks

    sizes = [339] * 19 + [141] * 38  # FLUX fp8 double / single blocks, MB
    for room in (0, 1000, 4900, 9000, 20000):
        streamed = _streamed_blocks(sizes, room)
        resident = sum(s for i, s in enumerate(sizes) if i not in streamed)
        assert resident <= room or len(streamed) == len(sizes)
        # and no more is streamed than needed: one block fewer would not fit
        if streamed:
            fewer = spread_indices(len(sizes), len(streamed) - 1)
            assert sum(s for i, s in enumerate(sizes) if i not in fewer) > room


@pytest.mark.parametrize(
    "free_gib, budget, roomy",
    [(80.0, None, True), (39.0, None, False), (80.0, 16.0, False)],
)
def test_fp8_keeps_everything_resident_only_on_a_card_with_room(monkeypatch, free_gib, budget, roomy):
    """No GPU here: the free-memory reading is the one thing faked (memory._free_gib)."""
    from dit360_blender.pipeline import memory

    monkeypatch.setattr(memory, "_free_gib", lambda device: free_gib)
    plan = plan_memory("fp8", torch.device("cuda"), budget)
    assert plan.quantize_fp8 and plan.roomy is roomy
    assert plan.stream_text_encoder is (not roomy)
    assert plan.vae_tile == (None if roomy else 128)


def test_concurrent_loading_surfaces_a_text_encoder_failure_and_leaves_no_thread(tiny_paths, tmp_path):
    """The text encoders load on a side thread beside the transformer: their failure is the load's."""
    import dataclasses
    import threading

    from dit360_blender.pipeline.dit360 import DiT360Pipeline
    from dit360_blender.pipeline.errors import WeightsMissingError

    broken = dataclasses.replace(tiny_paths, tokenizer_2=tmp_path / "no-tokenizer-here")
    with pytest.raises(WeightsMissingError) as info:
        DiT360Pipeline.load(broken, device="cpu", dtype="fp32")
    assert "no-tokenizer-here" in info.value.message and info.value.hint
    assert not [t for t in threading.enumerate() if t.name.startswith("dit360-text-load")]
