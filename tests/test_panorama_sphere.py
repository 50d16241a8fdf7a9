"""The image <-> direction conventions (Blender world space) and the solid-angle weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dit360_blender.panorama import sphere
from dit360_blender.panorama.color import linear_to_srgb, srgb_to_linear


def test_uv_direction_round_trip():
    rng = np.random.default_rng(0)
    u = rng.uniform(0.0, 1.0, 1000)
    v = rng.uniform(0.001, 0.999, 1000)  # the poles themselves have no azimuth
    d = sphere.direction_from_uv(u, v)
    assert np.allclose(np.linalg.norm(d, axis=-1), 1.0)
    u2, v2 = sphere.uv_from_direction(d)
    assert np.allclose(v2, v, atol=1e-12)
    assert np.allclose((u2 - u + 0.5) % 1.0 - 0.5, 0.0, atol=1e-12)
    assert np.all((u2 >= 0.0) & (u2 < 1.0))


@pytest.mark.parametrize(
    "direction,uv",
    [
        ((1, 0, 0), (0.5, 0.5)),  # the image centre looks along +X
        ((0, 1, 0), (0.25, 0.5)),
        ((0, -1, 0), (0.75, 0.5)),
        ((-1, 0, 0), (0.0, 0.5)),  # the wrap
        ((0, 0, 1), (0.5, 1.0)),  # zenith: v = 1 (top row of the PNG)
        ((0, 0, -1), (0.5, 0.0)),
        ((1, 0, 1), (0.5, 0.75)),
    ],
)
def test_known_directions_match_blenders_formula(direction, uv):
    # Cycles/OSL/EEVEE: u = -atan2(y, x) / 2pi + 0.5, v = atan2(z, hypot(x, y)) / pi + 0.5
    u, v = sphere.uv_from_direction(direction)
    x, y, z = direction
    assert (u - (-math.atan2(y, x) / (2 * math.pi) + 0.5)) % 1.0 == pytest.approx(0.0, abs=1e-12)
    assert v == pytest.approx(math.atan2(z, math.hypot(x, y)) / math.pi + 0.5)
    assert (u, v) == pytest.approx(uv)


def test_angles_and_pixels():
    d = sphere.direction_from_angles(30.0, 40.0)
    assert sphere.angles_from_direction(d) == pytest.approx((30.0, 40.0))
    u, v = sphere.uv_from_direction(d)
    assert u == pytest.approx(0.5 - 30.0 / 360.0)  # azimuth grows to the LEFT in the image
    assert v == pytest.approx(0.5 + 40.0 / 180.0)
    row, col = sphere.pixel_from_uv(u, v, 1024, 2048)
    assert sphere.uv_from_pixel(row, col, 1024, 2048) == pytest.approx((u, v))
    # pixel (0, 0) is the top-left: just below the zenith, at the wrap
    u0, v0 = sphere.uv_from_pixel(0, 0, 1024, 2048)
    assert v0 == pytest.approx(1 - 0.5 / 1024) and u0 == pytest.approx(0.5 / 2048)
    assert math.degrees(sphere.row_elevations(1024)[0]) == pytest.approx(90 - 90 / 1024)
    assert math.degrees(sphere.column_azimuths(2048)[1024]) == pytest.approx(-180 / 2048)


def test_solid_angles_and_cosine_weights_are_exact():
    for h, w in ((4, 8), (256, 512), (1024, 2048)):
        omega = sphere.row_solid_angles(h, w)
        assert omega.sum() * w == pytest.approx(4 * math.pi)
        assert sphere.row_upward_cosine_weights(h, w).sum() * w == pytest.approx(math.pi)
    omega = sphere.row_solid_angles(1024, 2048)
    assert omega[0] / omega[512] == pytest.approx(math.cos(math.radians(90 - 90 / 1024)), rel=1e-3)


def test_sun_lamp_rotation_points_local_z_at_the_sun():
    for az, el in ((0, 90), (30, 40), (-120, 5), (179, 60)):
        d = sphere.direction_from_angles(az, el)
        rx, ry, rz = sphere.sun_lamp_rotation(d)
        # Euler XYZ: R = Rz(rz) @ Ry(ry) @ Rx(rx)
        cx, sx, cy, sy, cz, sz = (
            math.cos(rx),
            math.sin(rx),
            math.cos(ry),
            math.sin(ry),
            math.cos(rz),
            math.sin(rz),
        )
        rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        assert rot_z @ rot_y @ rot_x @ np.array([0, 0, 1.0]) == pytest.approx(d, abs=1e-12)


def test_srgb_eotf_is_exact_and_inverts():
    assert srgb_to_linear(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    assert float(srgb_to_linear(np.uint8(128))) == pytest.approx(((128 / 255 + 0.055) / 1.055) ** 2.4)
    assert float(srgb_to_linear(np.float32(0.04))) == pytest.approx(0.04 / 12.92)
    x = np.linspace(0, 1, 101)
    assert np.allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-6)


def test_package_imports_only_numpy_and_the_standard_library():
    # what importing the package adds on top of numpy (numpy itself brings helpers like cython_runtime)
    code = (
        "import sys, json, numpy; before = set(sys.modules); import dit360_blender.panorama; "
        "added = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(json.dumps(sorted(added - set(sys.stdlib_module_names) - {'dit360_blender'})))"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
