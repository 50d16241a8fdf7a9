"""Apple MPS has no float64 and no float8: RoPE is built in float32 there, fp8 modes are refused.

The MPS branch of RoPE is forced on the CPU (`device_type="mps"`, or `rope_dtype` patched for a
whole transformer pass), and every tensor the ops produce is recorded with a dispatch mode, so a
float64 allocation anywhere on that path would be seen. The memory plan needs no MPS device:
it decides from the device type alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from flux_fixtures import TINY_AXES, save_layouts, tiny_diffusers_transformer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dit360_blender.pipeline import flux_layers
from dit360_blender.pipeline.errors import DeviceError
from dit360_blender.pipeline.flux_checkpoint import load_flux_transformer
from dit360_blender.pipeline.flux_layers import rope, rope_dtype
from dit360_blender.pipeline.memory import plan_memory
from dit360_blender.pipeline.sampling import image_ids, wrap_pad_ids

# 8192x4096, the largest size the parameter table allows, has 512 columns of ids (+2 wrapped)
POSITIONS = torch.arange(0, 600, dtype=torch.float32)


class DtypeRecorder(TorchDispatchMode):
    """Records the dtype of every tensor that any op takes or makes."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves((args, kwargs, out)):
            if isinstance(leaf, torch.Tensor):
                self.dtypes.add(leaf.dtype)
        return out


def float64_rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """The rotation matrices from math's cos/sin in double precision, independent of our code."""
    out = torch.empty(len(pos), dim // 2, 2, 2, dtype=torch.float64)
    for i, p in enumerate(pos.tolist()):
        for d in range(dim // 2):
            angle = p / theta ** (2 * d / dim)
            c, s = math.cos(angle), math.sin(angle)
            out[i, d] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return out


def test_mps_angles_are_float32_elsewhere_float64():
    assert rope_dtype("mps") == torch.float32
    assert rope_dtype("cuda") == rope_dtype("cpu") == torch.float64


def test_float32_rope_matches_float64_math():
    for dim in (16, 56):  # FLUX's RoPE axes
        exact = float64_rope(POSITIONS, dim, 10_000)
        mps = rope(POSITIONS, dim, 10_000, device_type="mps")
        assert mps.dtype == torch.float32
        # float32 angles p * omega with p < 600: |error| < 600 * 2^-24 ≈ 4e-5 rad
        assert (mps.double() - exact).abs().max() < 1e-4
        assert (rope(POSITIONS, dim, 10_000).double() - exact).abs().max() < 1e-6  # float64 path


def test_mps_rope_allocates_no_float64():
    recorder = DtypeRecorder()
    with recorder:
        rope(POSITIONS, 56, 10_000, device_type="mps")
    assert torch.float64 not in recorder.dtypes
    control = DtypeRecorder()
    with control:
        rope(POSITIONS, 56, 10_000)
    assert torch.float64 in control.dtypes  # the recorder does see float64 where there is some


def test_transformer_pass_on_the_mps_path_allocates_no_float64(tmp_path, monkeypatch):
    path = save_layouts(tiny_diffusers_transformer(seed=3), tmp_path)["single"]
    model = load_flux_transformer(path, dtype=torch.float16, axes_dim=TINY_AXES)
    ids = wrap_pad_ids(image_ids(4, 8), 4, 8)[None]
    gen = torch.Generator().manual_seed(0)
    args = (
        torch.randn(1, ids.shape[1], 64, generator=gen).half(), ids,
        torch.randn(1, 7, 32, generator=gen).half(), torch.zeros(1, 7, 3), torch.tensor([0.5]),
        torch.randn(1, 24, generator=gen).half(), torch.tensor([2.8]),
    )  # fmt: skip
    with torch.no_grad():
        on_cpu = model(*args)
    monkeypatch.setattr(flux_layers, "rope_dtype", lambda _device_type: torch.float32)  # as on MPS
    recorder = DtypeRecorder()
    with torch.no_grad(), recorder:
        on_mps_path = model(*args)
    assert torch.float64 not in recorder.dtypes
    assert torch.isfinite(on_mps_path).all()
    assert (on_mps_path.float() - on_cpu.float()).abs().max() <= 2e-3 * on_cpu.float().abs().max()


@pytest.mark.parametrize("mode", ["fp8", "stream"])
def test_fp8_memory_modes_refused_on_mps(mode):
    with pytest.raises(DeviceError) as exc:
        plan_memory(mode, torch.device("mps"))
    assert "MPS" in exc.value.message and "float8" in exc.value.message
    assert "resident" in exc.value.hint


def test_mps_auto_and_resident_plans():
    for mode in ("auto", "resident"):
        plan = plan_memory(mode, torch.device("mps"))
        assert plan.mode == "resident" and not plan.quantize_fp8
