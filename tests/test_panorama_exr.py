"""The HDR environments as OpenEXR: half float (ZIP) beside the .hdr files, read back with the OpenEXR
bindings' own reader and compared with the float data they came from (float64 bounds of half-float
rounding); float32 where half cannot hold the sun; all files or none when one of them fails."""

from __future__ import annotations

import numpy as np
import OpenEXR
import pytest
from test_panorama_synthetic import sun_panorama

from dit360_blender.panorama.analyze import analyze, write_lighting_files
from dit360_blender.panorama.exr import HALF_MAX, write_exr
from dit360_blender.panorama.rgbe import read_hdr
from dit360_blender.pipeline.errors import OutputWriteError
from dit360_blender.pipeline.make_panorama import _write_files

HALF_EPS = 2.0**-11  # half float's relative rounding error bound (round to nearest, 10-bit mantissa)
HALF_SUBNORMAL_STEP = 2.0**-24


def read_exr(path) -> tuple[np.ndarray, dict]:
    """(H, W, 3) pixels in the file's own type, and the header, through OpenEXR's reader."""
    with OpenEXR.File(str(path), separate_channels=True) as exr:
        channels = exr.channels()
        header = dict(exr.header())  # the live header is emptied when the file closes
        rgb = np.stack([channels[c].pixels for c in "RGB"], axis=-1)
    return rgb, header


def within_half(read: np.ndarray, source: np.ndarray) -> bool:
    error = np.abs(read.astype(np.float64) - source.astype(np.float64))
    return bool(np.all(error <= HALF_EPS * np.abs(source) + HALF_SUBNORMAL_STEP / 2))


@pytest.fixture(scope="module")
def sunny():
    rgb = sun_panorama(30.0, 40.0, height=64, width=128)
    metadata, hdr = analyze(rgb)
    assert hdr.detection.found and float(hdr.hdr.max()) > 10  # a real HDR range, not just [0, 1]
    return rgb, metadata, hdr


def test_random_linear_image_reads_back_within_half_precision(tmp_path):
    rng = np.random.default_rng(7)
    # eight decades of light, including values in half's subnormal range
    image = np.exp(rng.uniform(np.log(1e-6), np.log(5e4), (24, 40, 3))).astype(np.float32)
    path = write_exr(tmp_path / "x.exr", image)
    read, header = read_exr(path)
    assert read.dtype == np.float16 and read.shape == image.shape
    assert header["compression"] == OpenEXR.ZIP_COMPRESSION
    assert within_half(read, image)
    assert not np.array_equal(read.astype(np.float32), image)  # it is half float, not float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.exr"]  # no partial file left


@pytest.mark.parametrize("blocked", ["pano.hdr", "pano_lighting.exr"])
def test_one_file_that_cannot_be_written_leaves_none_of_the_others(tmp_path, sunny, blocked):
    """The four files are written side by side; a folder in the way of one (a real failure of
    os.replace) fails the call and removes the three that were written."""
    _, _, hdr = sunny
    (tmp_path / blocked).mkdir()
    with pytest.raises(OSError):
        write_lighting_files(tmp_path / "pano.png", hdr, exr=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [blocked]  # no file, no partial file


def test_the_environments_beside_the_hdrs_hold_their_linear_data(tmp_path, sunny):
    _, _, hdr = sunny
    files = write_lighting_files(tmp_path / "pano.png", hdr, exr=True)
    assert files == {
        "hdr": str(tmp_path / "pano.hdr"),
        "lighting": str(tmp_path / "pano_lighting.hdr"),
        "hdr_exr": str(tmp_path / "pano.exr"),
        "lighting_exr": str(tmp_path / "pano_lighting.exr"),
    }
    for kind, source in (("hdr", hdr.hdr), ("lighting", hdr.lighting)):
        read, _ = read_exr(files[f"{kind}_exr"])
        assert read.dtype == np.float16 and within_half(read, source), kind
        # and the .hdr of the same kind shows the same light, to RGBE's 1/256 of each pixel's peak
        rgbe = read_hdr(files[kind]).astype(np.float64)
        peak = rgbe.max(axis=-1, keepdims=True)
        assert np.all(np.abs(read.astype(np.float64) - rgbe) <= peak / 256 + HALF_EPS * peak), kind
    assert not np.array_equal(hdr.hdr, hdr.lighting)  # the two files really differ (the sun)


def test_a_sun_brighter_than_half_float_is_written_as_float32(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.uniform(0.0, 2.0, (16, 32, 3)).astype(np.float32)
    image[5, 7] = (2.5e5, 2.3e5, 2.0e5)  # a tiny sun: half float would turn it into infinity
    read, _ = read_exr(write_exr(tmp_path / "sun.exr", image))
    assert read.dtype == np.float32 and np.array_equal(read, image)
    assert float(image.max()) > HALF_MAX


def test_bad_images_are_refused(tmp_path):
    with pytest.raises(ValueError, match="H, W, 3"):
        write_exr(tmp_path / "a.exr", np.ones((4, 8), np.float32))
    bad = np.ones((4, 8, 3), np.float32)
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_exr(tmp_path / "a.exr", bad)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_exr_leaves_no_file_of_the_panorama(tmp_path, sunny):
    rgb, metadata, hdr = sunny
    (tmp_path / "pano_lighting.exr").mkdir()  # the last file cannot replace a folder
    with pytest.raises(OSError):
        _write_files(tmp_path / "pano.png", rgb, metadata, hdr, exr=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pano_lighting.exr"]


def test_a_failed_png_leaves_no_exr_behind(tmp_path, sunny):
    rgb, metadata, hdr = sunny
    (tmp_path / "pano.png").mkdir()
    with pytest.raises((OSError, OutputWriteError)):
        _write_files(tmp_path / "pano.png", rgb, metadata, hdr, exr=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pano.png"]


def test_without_exr_an_older_exr_of_the_same_name_is_removed(tmp_path, sunny):
    rgb, metadata, hdr = sunny
    _write_files(tmp_path / "pano.png", rgb, metadata, hdr, exr=True)
    assert (tmp_path / "pano.exr").is_file() and (tmp_path / "pano_lighting.exr").is_file()
    # written again under the same name without EXR: Blender must not show the old panorama's EXR
    path, files = _write_files(tmp_path / "pano.png", rgb, metadata, hdr, exr=False)
    assert set(files) == {"hdr", "lighting"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pano.hdr", "pano.png", "pano_lighting.hdr"]


def test_negative_light_is_written_as_black_and_the_source_is_untouched(tmp_path):
    rng = np.random.default_rng(11)
    image = rng.uniform(-2.0, 3.0, (16, 24, 3)).astype(np.float32)
    before = image.copy()
    read, _ = read_exr(write_exr(tmp_path / "n.exr", image))
    assert np.all(read[before < 0] == 0) and np.count_nonzero(before < 0) > 100
    assert within_half(read[before >= 0], before[before >= 0])
    assert np.array_equal(image, before)  # the caller's image is not clipped in place


def test_compression_runs_on_openexrs_thread_pool(tmp_path, monkeypatch):
    """OpenEXR's pool is off (0 threads) unless set; writing a file turns it on (ZIP on the cores)."""
    import os

    from dit360_blender.panorama import exr as exr_module

    monkeypatch.setattr(exr_module, "_threads_set", False)
    OpenEXR.set_global_thread_count(0)
    write_exr(tmp_path / "t.exr", np.ones((8, 8, 3), np.float32))
    assert OpenEXR.global_thread_count() == min(os.cpu_count() or 1, 8)


def test_bindings_without_a_thread_pool_call_still_write(tmp_path, monkeypatch):
    """OpenEXR bindings before 3.5 have no set_global_thread_count (runtime.txt allows >= 3.3)."""
    from dit360_blender.panorama import exr as exr_module

    monkeypatch.delattr(OpenEXR, "set_global_thread_count")
    monkeypatch.setattr(exr_module, "_threads_set", False)
    image = np.random.default_rng(3).uniform(0, 4, (8, 12, 3)).astype(np.float32)
    read, _ = read_exr(write_exr(tmp_path / "old.exr", image))
    assert within_half(read, image)
