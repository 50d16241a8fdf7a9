"""The analysis on every job's tail (seam statistics, pole detail, sun, HDR expansion) against
references written here straight from the module docstrings' formulas: plain float64 loops and
whole-image sums, no shared helpers beyond the documented geometry (sphere.py) and colour tables.

The production code takes shortcuts for speed (integer column differences, one matrix product per
band of rows, flat gathers, touching only the pixels above the knee or in the sun); these tests are
what says the shortcuts compute the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dit360_blender.panorama import seam
from dit360_blender.panorama.color import LUMA_709, _eotf
from dit360_blender.panorama.hdr import expand_to_hdr
from dit360_blender.panorama.sphere import row_solid_angles, row_upward_cosine_weights, uv_from_direction
from dit360_blender.panorama.sun import detect_sun


def _random_panorama(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3))
    smooth = np.cumsum(rng.normal(0, 6, (height, width, 3)), axis=1)  # texture with structure
    return np.clip(base * 0.3 + 90 + smooth, 0, 255).astype(np.uint8)


def _reference_steps_offsets(image: np.ndarray, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 statistics of seam.py's docstring, row by row and band by band."""
    unit = image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    height, width = unit.shape[:2]
    w = row_solid_angles(height, width)
    diff = np.concatenate([unit[:, 1:] - unit[:, :-1], unit[:, :1] - unit[:, -1:]], axis=1)
    steps = np.zeros(width)
    for r in range(height):
        steps += w[r] * np.abs(diff[r]).mean(axis=1)
    steps /= w.sum()
    offsets = np.zeros(width)
    band_total = 0.0
    for b in range(bands):
        rows = range(b * height // bands, (b + 1) * height // bands)
        wb = sum(w[r] for r in rows)
        signed = sum(w[r] * diff[r] for r in rows) / wb  # (W, 3)
        offsets += wb * np.abs(signed).mean(axis=1)
        band_total += wb
    return steps, offsets / band_total


@pytest.mark.parametrize("kind", ["uint8", "float32"])
@pytest.mark.parametrize("chunk_rows", [None, 5])  # one pass, or bands of 5 rows that cut the row bands
def test_column_statistics_equal_the_formula(kind, chunk_rows, monkeypatch):
    image = _random_panorama(48, 80, seed=3)
    if kind == "float32":
        image = image.astype(np.float32) / 255.0
    if chunk_rows is not None:
        monkeypatch.setattr(
            seam,
            "row_bands",
            lambda h, w, pixels=None: [slice(s, min(h, s + chunk_rows)) for s in range(0, h, chunk_rows)],
        )
    steps, offsets = seam.column_statistics(image, bands=7)
    want_steps, want_offsets = _reference_steps_offsets(image, bands=7)
    tol = 1e-12 if kind == "uint8" else 1e-6  # float32 input: its own k/255 rounding
    np.testing.assert_allclose(steps, want_steps, rtol=tol, atol=1e-15)
    np.testing.assert_allclose(offsets, want_offsets, rtol=tol, atol=1e-15)
    np.testing.assert_allclose(seam.column_steps(image), want_steps, rtol=tol, atol=1e-15)
    np.testing.assert_allclose(seam.column_offsets(image, 7), want_offsets, rtol=tol, atol=1e-15)


def test_cube_faces_sample_where_sphere_says():
    """Each face pixel bilinearly samples the panorama at uv_from_direction of its direction."""
    rng = np.random.default_rng(5)
    height, width, n = 32, 64, 9
    luma = rng.random((height, width))
    for face, (centre, right, down) in seam._FACES.items():
        got = seam._cube_face(luma, face, n)
        want = np.empty((n, n))
        for i in range(n):
            for j in range(n):
                t_down, t_right = (i + 0.5) / n * 2 - 1, (j + 0.5) / n * 2 - 1
                d = np.add(np.add(centre, np.multiply(t_right, right)), np.multiply(t_down, down))
                u, v = uv_from_direction(d / np.linalg.norm(d))
                x, y = u * width - 0.5, min(max((1 - v) * height - 0.5, 0.0), height - 1.0)
                x0, y0 = math.floor(x), math.floor(y)
                fx, fy = x - x0, y - y0
                y1 = min(y0 + 1, height - 1)

                def at(r, c):
                    return luma[r, c % width]

                top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
                bottom = at(y1, x0) * (1 - fx) + at(y1, x0 + 1) * fx
                want[i, j] = top * (1 - fy) + bottom * fy
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=face)


def _sunny(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lat = (0.5 - (np.arange(height) + 0.5) / height)[:, None] * np.pi
    lon = (np.arange(width) + 0.5)[None, :] / width * 2 * np.pi
    sky = np.stack([0.4 + 0.2 * lat + 0 * lon, 0.55 + 0.2 * lat + 0 * lon, 0.85 + 0.05 * lat + 0 * lon], -1)
    img = np.where((lat > 0)[..., None], sky, 0.3)
    d = np.arccos(np.clip(np.sin(lat) * np.sin(0.5) + np.cos(lat) * np.cos(0.5) * np.cos(lon - 2.0), -1, 1))
    img[d < 0.06] = 1.0
    img[d < 0.12] = np.maximum(img[d < 0.12], 0.9)  # a glow over the knee around it
    img = img + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def test_hdr_expansion_equals_the_docstring_formulas():
    """Steps 1-4 of hdr.py's docstring, over every pixel in float64, against expand_to_hdr."""
    image = _sunny(128, 256, seed=2)
    share_asked = 0.6
    got = expand_to_hdr(image, sun_share=share_asked)
    sun = got.detection.sun
    assert sun is not None and sun.mask.sum() > 10

    linear = _eotf(image.astype(np.float64) / 255.0).astype(np.float32).astype(np.float64)  # PNG -> Blender
    y = linear @ LUMA_709
    knee, gain = 0.6, 2.0
    a = (gain - 1) / (1 - knee) ** 2
    factor = np.where(y > knee, (y + a * np.clip(y - knee, 0, None) ** 2) / np.maximum(y, 1e-12), 1.0)
    base = linear * factor[..., None]
    omega = np.broadcast_to(row_solid_angles(128, 256)[:, None], y.shape)
    y_base = base @ LUMA_709
    e_sun = (omega * y_base)[sun.mask].sum()
    e_rest = (omega * y_base).sum() - e_sun
    gain_sun = max(1.0, share_asked * e_rest / ((1 - share_asked) * e_sun))
    colour = np.asarray(sun.color) / (np.asarray(sun.color) @ LUMA_709)
    hdr = base.copy()
    hdr[sun.mask] = colour * (gain_sun * y_base[sun.mask])[:, None]
    y_hdr = hdr @ LUMA_709
    share = (omega * y_hdr)[sun.mask].sum() / (omega * y_hdr).sum()
    e_up = float(row_upward_cosine_weights(128, 256) @ y_hdr.sum(axis=1))
    sky = np.asarray(sun.sky_rgb)
    y_sky = sky @ LUMA_709
    fill = sky * ((y_sky + a * max(y_sky - knee, 0) ** 2) / y_sky if y_sky > knee else 1.0)
    lighting = hdr.copy()
    lighting[sun.mask] = fill
    removed = ((hdr - lighting) * omega[..., None])[sun.mask].sum(axis=0)

    np.testing.assert_allclose(got.hdr, hdr, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.lighting, lighting, rtol=1e-6, atol=1e-7)
    assert got.sun_gain == pytest.approx(gain_sun, rel=1e-9)
    assert got.sun_share == pytest.approx(share, rel=1e-9)
    assert got.upward_irradiance == pytest.approx(e_up, rel=1e-9)
    np.testing.assert_allclose(got.sun_irradiance_rgb, np.clip(removed, 0, None), rtol=1e-9)
    assert got.exposure == pytest.approx(min(max(0.18 * math.pi / (0.18 * e_up), 1 / 256), 256), rel=1e-9)


def test_sun_found_the_same_from_bytes_and_from_floats():
    """detect_sun decodes an 8-bit image only where it looks (the candidates and their rings); a
    float image is decoded whole: the same sun, colour and sky level either way."""
    image = _sunny(256, 512, seed=4)
    from_bytes = detect_sun(image).sun
    from_floats = detect_sun(image.astype(np.float32) / 255.0).sun
    assert from_bytes is not None and from_floats is not None
    assert np.array_equal(from_bytes.mask, from_floats.mask)
    np.testing.assert_allclose(from_bytes.direction, from_floats.direction, rtol=1e-9)
    np.testing.assert_allclose(from_bytes.color, from_floats.color, rtol=1e-5)
    np.testing.assert_allclose(from_bytes.sky_rgb, from_floats.sky_rgb, rtol=1e-5)
    assert from_bytes.contrast == pytest.approx(from_floats.contrast, rel=1e-5)
    # and the core is the plateau of pixels whose brightest channel is within the tolerance
    peak = image.max(axis=2).astype(np.float32) / np.float32(255)
    assert peak[from_bytes.mask].min() >= 0.92
