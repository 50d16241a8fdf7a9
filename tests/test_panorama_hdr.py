"""HDR expansion, the sun's share and lamp, the exposure rule, and Radiance .hdr files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_panorama_synthetic import direction_grid, encode, overcast, sun_panorama

from dit360_blender.panorama import sphere
from dit360_blender.panorama.color import linear_image, luminance
from dit360_blender.panorama.hdr import expand_highlights, expand_to_hdr, exposure_for, upward_irradiance
from dit360_blender.panorama.rgbe import decode_rgbe, encode_rgbe, read_hdr, write_hdr, write_hdr_files

H, W = 256, 512
OMEGA = sphere.row_solid_angles(H, W)[:, None] * np.ones((1, W))
UPPER = (sphere.row_elevations(H) > 0)[:, None] & np.ones((1, W), bool)


def share_of(image, mask):
    weighted = OMEGA * luminance(image.astype(np.float64))
    return weighted[mask].sum() / weighted.sum()


@pytest.mark.parametrize("azimuth,elevation", [(30.0, 40.0), (176.4, 25.0), (-176.4, 25.0), (100.0, 80.0)])
def test_hdr_sun_share_sky_and_clamp(azimuth, elevation):
    image = sun_panorama(azimuth, elevation)
    result = expand_to_hdr(image, sun_share=0.6)
    sun = result.sun
    assert sun is not None and result.hdr.dtype == np.float32 and result.hdr.shape == (H, W, 3)
    mask = sun.mask

    # the brightest region of the HDR is the sun, where it was drawn
    lum = luminance(result.hdr)
    r, c = np.unravel_index(np.argmax(lum), lum.shape)
    assert mask[r, c]
    truth = sphere.direction_from_angles(azimuth, elevation)
    assert (
        math.degrees(math.acos(min(1.0, float(direction_grid(H, W)[r, c] @ truth))))
        < 2.0 + sun.diameter_deg / 2
    )

    # the sun carries the requested share of the solid-angle-weighted luminance
    assert share_of(result.hdr, mask) == pytest.approx(0.6, abs=0.02)
    assert result.sun_share == pytest.approx(share_of(result.hdr, mask), abs=1e-6)

    # the sky without the sun stays close to the linearised PNG: every pixel within [1, 2]x
    ldr = luminance(linear_image(image).astype(np.float64))
    sky = UPPER & ~mask
    ratio = np.average(lum[sky], weights=OMEGA[sky]) / np.average(ldr[sky], weights=OMEGA[sky])
    assert 0.5 <= ratio <= 2.0 and ratio == pytest.approx(1.0, abs=0.1)
    assert np.all(lum[~mask] >= ldr[~mask] * (1 - 1e-5)) and np.all(lum[~mask] <= 2.0 * ldr[~mask] + 1e-6)

    # the lighting variant: the sun's pixels at the sky level around it, the rest untouched
    lighting_lum = luminance(result.lighting)
    sky_level = luminance(expand_highlights(np.asarray(sun.sky_rgb)))
    assert lighting_lum[mask].max() <= sky_level * (1 + 1e-5)
    assert np.array_equal(result.lighting[~mask], result.hdr[~mask])

    # the lamp replaces exactly what was removed
    removed = ((result.hdr - result.lighting).astype(np.float64) * OMEGA[..., None])[mask].sum(axis=0)
    assert np.allclose(result.sun_irradiance_rgb, removed, rtol=1e-4)
    lamp = result.sun_lamp()
    assert np.allclose(np.array(lamp["color"]) * lamp["strength"], result.exposure * removed, rtol=1e-4)
    assert max(lamp["color"]) == pytest.approx(1.0)
    assert lamp["angle"] == pytest.approx(math.radians(sun.diameter_deg))
    assert lamp["rotation_euler"] == pytest.approx(list(sphere.sun_lamp_rotation(sun.direction)))
    assert result.sun_lamp(world_strength=2.0)["strength"] == pytest.approx(2.0 * max(removed), rel=1e-4)


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8, 0.95])
def test_requested_share_is_reached(share):
    result = expand_to_hdr(sun_panorama(-40.0, 30.0), sun_share=share)
    assert result.sun_share == pytest.approx(share, abs=0.02)
    assert share_of(result.hdr, result.sun.mask) == pytest.approx(share, abs=0.02)


def test_the_sun_is_never_made_darker_than_in_the_png():
    image = sun_panorama(-40.0, 30.0)
    result = expand_to_hdr(image, sun_share=0.0)
    assert result.sun_gain == 1.0
    # gain 1: the sun stays as the highlight curve left it (white -> 2), its colour aside
    base_share = share_of(expand_highlights(linear_image(image)), result.sun.mask)
    assert result.sun_share == pytest.approx(base_share, rel=0.05) and result.sun_share > 0.0
    with pytest.raises(ValueError):
        expand_to_hdr(image, sun_share=1.0)


def test_grey_card_exposure_rule():
    result = expand_to_hdr(sun_panorama(30.0, 40.0), sun_share=0.6)
    # an albedo-0.18 card facing up renders albedo * strength * E_up / pi = 0.18
    assert 0.18 * result.exposure * result.upward_irradiance / math.pi == pytest.approx(0.18)
    assert result.upward_irradiance == pytest.approx(upward_irradiance(result.hdr))
    # a uniform white world of strength 1 already gives the card 0.18: exposure 1
    white = np.ones((H, W, 3))
    assert upward_irradiance(white) == pytest.approx(math.pi)
    assert exposure_for(upward_irradiance(white)) == pytest.approx(1.0)
    # the sun lamp + the lighting world give the card the same irradiance as the hdr world
    sun = result.sun
    lamp_up = luminance(np.asarray(result.sun_irradiance_rgb)) * math.sin(math.radians(sun.elevation_deg))
    assert upward_irradiance(result.lighting) + lamp_up == pytest.approx(result.upward_irradiance, rel=0.01)
    assert exposure_for(0.0) == 256.0 and exposure_for(1e9) == 1 / 256


def test_no_sun_means_highlights_only():
    image = overcast(bright=True)
    result = expand_to_hdr(image)
    assert result.sun is None and result.sun_lamp() is None
    assert result.sun_share == 0.0 and result.sun_irradiance_rgb == (0.0, 0.0, 0.0)
    assert np.array_equal(result.hdr, result.lighting)
    assert np.allclose(result.hdr, expand_highlights(linear_image(image)), rtol=1e-6)
    assert result.exposure > 0
    d = result.to_dict()
    assert json.loads(json.dumps(d)) == d and d["sun"]["found"] is False


def test_highlight_curve():
    y = np.linspace(0.0, 1.0, 1001)
    grey = np.repeat(y[:, None], 3, axis=1)
    out = luminance(expand_highlights(grey, knee=0.6, gain=2.0))
    assert np.allclose(out[y <= 0.6], y[y <= 0.6])  # identity below the knee
    assert out[-1] == pytest.approx(2.0)  # white becomes 2
    assert np.all(np.diff(out) > 0)  # monotone
    slope = np.diff(out) / np.diff(y)
    assert slope[600] == pytest.approx(1.0, abs=0.02)  # C1 at the knee
    colour = expand_highlights(np.array([0.9, 0.8, 0.5]))
    assert colour / colour.max() == pytest.approx(np.array([0.9, 0.8, 0.5]) / 0.9)  # hue kept


def test_result_dict_is_json_ready():
    result = expand_to_hdr(sun_panorama(30.0, 40.0), sun_share=0.6)
    d = result.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["sun"]["found"] and d["sun_lamp"]["strength"] > 0
    assert {"sun_share", "exposure", "upward_irradiance", "sun_irradiance_rgb", "settings"} <= set(d)


def test_full_size_works():  # timings never decide a test (about 0.6 s here)
    image = sun_panorama(30.0, 40.0, height=1024, width=2048)
    result = expand_to_hdr(image)
    assert result.to_dict()["sun"]["found"]


# --- Radiance .hdr ---------------------------------------------------------------------------


def test_rgbe_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = (10.0 ** rng.uniform(-4, 4, (32, 64, 1))) * rng.uniform(0, 1, (32, 64, 3))
    image[0, :4] = 0.0
    image[1, 0] = (1e4, 1e-3, 0.0)  # dark channels next to a bright one keep only absolute precision
    path = write_hdr(tmp_path / "x.hdr", image.astype(np.float32))
    assert path.read_bytes().startswith(b"#?RADIANCE\n")
    back = read_hdr(path)
    assert back.shape == image.shape and back.dtype == np.float32
    peak = image.max(axis=2, keepdims=True)
    assert np.all(np.abs(back - image) <= 0.01 * peak + 1e-30)  # RGBE: ~1/256 of the pixel's largest channel
    big = image.max(axis=2) > 0
    rel = np.abs(back - image).max(axis=2)[big] / image.max(axis=2)[big]
    assert rel.max() < 0.004
    assert np.all(back[0, :4] == 0.0)


def _rle_scanlines(rgbe: np.ndarray) -> bytes:
    """New-style RLE, as Radiance/Blender write it, to check the reader (runs for repeats, literals)."""
    out = bytearray()
    height, width = rgbe.shape[:2]
    for row in rgbe:
        out += bytes([2, 2, width >> 8, width & 255])
        for channel in range(4):
            values = row[:, channel].tolist()
            x = 0
            while x < width:
                run = 1
                while x + run < width and values[x + run] == values[x] and run < 127:
                    run += 1
                if run >= 3:
                    out += bytes([128 + run, values[x]])
                    x += run
                else:
                    n = min(128, width - x)
                    out += bytes([n]) + bytes(values[x : x + n])
                    x += n
    return bytes(out)


def test_reader_handles_run_length_encoded_files(tmp_path):
    image = np.zeros((8, 40, 3))
    image[:, :20] = (0.5, 0.25, 0.125)  # runs
    image[:, 20:] = np.random.default_rng(1).uniform(0, 4, (8, 20, 3))  # literals
    rgbe = encode_rgbe(image)
    path = tmp_path / "rle.hdr"
    path.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 8 +X 40\n" + _rle_scanlines(rgbe))
    assert np.array_equal(read_hdr(path), decode_rgbe(rgbe))


def _rgbe_by_hand(pixel) -> tuple[int, int, int, int]:
    """Radiance's rule for one pixel in Python floats: the shared exponent of the largest channel."""
    values = [max(float(c), 0.0) for c in pixel]
    peak = max(values)
    _, exponent = math.frexp(peak)
    if peak <= 1e-32 or exponent + 128 < 1:
        return (0, 0, 0, 0)
    return (*(min(255, math.floor(v * 256.0 / 2.0**exponent)) for v in values), exponent + 128)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rgbe_bytes_follow_the_rule_in_either_float_type(dtype):
    rng = np.random.default_rng(7)
    image = rng.lognormal(0.0, 6.0, (20, 30, 3)) * rng.choice(
        [0.0, 1.0, -1.0], (20, 30, 3), p=[0.1, 0.8, 0.1]
    )
    image[0, :8, 1] = [1e-40, 1e-33, 1.6e38, 65504.0, 0.5, 255.99, 2.0**-126, 1.1e-32]
    image = image.astype(dtype)
    expected = np.array([[_rgbe_by_hand(px) for px in row] for row in image], dtype=np.uint8)
    assert np.array_equal(encode_rgbe(image), expected)


def test_bad_files_are_refused(tmp_path):
    (tmp_path / "a.hdr").write_bytes(b"P6\n")
    with pytest.raises(ValueError, match="not a Radiance"):
        read_hdr(tmp_path / "a.hdr")
    (tmp_path / "b.hdr").write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n+Y 2 +X 2\n" + bytes(16))
    with pytest.raises(ValueError, match="orientation"):
        read_hdr(tmp_path / "b.hdr")
    with pytest.raises(ValueError):
        write_hdr(tmp_path / "c.hdr", np.full((2, 2, 3), np.nan))


def test_hdr_files_next_to_the_png(tmp_path):
    result = expand_to_hdr(sun_panorama(30.0, 40.0), sun_share=0.6)
    paths = write_hdr_files(tmp_path / "beach_42.png", result)
    assert paths["hdr"].name == "beach_42.hdr" and paths["lighting"].name == "beach_42_lighting.hdr"
    full = read_hdr(paths["hdr"])
    lit = read_hdr(paths["lighting"])
    assert np.all(np.abs(full - result.hdr) <= 0.01 * result.hdr.max(axis=2, keepdims=True))
    assert luminance(full)[result.sun.mask].min() > 100 * luminance(lit)[result.sun.mask].max()
    assert not list(tmp_path.glob(".partial-*"))
    assert encode(result.hdr).shape == (H, W, 3)  # the HDR still displays as the PNG (clipped)


def test_analysis_of_a_sunny_panorama_follows_the_protocol_schema():
    """What crosses to Blender (sun lamp, seam, exposure) has a typed schema in the protocol;
    a real analysis with a sun passes it, and a poisoned copy is refused."""
    import copy

    from dit360_blender.panorama.analyze import analyze
    from dit360_blender.protocol import ProtocolError, check_analysis

    image = sun_panorama(30.0, 40.0, height=128, width=256)
    metadata, _ = analyze(image)
    assert metadata["lighting"]["sun_lamp"] is not None
    check_analysis(metadata)
    for poison in (
        lambda m: m["lighting"]["sun_lamp"].pop("strength"),
        lambda m: m["lighting"]["sun_lamp"].__setitem__("color", [1.0, "red", 0.0]),
        lambda m: m["lighting"].__setitem__("exposure", float("nan")),
        lambda m: m["seam"].__setitem__("seam_ok", "yes"),
        lambda m: m["lighting"]["sun"].__setitem__("sun", {"azimuth_deg": 1.0}),
    ):
        bad = copy.deepcopy(metadata)
        poison(bad)
        with pytest.raises(ProtocolError):
            check_analysis(bad)
