"""Seam score (wrap step and offset vs the interior columns), pole detail, and the `seam` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_panorama_synthetic import (
    direction_grid,
    encode,
    natural_texture,
    periodic_noise,
    sky_linear,
    sun_panorama,
)

from dit360_blender.cli import main
from dit360_blender.panorama.seam import column_offsets, column_steps, pole_detail, seam_score

H, W = 256, 512
RAMP = np.linspace(0.0, 1.0, W)[None, :, None]  # 0 at the first column, 1 at the last: a step at the wrap


def seamless_images():
    yield "sky", encode(sky_linear(H, W))
    yield "smooth noise", encode(0.35 + 0.12 * periodic_noise(H, W, 2.0, 5, 3))
    for seed in (0, 1, 2, 3):
        yield f"natural {seed}", encode(natural_texture(H, W, seed))
    yield "sun on the wrap", sun_panorama(179.0, 20.0)


@pytest.mark.parametrize("name,image", list(seamless_images()), ids=lambda x: x if isinstance(x, str) else "")
def test_seamless_panoramas_score_as_interior(name, image):
    report = seam_score(image)
    assert report.seam_ok, report
    assert abs(report.seam_z) < 3.0 and abs(report.seam_z_offset) < 3.0
    assert 1.0 < report.seam_percentile < 99.9


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_unrelated_texture_across_the_wrap_is_an_outlier(seed):
    # a crop of a wider periodic texture: the two edges were never neighbours
    report = seam_score(encode(natural_texture(H, W, seed, extra_width=W // 3)))
    assert not report.seam_ok
    assert report.seam_z > 6.0 and report.seam_percentile == 100.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_brightness_offset_at_the_wrap_is_an_outlier(seed):
    # a 0.08 linear brightness ramp over the width: invisible inside, a step of 0.08 at the wrap
    report = seam_score(encode(natural_texture(H, W, seed) + 0.08 * RAMP))
    assert not report.seam_ok
    assert report.seam_z_offset > 6.0 and report.seam_percentile_offset > 99.0


def test_colour_offset_at_equal_brightness_is_caught():
    base = natural_texture(H, W, 4)
    shift = np.array([0.06, -0.02, -0.06])  # warmer on one side, about the same luminance
    report = seam_score(encode(base + shift * RAMP))
    assert not report.seam_ok and report.seam_z_offset > 3.5


def test_smooth_sky_with_injected_discontinuity():
    sky = sky_linear(H, W)
    assert seam_score(encode(sky)).seam_ok
    broken = sky.copy()
    broken[:, : W // 8] *= 1.15  # the first columns brighter: a step at the wrap (and one inside)
    assert not seam_score(encode(broken)).seam_ok


def test_flat_images_and_invisible_steps():
    flat = np.full((H, W, 3), 128, np.uint8)
    report = seam_score(flat)
    assert report.seam_ok and report.seam_z == 0.0 and report.pole_detail_ratio is None
    one = flat.copy()
    one[:, : W // 2] = 129  # 1/255 steps at the wrap and in the middle: invisible
    assert seam_score(one).seam_ok
    three = flat.copy()
    three[:, :4] = 131  # 3/255 at the wrap only (and 4 columns later)
    assert not seam_score(three).seam_ok


def test_statistics_indexing_and_float_input():
    img = np.zeros((8, 16, 3), np.float32)
    img[:, 5:] = 0.5
    steps = column_steps(img)
    assert steps.shape == (16,)
    assert steps[4] == pytest.approx(0.5) and steps[15] == pytest.approx(0.5)  # 4|5 and the wrap 15|0
    assert np.count_nonzero(steps) == 2
    assert column_offsets(img)[4] == pytest.approx(0.5)
    # 8-bit images are differenced exactly in integers, float ones as given (float32 k/255 is off by
    # up to 3e-8 relative): the same scores to well below anything the panel shows
    assert seam_score(encode(sky_linear(H, W))).to_dict() == pytest.approx(
        seam_score(encode(sky_linear(H, W)).astype(np.float32) / 255.0).to_dict(), rel=1e-6, abs=1e-6
    )


def grid_upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """×`factor` the way Real-ESRGAN Compact's output is built: half a nearest-neighbour copy (a step
    at every boundary between source pixels, flat inside them) and half a circular linear blend."""
    height, width = image.shape[:2]
    rows = image.repeat(factor, 0).astype(np.float64)
    x = (np.arange(width * factor) + 0.5) / factor - 0.5
    left = np.floor(x).astype(int)
    t = (x - left)[None, :, None]
    linear = rows[:, left % width] * (1 - t) + rows[:, (left + 1) % width] * t
    return np.clip(0.5 * rows.repeat(factor, 1) + 0.5 * linear, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_an_upscales_grid_is_no_seam_with_its_period_and_a_real_seam_still_is(seed):
    upscaled = grid_upscale(encode(natural_texture(64, 128, seed)), 8)
    # among all boundaries the wrap (always between source pixels) looks like a seam: the grid
    assert seam_score(upscaled).seam_z > 10.0
    report = seam_score(upscaled, period=8)  # among the boundaries between source pixels only
    assert report.seam_ok and abs(report.seam_z) < 3.0 and abs(report.seam_z_offset) < 3.0
    assert report.period == 8 and "every 8th column" in report.summary()
    broken = grid_upscale(encode(natural_texture(64, 128, seed, extra_width=40)), 8)
    assert not seam_score(broken, period=8).seam_ok


def test_a_period_must_divide_the_width_and_leave_columns_to_compare():
    image = encode(natural_texture(H, W, 0))
    for period in (0, 3, 32):  # 3 does not divide 512; 512 / 32 = 16 boundaries are too few
        with pytest.raises(ValueError, match="period"):
            seam_score(image, period=period)
    assert seam_score(image, period=1).to_dict() == seam_score(image).to_dict()


def test_report_is_json_ready():
    d = seam_score(encode(natural_texture(H, W, 0))).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert {"seam_z", "seam_percentile", "seam_z_offset", "seam_ok", "pole_detail_ratio", "period"} <= set(d)
    assert d["period"] == 1


def _sphere_texture(height, width, seed=0):
    """Detail defined on the sphere itself (sinusoids of the 3D direction), so equally fine everywhere."""
    rng = np.random.default_rng(seed)
    d = direction_grid(height, width)
    axes = rng.standard_normal((12, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    phases = rng.uniform(0, 2 * np.pi, 12)
    value = np.sin(40.0 * d @ axes.T + phases).sum(axis=-1) / np.sqrt(12 / 2)
    return np.repeat((0.4 + 0.1 * value)[..., None], 3, axis=2)


def test_pole_detail_ratio_means_what_it_says():
    even = encode(_sphere_texture(H, W))
    ratio = pole_detail(even)
    assert 0.7 < ratio["ratio"] < 1.4 and 0.7 < ratio["top"] < 1.4 and 0.7 < ratio["bottom"] < 1.4

    blurred = _sphere_texture(H, W)
    rows = np.abs(90 - (np.arange(H) + 0.5) * 180 / H) > 40  # |latitude| > 40°: smooth, as if smeared
    blurred[rows] = 0.4 + 0.05 * np.sin(np.linspace(0, 2 * np.pi, W, endpoint=False))[None, :, None]
    assert pole_detail(encode(blurred))["ratio"] < 0.4

    pinched = _sphere_texture(H, W)
    pinched[rows] += 0.1 * periodic_noise(H, W, 0.7, 1, 3)[rows]  # pixel noise: tiny features at the poles
    assert pole_detail(encode(pinched))["ratio"] > 2.0


def test_full_size_works():  # timings never decide a test (about 0.4 s here)
    big = np.tile(encode(natural_texture(H, W, 0)), (4, 4, 1))  # 2048x1024, still seamless
    assert seam_score(big).seam_ok


# --- the command line -----------------------------------------------------------------------


def test_cli_seam_json(tmp_path):
    path = tmp_path / "pano.png"
    Image.fromarray(encode(natural_texture(H, W, 0, extra_width=W // 3))).save(path)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", "dit360_blender", "seam", str(path), "--json"],
        capture_output=True, text=True, timeout=60, cwd=root, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["width"] == W and data["height"] == H and data["image"] == str(path)
    assert data["seam_ok"] is False and data["seam_z"] > 6
    for key in ("seam_percentile", "seam_z_offset", "seam_percentile_offset", "pole_detail_ratio"):
        assert isinstance(data[key], float)


def test_cli_seam_text_and_errors(tmp_path, capsys):
    path = tmp_path / "pano.png"
    Image.fromarray(encode(sky_linear(H, W))).save(path)
    assert main(["seam", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no visible seam" in out and "poles" in out
    assert main(["seam", str(tmp_path / "missing.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(tmp_path / "tiny.png")
    assert main(["seam", str(tmp_path / "tiny.png")]) == 2


def test_cli_seam_takes_the_period_from_the_flag_or_the_files_metadata(tmp_path, capsys):
    from PIL import PngImagePlugin

    upscaled = grid_upscale(encode(natural_texture(64, 128, 0)), 8)
    plain, recorded = tmp_path / "plain.png", tmp_path / "recorded.png"
    Image.fromarray(upscaled).save(plain)
    info = PngImagePlugin.PngInfo()
    info.add_text("dit360:seam", json.dumps({"period": 8, "seam_z": 0.0}))  # as an upscale job records it
    Image.fromarray(upscaled).save(recorded, pnginfo=info)
    verdicts = {}
    for name, args in (
        ("plain", [str(plain)]),
        ("flag", [str(plain), "--period", "8"]),
        ("recorded", [str(recorded)]),
    ):
        assert main(["seam", *args, "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        verdicts[name] = (data["seam_ok"], data["period"])
    assert verdicts == {"plain": (False, 1), "flag": (True, 8), "recorded": (True, 8)}
    assert main(["seam", str(plain), "--period", "3"]) == 2  # does not divide 1024
    assert "period" in capsys.readouterr().err
