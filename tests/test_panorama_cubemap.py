"""Cube maps (panorama/cubemap.py) against float64 references:

* each face pixel holds the panorama at the direction the OpenGL cube-map table gives for it (the
  table's sc/tc formulas written out here per face, independently of the module's axis table), for
  a smooth analytic function on the sphere, within bilinear interpolation error; a mirrored or
  rotated face would be off by ~0.5;
* the faces sampled back to an equirectangular image (this file's own inverse, again from the
  OpenGL table) reproduce the source within interpolation error, the wrap and the poles included;
* the cross puts each face in its cell; the files (PNG, EXR) read back; a failing write leaves
  nothing; the `cubemap` command writes them and refuses bad input with nothing written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
from PIL import Image

from dit360_blender.panorama import cubemap
from dit360_blender.panorama.color import srgb_to_linear

ROOT = Path(__file__).resolve().parents[1]
HALF_EPS = 2.0**-11

# a smooth colour field on the sphere: three plane waves of random direction and phase
_RNG = np.random.default_rng(15)
_WAVES = _RNG.normal(size=(3, 3)) * 1.2  # |k| about 2: a few waves around the sphere
_PHASES = _RNG.uniform(0, 2 * np.pi, 3)


def field(directions: np.ndarray) -> np.ndarray:
    d = directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    return 0.5 + 0.4 * np.sin(d @ _WAVES.T + _PHASES)


def equirect_directions(height: int, width: int) -> np.ndarray:
    el = (0.5 - (np.arange(height) + 0.5) / height) * np.pi
    az = (0.5 - (np.arange(width) + 0.5) / width) * 2 * np.pi
    el, az = np.meshgrid(el, az, indexing="ij")
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)


# The OpenGL specification's cube-map selection table: for major axis `face`, the face coordinates
# (sc, tc) of a cube direction r = (rx, ry, rz), and its inverse r(sc, tc) on the unit cube.
GL_TABLE = {
    "px": lambda sc, tc: (np.ones_like(sc), -tc, -sc),
    "nx": lambda sc, tc: (-np.ones_like(sc), -tc, sc),
    "py": lambda sc, tc: (sc, np.ones_like(sc), tc),
    "ny": lambda sc, tc: (sc, -np.ones_like(sc), -tc),
    "pz": lambda sc, tc: (sc, -tc, np.ones_like(sc)),
    "nz": lambda sc, tc: (-sc, -tc, -np.ones_like(sc)),
}


def gl_face_directions(face: str, n: int) -> np.ndarray:
    """Blender directions of a face's pixel centres: s along columns, t down rows; cube (x, y, z) is
    Blender (x, z, y) (cube Y up = Blender Z up)."""
    t = (np.arange(n) + 0.5) / n * 2 - 1
    tc, sc = np.meshgrid(t, t, indexing="ij")
    rx, ry, rz = GL_TABLE[face](sc, tc)
    return np.stack([rx, rz, ry], axis=-1)


def gl_lookup(faces: dict, directions: np.ndarray) -> np.ndarray:
    """Sample a cube map along Blender directions as OpenGL does (major axis, then bilinear on the
    face, clamped at its edges); float64."""
    rx, ry, rz = directions[..., 0], directions[..., 2], directions[..., 1]  # Blender -> cube
    ax, ay, az = np.abs(rx), np.abs(ry), np.abs(rz)
    out = np.zeros(directions.shape[:-1] + (3,))
    choices = {
        "px": (ax >= ay) & (ax >= az) & (rx > 0),
        "nx": (ax >= ay) & (ax >= az) & (rx <= 0),
        "py": (ay > ax) & (ay >= az) & (ry > 0),
        "ny": (ay > ax) & (ay >= az) & (ry <= 0),
        "pz": (az > ax) & (az > ay) & (rz > 0),
        "nz": (az > ax) & (az > ay) & (rz <= 0),
    }
    sc_tc = {
        "px": (-rz / ax, -ry / ax),
        "nx": (rz / ax, -ry / ax),
        "py": (rx / ay, rz / ay),
        "ny": (rx / ay, -rz / ay),
        "pz": (rx / az, -ry / az),
        "nz": (-rx / az, -ry / az),
    }
    with np.errstate(divide="ignore", invalid="ignore"):
        for face, mask in choices.items():
            image = faces[face].astype(np.float64)
            n = image.shape[0]
            sc, tc = (a[mask] for a in sc_tc[face])
            col = np.clip((sc + 1) / 2 * n - 0.5, 0, n - 1)
            row = np.clip((tc + 1) / 2 * n - 0.5, 0, n - 1)
            c0, r0 = np.minimum(col.astype(int), n - 2), np.minimum(row.astype(int), n - 2)
            fc, fr = (col - c0)[:, None], (row - r0)[:, None]
            out[mask] = (
                image[r0, c0] * (1 - fr) * (1 - fc)
                + image[r0, c0 + 1] * (1 - fr) * fc
                + image[r0 + 1, c0] * fr * (1 - fc)
                + image[r0 + 1, c0 + 1] * fr * fc
            )
    return out


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return field(equirect_directions(256, 512)).astype(np.float32)  # linear float, like an HDR


def test_every_face_holds_the_panorama_where_the_opengl_table_says(source):
    n = 96
    faces = cubemap.cube_faces(source, n)
    for face in cubemap.FACES:
        reference = field(gl_face_directions(face, n))
        error = np.abs(faces[face] - reference).max()
        # bilinear error of the 256-row panorama: h^2/8 * |f''| with h = pi/256 (1.9e-5) times
        # |f''| <= 0.4 |k|^2 (|k| ~ 2-3); measured 3.4e-5 on every face
        assert error < 1.5e-4, (face, error)
    # the test can tell orientations apart: a mirrored or rotated face is far off
    ref_pz = field(gl_face_directions("pz", n))
    assert np.abs(faces["pz"][:, ::-1] - ref_pz).max() > 0.1
    assert np.abs(np.rot90(faces["pz"]) - ref_pz).max() > 0.1
    assert np.abs(faces["nz"] - ref_pz).max() > 0.1


def test_faces_sampled_back_reproduce_the_panorama(source):
    height, width = source.shape[:2]
    faces = cubemap.cube_faces(source)  # default size: a quarter of the width
    assert {f.shape for f in faces.values()} == {(width // 4, width // 4, 3)}
    back = gl_lookup(faces, equirect_directions(height, width))
    error = np.abs(back - source.astype(np.float64)).max(axis=-1)
    # two bilinear interpolations (second order) plus the face-edge clamp of the lookup (half a face
    # pixel of the field's gradient, ~0.4 * 2 * (pi/2/128)/2 ~ 5e-3): everywhere within that
    assert error.max() < 6e-3, error.max()
    assert np.median(error) < 1e-4  # measured 3.3e-5 (max 3.1e-3, at face edges)
    # the wrap column and the pole rows are as good as the rest
    assert error[:, [0, -1]].max() < 6e-3 and error[[0, -1], :].max() < 6e-3
    # and a random texture (noise, not smooth) comes back as well as interpolation allows
    rng = np.random.default_rng(3)
    coarse = rng.uniform(0, 1, (16, 32, 3))
    noise = np.asarray(
        Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    )
    noise_faces = cubemap.cube_faces(noise, width // 2)  # oversampled faces: the back-sampling adds little
    noise_back = gl_lookup(noise_faces, equirect_directions(height, width))
    assert np.abs(noise_back - noise / 255.0).mean() < 0.01


def test_rows_continue_over_the_poles():
    # a panorama whose top row is bright on one half and dark on the other: the zenith direction
    # samples between row 0 at azimuth a and a + 180°, so it must be the average of both halves
    image = np.zeros((8, 16, 3), np.float32)
    image[0, :8] = 1.0
    value = cubemap.sample_equirect(image, np.array([[0.0, 0.0, 1.0]]))
    assert value[0] == pytest.approx([0.5, 0.5, 0.5], abs=1e-6)
    # and the wrap: a direction between the last and first column blends them
    image = np.zeros((8, 16, 3), np.float32)
    image[:, 0] = 1.0  # first column; the wrap (u = 0) is between columns 15 and 0, along -X
    value = cubemap.sample_equirect(image, np.array([[-1.0, 0.0, 0.0]]))
    assert value[0] == pytest.approx([0.5, 0.5, 0.5], abs=1e-6)


def test_cross_puts_each_face_in_its_cell(source):
    faces = cubemap.cube_faces(source, 16)
    cross = cubemap.cross_image(faces)
    assert cross.shape == (48, 64, 3)
    layout = [[None, "py", None, None], ["nx", "pz", "px", "nz"], [None, "ny", None, None]]
    for r, row in enumerate(layout):
        for c, face in enumerate(row):
            cell = cross[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
            assert np.array_equal(cell, faces[face] if face else np.zeros_like(cell)), (r, c)
    # neighbouring cells continue each other (the edge pixels of -X|+Z|+X|-Z, +Y over +Z, -Y under)
    mid = cross[16:32]
    for left in (15, 31, 47):
        assert np.abs(mid[:, left] - mid[:, left + 1]).max() < 0.05
    assert np.abs(cross[15, 16:32] - cross[16, 16:32]).max() < 0.05
    assert np.abs(cross[31, 16:32] - cross[32, 16:32]).max() < 0.05


def test_files_png_and_exr(tmp_path, source):
    rgb = np.round(source * 255).astype(np.uint8)  # an 8-bit panorama, as the generator writes
    pngs = cubemap.write_cubemap(rgb, tmp_path / "png", "pano", fmt="png", layout="faces", size=32)
    assert [p.name for p in pngs] == [f"pano_{f}.png" for f in cubemap.FACES]
    expected = cubemap.cube_faces(rgb, 32)
    for face, path in zip(cubemap.FACES, pngs):
        read = np.asarray(Image.open(path)).astype(np.float64) / 255
        assert np.abs(read - expected[face]).max() <= 0.5 / 255 + 1e-6

    # EXR from the 8-bit source: linear (each sample decoded from sRGB, then interpolated)
    (exr,) = cubemap.write_cubemap(rgb, tmp_path / "exr", "pano", fmt="exr", layout="cross", size=32)
    assert exr.name == "pano_cross.exr"
    with OpenEXR.File(str(exr), separate_channels=True) as f:
        read = np.stack([f.channels()[c].pixels for c in "RGB"], axis=-1).astype(np.float64)
    linear = srgb_to_linear(rgb).astype(np.float64)
    reference = cubemap.cross_image(cubemap.cube_faces(linear.astype(np.float32), 32))
    assert read.shape == (96, 128, 3)
    assert np.all(np.abs(read - reference) <= HALF_EPS * np.abs(reference) + 1e-6)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [p.name for p in pngs] + ["pano_cross.exr"]
    )  # no partial files


def test_a_failed_write_leaves_nothing(tmp_path, source):
    (tmp_path / "pano_py.png").mkdir()  # the third face can't be written: a folder has its name
    with pytest.raises(OSError):
        cubemap.write_cubemap(source, tmp_path, "pano", size=8)
    assert [p.name for p in tmp_path.iterdir()] == ["pano_py.png"]


def test_cubemap_command(tmp_path, source):
    png = tmp_path / "in.png"
    Image.fromarray(np.round(source * 255).astype(np.uint8)).save(png)
    run = [sys.executable, "-m", "dit360_blender", "cubemap"]
    proc = subprocess.run([*run, str(png), "--size", "24"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.png"] + [f"in_{f}.png" for f in cubemap.FACES]
    )
    assert Image.open(tmp_path / "in_px.png").size == (24, 24)
    out = tmp_path / "cross"
    args = [str(png), "--format", "exr", "--layout", "cross", "--out", str(out)]
    proc = subprocess.run([*run, *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == ["in_cross.exr"]
    # bad input: not 2:1, not an image, missing: exit 2, the cause and fix, nothing written
    Image.fromarray(np.zeros((10, 30, 3), np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "text.png").write_text("not an image")
    for bad in ("wide.png", "text.png", "missing.png"):
        before = sorted(tmp_path.iterdir())
        proc = subprocess.run([*run, str(tmp_path / bad)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and "error:" in proc.stderr and "fix:" in proc.stderr, (bad, proc.stderr)
        assert sorted(tmp_path.iterdir()) == before
