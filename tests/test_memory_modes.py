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
    "free_gib, budget, roomy, tile",
    [(80.0, None, True, None), (39.0, None, False, 128), (80.0, 16.0, False, 64), (80.0, 24.0, False, 128)],
)
def test_fp8_keeps_everything_resident_only_on_a_card_with_room(monkeypatch, free_gib, budget, roomy, tile):
    """No GPU here: the free-memory reading is the one thing faked (memory._free_gib)."""
    from dit360_blender.pipeline import memory

    monkeypatch.setattr(memory, "_free_gib", lambda device: free_gib)
    plan = plan_memory("fp8", torch.device("cuda"), budget)
    assert plan.quantize_fp8 and plan.roomy is roomy
    assert plan.stream_text_encoder is (not roomy)
    assert plan.vae_tile == tile  # 64-pixel tiles within a budget under 20 GiB (the 16 GiB layout)
    assert plan.vram_budget == (None if budget is None else int(budget * 2**30))  # kept: the cap


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


# -- the budget at the device level ----------------------------------------------------------------

GIB = 2**30


@pytest.mark.parametrize(
    "budget_gib, total_gib, cap_gib",
    [(16.0, 139.8, 15.2), (8.0, 139.8, 7.2), (48.0, 24.0, 23.2), (None, 139.8, None)],
)
def test_allocator_cap_is_the_budget_less_the_cuda_context(budget_gib, total_gib, cap_gib):
    """The cap keeps what the card's monitor counts (allocator + ~0.8 GiB context) in the budget;
    a budget larger than the card is the card."""
    from dit360_blender.pipeline.memory import MemoryPlan, allocator_cap

    budget = None if budget_gib is None else int(budget_gib * GIB)
    cap = allocator_cap(MemoryPlan("fp8", True, True, False, budget), int(total_gib * GIB))
    assert cap == (None if cap_gib is None else pytest.approx(cap_gib * GIB, abs=2))


def test_a_budget_the_context_fills_is_refused_with_the_fix():
    from dit360_blender.pipeline.memory import MemoryPlan, allocator_cap

    with pytest.raises(BadParametersError) as info:
        allocator_cap(MemoryPlan("stream", True, True, True, GIB // 2), 80 * GIB)
    assert "0.5 GiB" in info.value.message and "at least" in info.value.hint


def test_limit_allocator_caps_and_uncaps_the_process(monkeypatch):
    """No GPU here: torch.cuda's three calls are recorded instead (the one thing faked)."""
    from types import SimpleNamespace

    from dit360_blender.pipeline import memory

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append(f))
    cuda = torch.device("cuda", 0)
    budgeted = memory.MemoryPlan("fp8", True, True, False, 16 * GIB)
    assert memory.limit_allocator(budgeted, cuda) == int(16 * GIB) - int(0.8 * GIB)
    assert calls == ["empty", pytest.approx((int(16 * GIB) - int(0.8 * GIB)) / (80 * GIB))]
    assert memory.limit_allocator(memory.MemoryPlan("resident", False, False, False, None), cuda) is None
    assert calls[-2:] == ["empty", 1.0]  # an earlier job's cap is lifted
    assert memory.limit_allocator(budgeted, torch.device("cpu")) is None and len(calls) == 4


@pytest.mark.parametrize(
    "free_gib, budget, mode", [(139.0, 48.0, "resident"), (139.0, 24.0, "fp8"), (139.0, 12.0, "stream")]
)
def test_auto_keeps_a_given_budget_on_a_big_card(monkeypatch, free_gib, budget, mode):
    """Auto with a budget on a card with far more free: the mode fits the budget and keeps it."""
    from dit360_blender.pipeline import memory

    monkeypatch.setattr(memory, "_free_gib", lambda device: free_gib)
    plan = plan_memory("auto", torch.device("cuda"), budget)
    assert plan.mode == mode and not plan.roomy
    expected = budget - memory.AUTO_MARGIN_GIB if mode == "stream" else budget
    assert plan.vram_budget == int(expected * GIB)


def test_limit_allocator_gives_torch_an_index_for_a_device_without_one(monkeypatch):
    """pick_device("auto") gives torch.device("cuda"); set_per_process_memory_fraction refuses a
    device without an index (the H200 bench found it), so the current GPU's index is passed."""
    from types import SimpleNamespace

    from dit360_blender.pipeline import memory

    asked = []

    def fraction(f, index):
        if not isinstance(index, int):  # what torch 2.11 raises for torch.device("cuda")
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{index}")
        asked.append((f, index))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fraction)
    plan = memory.MemoryPlan("fp8", True, True, False, 16 * GIB)
    memory.limit_allocator(plan, torch.device("cuda"))
    memory.limit_allocator(plan, torch.device("cuda", 1))
    assert [index for _, index in asked] == [3, 1]


def test_the_streamed_layout_leaves_the_cuda_context_out_of_the_blocks_room():
    from dit360_blender.pipeline.memory import MemoryPlan, resident_block_budget

    plan = MemoryPlan("stream", True, True, True, 8 * GIB)
    tokens, fixed, block = 64 * 130, 2 * GIB, 339 * 10**6
    room = resident_block_budget(plan, tokens, fixed, block, prefetch=2)
    activations = (tokens + 512) * 200_000 + 0.75 * GIB
    assert room == pytest.approx(8 * GIB - int(0.8 * GIB) - fixed - activations - 3 * block, abs=2)


def test_stage_peaks_are_empty_off_cuda_and_a_cpu_load_times_its_parts(tiny_paths):
    import time

    from dit360_blender.pipeline.memory_peaks import StagePeaks

    peaks = StagePeaks(torch.device("cpu"))
    peaks.begin("load")
    assert peaks.report() == {}
    t0 = time.perf_counter()
    pipe = DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32")
    wall = time.perf_counter() - t0
    parts = pipe.load_timings
    assert {"text_encoders_s", "transformer_s", "vae_s", "text_encoders_wait_s", "placement_s"} <= set(parts)
    assert all(v >= 0 for v in parts.values())
    # the text encoders load beside the transformer: the parts on the main thread fit in the wall time
    assert sum(v for k, v in parts.items() if k != "text_encoders_s") <= wall
    assert parts["text_encoders_s"] <= wall and pipe.load_memory == {} and pipe.allocator_cap is None
    made = pipe.generate(GenerateRequest(prompt="p", width=128, height=64, steps=2, seed=1))
    assert made.memory == {}
