"""`generate --cubemap faces|cross` (the `cubemap` job parameter): beside the PNG and its HDRs, the
cube map of the PNG (8-bit) and, with the EXR files, of the HDR environment (linear EXR), each
equal to panorama/cubemap.py's faces of what was written; all files or none; no job name can
overwrite another job's cube faces."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_cli import TINY, run_cli
from test_panorama_exr import read_exr, within_half
from test_panorama_synthetic import sun_panorama

from dit360_blender.panorama import cubemap
from dit360_blender.panorama.analyze import analyze
from dit360_blender.panorama.rgbe import read_hdr
from dit360_blender.pipeline.errors import BadParametersError
from dit360_blender.pipeline.make_panorama import _write_files
from dit360_blender.pipeline.output_files import plan_output

FACES = [f"pano_cube_{f}" for f in cubemap.FACES]


@pytest.fixture(scope="module")
def panorama():
    rgb = sun_panorama(30.0, 40.0, height=64, width=128)
    metadata, hdr = analyze(rgb)
    return rgb, metadata, hdr


def test_faces_of_the_png_and_of_the_hdr(tmp_path, panorama):
    rgb, metadata, hdr = panorama
    path, files = _write_files(tmp_path / "pano.png", rgb, metadata, hdr, exr=True, cubemap="faces")
    assert {k for k in files if k.startswith("cube_")} == {
        f"cube_{fmt}_{f}" for fmt in ("png", "exr") for f in cubemap.FACES
    }
    names = sorted(p.name for p in tmp_path.iterdir())
    base = ["pano.exr", "pano.hdr", "pano.png", "pano_lighting.exr", "pano_lighting.hdr"]
    assert names == sorted(base + [f + ".png" for f in FACES] + [f + ".exr" for f in FACES])
    png = np.asarray(Image.open(path))
    for face in cubemap.FACES:
        expected = np.round(cubemap.cube_face(png, face, 32) * 255)
        assert np.array_equal(np.asarray(Image.open(files[f"cube_png_{face}"])), expected)
        read, _ = read_exr(files[f"cube_exr_{face}"])
        assert within_half(read, cubemap.cube_face(hdr.hdr, face, 32))
    # the sun is in the HDR faces with its expanded energy (far above the PNG's 1.0)
    assert max(float(read_exr(files[f"cube_exr_{f}"])[0].max()) for f in cubemap.FACES) > 10


def test_cross_without_exr_is_the_png_only(tmp_path, panorama):
    rgb, metadata, hdr = panorama
    _, files = _write_files(tmp_path / "pano.png", rgb, metadata, hdr, exr=False, cubemap="cross")
    assert sorted(k for k in files if k.startswith("cube_")) == ["cube_png_cross"]
    assert Image.open(files["cube_png_cross"]).size == (128, 96)


def test_a_failed_cube_face_leaves_nothing(tmp_path, panorama):
    rgb, metadata, hdr = panorama
    (tmp_path / "pano_cube_nz.exr").mkdir()  # the last file of all cannot be written
    with pytest.raises(OSError):
        _write_files(tmp_path / "pano.png", rgb, metadata, hdr, exr=True, cubemap="faces")
    assert [p.name for p in tmp_path.iterdir()] == ["pano_cube_nz.exr"]


@pytest.mark.parametrize("name", ["x_cube_px", "X_Cube_NZ", "x_cube_cross"])
def test_no_job_name_is_another_jobs_cube_face(tmp_path, name):
    with pytest.raises(BadParametersError, match="cube-map face"):
        plan_output(tmp_path, "a beach", 1, name)
    assert plan_output(tmp_path, "a beach", 1, "x_cube").name == "x_cube.png"  # a name, not a face


def test_generate_cubemap_on_the_command_line(tiny_models, tmp_path):
    out = tmp_path / "pano.png"
    done = run_cli("generate", "This is a panorama. A red desert", "--seed", "42", "--out", str(out),
                   "--models-dir", str(tiny_models["root"]), "--cubemap", "cross", *TINY)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {"pano_cube_cross.png", "pano_cube_cross.exr"} <= {p.name for p in tmp_path.iterdir()}
    assert "pano_cube_cross.exr" in done.stdout
    cross, _ = read_exr(tmp_path / "pano_cube_cross.exr")
    faces = cubemap.cube_faces(read_hdr(tmp_path / "pano.hdr"), 32)  # the .hdr: RGBE-rounded
    reference = cubemap.cross_image(faces)
    assert cross.shape == (96, 128, 3)
    assert np.abs(cross - reference).max() <= 0.01 * max(float(reference.max()), 1.0)
