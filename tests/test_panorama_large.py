"""Large panoramas (panorama/large.py): the sun found on the 2048-wide copy is the sun the full-size
`detect_sun` finds; the banded, on-demand HDR equals `expand_to_hdr`'s (pixels, files and numbers);
and a whole 8192x4096 analysis + .hdr/.exr write stays within a stated peak-memory bound (VmHWM of a
subprocess, as tests/test_loading_memory.py measures)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
from test_panorama_synthetic import SUN_COLOR, encode, sky_linear

from dit360_blender.panorama import cubemap, large, seam
from dit360_blender.panorama.analyze import analyze, write_lighting_files
from dit360_blender.panorama.color import srgb_to_linear
from dit360_blender.panorama.hdr import expand_to_hdr
from dit360_blender.panorama.sphere import column_azimuths, direction_from_angles, row_elevations
from dit360_blender.panorama.sun import detect_sun

ROOT = Path(__file__).resolve().parents[1]


def big_sun_panorama(azimuth: float, elevation: float, height: int, width: int, radius: float = 1.0):
    """uint8 sRGB: the synthetic sky of test_panorama_synthetic (drawn at 512 wide, repeated up) with a
    sharp sun disc and glow drawn at full size in the rows around it (add_sun's model, cheaply)."""
    f = max(1, width // 512)
    rgb = encode(sky_linear(height // f, width // f)).repeat(f, axis=0).repeat(f, axis=1)
    el = row_elevations(height)
    rows = np.nonzero(np.abs(np.degrees(el) - elevation) < radius + 25)[0]
    az = column_azimuths(width)
    cos_el = np.cos(el[rows])[:, None]
    d = np.stack(np.broadcast_arrays(cos_el * np.cos(az), cos_el * np.sin(az), np.sin(el[rows])[:, None]), -1)
    dist = np.degrees(np.arccos(np.clip(d @ direction_from_angles(azimuth, elevation), -1, 1)))
    color = np.asarray(SUN_COLOR)
    band = (
        srgb_to_linear(rgb[rows]) + 0.25 * color * np.exp(-np.clip(dist - radius, 0, None) / 3.0)[..., None]
    )
    band[dist <= radius] = 50.0 * color
    rgb[rows] = encode(band)
    return rgb


def angle(a, b) -> float:
    return math.degrees(math.acos(min(1.0, float(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))))


@pytest.fixture(scope="module")
def wide():
    """4096x2048 (analysed at 2048x1024) with the sun at azimuth 30, elevation 40."""
    return big_sun_panorama(30.0, 40.0, 2048, 4096)


@pytest.mark.parametrize("where", [(30.0, 40.0), (180.0, 55.0)])  # the second one sits on the wrap
def test_the_sun_found_at_2k_is_the_full_size_sun(wide, where):
    rgb = wide if where == (30.0, 40.0) else big_sun_panorama(*where, 2048, 4096)
    full = detect_sun(rgb).sun  # the existing full-size path
    small = large.analysis_copy(rgb)
    assert small.shape == (1024, 2048, 3)
    ours = large.detect_sun_large(rgb, small).sun
    assert full is not None and ours is not None
    assert angle(ours.direction, full.direction) < 0.005  # the same core: measured 0
    assert angle(ours.direction, direction_from_angles(*where)) < 0.05
    assert np.array_equal(ours.mask, full.mask)
    assert ours.diameter_deg == pytest.approx(full.diameter_deg, rel=1e-9)
    assert ours.pixel_count == full.pixel_count
    # what comes from the 2K copy: the colour and contrast are the same kind of estimate
    assert np.allclose(ours.color, full.color, atol=0.05)
    assert ours.contrast == pytest.approx(full.contrast, rel=0.1)


def test_the_banded_expansion_equals_the_untiled_one(tmp_path):
    rgb = big_sun_panorama(-150.0, 30.0, 1024, 2048)
    detection = detect_sun(rgb)
    reference = expand_to_hdr(rgb, detection=detection)
    ours = large.expand_large(rgb, detection=detection)
    for name in ("sun_gain", "sun_share", "exposure", "upward_irradiance"):
        assert getattr(ours, name) == pytest.approx(getattr(reference, name), rel=1e-9), name
    assert np.allclose(ours.sun_irradiance_rgb, reference.sun_irradiance_rgb, rtol=1e-9)
    assert ours.sun_gain > 10  # a real sun gain, not the trivial 1
    for kind in ("hdr", "lighting"):
        assert np.array_equal(np.asarray(getattr(ours, kind)), getattr(reference, kind)), kind
    # and the files: the .hdr byte for byte, the EXR pixel for pixel
    write_lighting_files(tmp_path / "ours.png", ours, exr=True)
    write_lighting_files(tmp_path / "ref.png", reference, exr=True)
    for suffix in (".hdr", "_lighting.hdr"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    for suffix in (".exr", "_lighting.exr"):
        with (
            OpenEXR.File(str(tmp_path / f"ours{suffix}")) as a,
            OpenEXR.File(str(tmp_path / f"ref{suffix}")) as b,
        ):
            ours_px, ref_px = a.channels()["RGB"].pixels, b.channels()["RGB"].pixels
            assert ours_px.dtype == ref_px.dtype and np.array_equal(ours_px, ref_px)


def test_many_small_bands_change_nothing(monkeypatch):
    rgb = big_sun_panorama(-100.0, 20.0, 512, 1024)
    detection = detect_sun(rgb)
    reference = expand_to_hdr(rgb, detection=detection)
    monkeypatch.setattr(large, "row_bands", lambda h, w, pixels=None: seam.row_bands(h, w, 7 * w))  # 7 rows
    ours = large.expand_large(rgb, detection=detection)
    assert np.array_equal(np.asarray(ours.hdr), reference.hdr)
    assert ours.exposure == pytest.approx(reference.exposure, rel=1e-9)
    # the cube map of the on-demand image is the cube map of the image
    face = cubemap.cube_face(ours.hdr, "pz", 64)
    assert np.allclose(face, cubemap.cube_face(reference.hdr, "pz", 64), rtol=1e-6, atol=1e-7)


def test_analyze_takes_the_banded_path_above_2048(wide):
    metadata, hdr = analyze(wide)
    assert isinstance(hdr.hdr, large.Environment) and hdr.settings["analysis_width"] == 2048
    full = detect_sun(wide).sun
    found = metadata["lighting"]["sun"]["sun"]
    assert angle(found["direction"], full.direction) < 0.005
    # the seam statistics are the full-size ones (measured in bands), the pole detail the 2K copy's
    reference = seam.seam_score(wide)
    for key in ("seam_z", "seam_z_offset", "wrap_step", "wrap_offset"):
        assert metadata["seam"][key] == pytest.approx(getattr(reference, key), rel=1e-9, abs=1e-12)
    assert metadata["seam"]["pole_detail_ratio"] == pytest.approx(reference.pole_detail_ratio, rel=0.3)


# Peak RSS of an 8192x4096 analysis and write (.hdr + .exr, both environments), in a fresh process:
# VmHWM is reset (clear_refs 5) after the 8-bit panorama exists, so what is measured is the analysis.
PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from test_panorama_large import big_sun_panorama
from dit360_blender.panorama.analyze import analyze, write_lighting_files
from dit360_blender.panorama.color import srgb_to_linear

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

rgb = big_sun_panorama(30.0, 40.0, 4096, 8192)
import gc; gc.collect()
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
metadata, hdr = analyze(rgb)
files = write_lighting_files(sys.argv[1], hdr, exr=True)
print(json.dumps({"before_kib": before, "after_kib": status("VmHWM:"), "found": metadata["lighting"]["sun"]["found"],
                  "files": sorted(files)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_an_8k_analysis_and_write_stays_within_its_memory_bound(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "pano.png"), str(ROOT / "tests")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["found"] and report["files"] == ["hdr", "hdr_exr", "lighting", "lighting_exr"]
    pixels = 8192 * 4096
    growth = (report["after_kib"] - report["before_kib"]) * 1024
    # bound: the half-float EXR array (6 bytes per pixel, 192 MiB here) plus 384 MiB that do not grow
    # with the size (the 2048-wide analysis copy and detect_sun's float64 arrays at 2K, the banded
    # temporaries, the seam thread's band): 576 MiB at 8K, 1.2 GiB at 16K. Measured 345 MiB here.
    # The untiled path held several float64 copies of 24 bytes per pixel (800 MiB each at 8K).
    bound = 6 * pixels + 384 * 2**20
    assert growth < bound, f"peak RSS grew {growth / 2**20:.0f} MiB ({growth / pixels:.1f} B/pixel)"
    print(f"8192x4096: peak RSS grew {growth / 2**20:.0f} MiB ({growth / pixels:.1f} B/pixel)")
