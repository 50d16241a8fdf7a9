"""The Resolution/Refine estimate (estimates.py) against its stated assumptions worked out by hand."""

from __future__ import annotations

import pytest

from dit360_blender import estimates
from dit360_blender.estimates import estimate


def test_native_costs_nothing():
    for refine in (False, True):
        e = estimate("native", refine)
        assert (e.width, e.height, e.total_s, e.ram_bytes, e.tiles) == (2048, 1024, 0.0, 0, 0)
    assert "no extra time" in estimate("native").text()


def test_8k_refine_by_hand():
    e = estimate("8k", True, 0.3, generation_s=10.0)
    assert (e.width, e.height) == (8192, 4096)
    # 1024 px tiles, 896 px stride: 10 columns round the wrap x 5 rows; 0.3 x 28 = 8 steps per tile
    assert e.tiles == 10 * 5
    per_second = 10.0 / (28 * 2 * 12e9 * (128 * 64 + 512))  # the generation's FLOPs took 10 s
    assert e.refine_s == pytest.approx(50 * 8 * 2 * 12e9 * (64 * 64 + 512) * per_second)
    assert e.upscale_s == pytest.approx(70e6 * 2048 * 1024 * per_second)  # one x4 pass
    assert e.ram_bytes == 30 * 8192 * 4096 + 6 * 8192 * 4096 + 384 * 2**20
    assert "8192×4096" in e.text() and "50 refine tiles" in e.text()


def test_16k_chains_two_passes_and_time_follows_the_generation():
    e = estimate("16k", generation_s=7.3)
    assert e.upscale_s == pytest.approx(estimate("8k", generation_s=7.3).upscale_s * (1 + 16))
    assert estimate("16k", generation_s=14.6).upscale_s == pytest.approx(2 * e.upscale_s)
    assert estimate("16k").upscale_s == pytest.approx(e.upscale_s)  # default: the H200's 7.3 s
    assert estimate("4k").total_s < estimate("8k", True).total_s < estimate("16k", True).total_s


def test_the_analysis_share_is_the_measured_bound():
    # the same fixed share tests/test_panorama_large.py asserts for the banded HDR write
    assert estimates.ANALYSIS_FIXED_BYTES == 384 * 2**20


def test_unknown_size_is_refused():
    with pytest.raises(ValueError, match="unknown size"):
        estimate("32k")
