"""The shared make-a-panorama step writes the PNG and both HDRs side by side, and a job leaves all
of its files or none (real files; the failures are real: a folder where a file must go)."""

from __future__ import annotations

import pytest
from test_panorama_synthetic import sun_panorama

from dit360_blender.panorama.analyze import analyze
from dit360_blender.pipeline.errors import OutputWriteError
from dit360_blender.pipeline.image_io import read_png_metadata
from dit360_blender.pipeline.make_panorama import _write_files


@pytest.fixture(scope="module")
def panorama():
    rgb = sun_panorama(30.0, 40.0, height=64, width=128)
    metadata, hdr = analyze(rgb)
    return rgb, metadata, hdr


def test_all_three_files_are_written(tmp_path, panorama):
    rgb, metadata, hdr = panorama
    path, files = _write_files(tmp_path / "pano.png", rgb, metadata, hdr)
    assert path.is_file() and set(files) == {"hdr", "lighting"}
    assert all((tmp_path / name).is_file() for name in ("pano.hdr", "pano_lighting.hdr"))
    assert read_png_metadata(path)["seam"] == metadata["seam"]


def test_a_failed_png_leaves_no_hdr_behind(tmp_path, panorama):
    rgb, metadata, hdr = panorama
    (tmp_path / "pano.png").mkdir()  # the PNG cannot replace a folder
    with pytest.raises((OSError, OutputWriteError)):
        _write_files(tmp_path / "pano.png", rgb, metadata, hdr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pano.png"]  # only the folder that was there


def test_a_failed_hdr_leaves_no_png_behind(tmp_path, panorama):
    rgb, metadata, hdr = panorama
    (tmp_path / "pano_lighting.hdr").mkdir()
    with pytest.raises(OSError):
        _write_files(tmp_path / "pano.png", rgb, metadata, hdr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pano_lighting.hdr"]
