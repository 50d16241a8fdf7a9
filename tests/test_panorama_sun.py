"""The sun: found where it was drawn (on the wrap, near the zenith), or reported absent with a reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_panorama_synthetic import encode, overcast, room, sky_linear, sun_panorama

from dit360_blender.panorama import sphere
from dit360_blender.panorama.sun import SunParams, detect_sun, label_regions


def angle_between(a, b) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, float(np.dot(a, b))))))


@pytest.mark.parametrize(
    "azimuth,elevation",
    [
        (30.0, 40.0),
        (176.4, 25.0),  # u ~ 0.01: the disc crosses the wrap
        (-176.4, 25.0),  # u ~ 0.99
        (180.0, 50.0),  # centred on the wrap
        (100.0, 80.0),  # near the zenith: the disc is stretched over many columns
        (-60.0, 88.0),  # the disc covers the zenith
        (-120.0, 6.0),  # low sun
    ],
)
def test_sun_direction_and_size(azimuth, elevation):
    image = sun_panorama(azimuth, elevation, radius_deg=1.5)  # 512x256: 0.7° per pixel
    detection = detect_sun(image)
    assert detection.found, detection.reason
    sun = detection.sun
    truth = sphere.direction_from_angles(azimuth, elevation)
    assert angle_between(sun.direction, truth) < 2.0  # measured: < 0.25°
    assert 2.0 < sun.diameter_deg < 4.5  # drawn 3°
    assert (sun.u, sun.v) == pytest.approx(sphere.uv_from_direction(sun.direction))
    assert sphere.angles_from_direction(sun.direction) == pytest.approx((sun.azimuth_deg, sun.elevation_deg))
    assert sun.mask.sum() == sun.pixel_count
    # drawn warm white (1, 0.93, 0.8) with a faint glow over a cloudy blue sky: the estimate is rough
    assert max(sun.color) == pytest.approx(1.0) and min(sun.color) > 0.6


def test_sun_at_full_size_is_accurate():
    image = sun_panorama(30.0, 40.0, height=1024, width=2048)  # radius 1.5°, the same image as the HDR test's
    sun = detect_sun(image).sun
    assert angle_between(sun.direction, sphere.direction_from_angles(30.0, 40.0)) < 0.1
    assert sun.diameter_deg == pytest.approx(3.0, abs=0.3)


def test_the_suns_colour_comes_from_its_glow_when_the_core_is_clipped():
    orange = (1.0, 0.55, 0.25)
    sun = detect_sun(sun_panorama(20.0, 15.0, color=orange, glow=0.4)).sun
    assert sun.color[0] == 1.0 and sun.color[1] < 0.8 and sun.color[2] < 0.5


def test_a_wrap_crossing_region_is_one_region():
    mask = np.zeros((16, 32), bool)
    mask[5:8, :2] = True
    mask[5:8, -2:] = True
    mask[6, 10] = True
    labels, count = label_regions(mask)
    assert count == 2
    assert labels[5, 0] == labels[7, -1] != labels[6, 10]
    diagonal = np.zeros((16, 32), bool)
    diagonal[3, 0] = diagonal[4, 31] = True  # 8-connected across the wrap
    assert label_regions(diagonal)[1] == 1


def test_top_row_pixels_touch_at_the_zenith():
    mask = np.zeros((16, 32), bool)
    mask[0, 3] = mask[0, 19] = True
    mask[1, 19] = True
    assert label_regions(mask)[1] == 1


def test_labels_match_a_plain_flood_fill():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 80)) > 0.6
    labels, count = label_regions(mask)
    assert (labels > 0).tolist() == mask.tolist()
    # reference: breadth-first search with the same neighbourhood (8-connected, wrapping columns,
    # whole top/bottom rows connected)
    h, w = mask.shape
    seen = np.zeros_like(mask)
    regions = 0
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        regions += 1
        stack = [(r0, c0)]
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            assert labels[r, c] == labels[r0, c0]
            near = [((r + dr), (c + dc) % w) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
            if r in (0, h - 1):
                near += [(r, cc) for cc in range(w)]
            for rr, cc in near:
                if 0 <= rr < h and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
    assert regions == count


@pytest.mark.parametrize(
    "name,image,reason",
    [
        ("overcast", overcast(), "below the saturation level"),
        ("bright overcast", overcast(bright=True), "too large"),
        ("clear sky, no sun", encode(sky_linear(256, 512)), "no sun"),
        ("room with windows and a ceiling panel", room(windows=True), "too large"),
        ("evenly lit room", room(windows=False), "below the saturation level"),
    ],
)
def test_no_sun(name, image, reason):
    detection = detect_sun(image)
    assert not detection.found and detection.sun is None
    assert reason in detection.reason
    assert json.loads(json.dumps(detection.to_dict())) == detection.to_dict()


def test_a_sun_below_the_horizon_is_not_a_sun():
    image = encode(
        np.where(
            (np.arange(256) > 150)[:, None, None],
            sun_panorama(0.0, -20.0).astype(float) / 255,
            sky_linear(256, 512) * 0.5,
        )
    )
    assert not detect_sun(image).found


def test_criteria_are_parameters():
    image = sun_panorama(30.0, 40.0, radius_deg=1.5)
    assert detect_sun(image).found
    assert "too large" in detect_sun(image, SunParams(max_diameter_deg=1.0)).reason
    assert not detect_sun(image, SunParams(min_contrast=50.0)).found
    assert not detect_sun(image, SunParams(min_elevation_deg=45.0)).found


def test_detection_is_json_ready_at_full_size():  # timings never decide a test (about 0.3 s here)
    image = sun_panorama(30.0, 40.0, height=1024, width=2048)
    detection = detect_sun(image)
    d = detection.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["found"] and d["sun"]["direction"] == list(detection.sun.direction)
    assert "mask" not in d["sun"]
