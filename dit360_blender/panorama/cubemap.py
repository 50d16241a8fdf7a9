"""Cube maps from an equirectangular panorama: six square faces, or one horizontal cross (numpy only).

**Convention** (the cube-map table of the OpenGL specification, the same faces as DirectX's and
Unity's, and the `px nx py ny pz nz` file names three.js, Babylon.js and Godot tools use): the cube
is **Y-up**, its axes taken from Blender's world (Z-up) as

    cube +X = Blender +X,   cube +Y = Blender +Z (up),   cube +Z = Blender +Y

and each face is exactly what a 90° camera at the centre sees looking along the face's axis, not
mirrored: the side faces (±X, ±Z) with the zenith up, the top face (+Y) with cube -Z (Blender -Y) up
and the bottom face (-Y) with cube +Z (Blender +Y) up. In the OpenGL table's words, a direction
(x, y, z) with major axis +X lands at s = (-z/x + 1)/2, t = (-y/x + 1)/2 of face +X, and so on; s
runs along the image's columns and t down its rows (row 0 = the top row of the file).
`tests/test_cubemap_blender.py` renders each face with a 90° Cycles camera inside a World showing a
test panorama and compares it with ours.

Cube space is left-handed (as Unity's and DirectX's world is); an engine with a right-handed Y-up
world (three.js) mirrors its cube lookups in x itself. Unreal reads the equirectangular .hdr/.exr
directly (its own long-lat import), so it needs no cube map.

Layouts: `faces` writes `<stem>_px`, `_nx`, `_py`, `_ny`, `_pz`, `_nz` (the six faces); `cross`
writes `<stem>_cross`, a 4 x 3 horizontal cross (Unity's "6 Frames Layout: horizontal cross"):

    .   +Y  .   .
    -X  +Z  +X  -Z
    .   -Y  .   .

(the empty cells black). The faces are sampled bilinearly at each face pixel's centre direction;
the panorama's columns wrap around (the 0°/360° seam is interpolated across) and its rows continue
over each pole (the row past the top edge is the top row half a turn around), so no face has a seam
or a pinched pole. Default face size: a quarter of the panorama's width (its resolution at the
horizon). Sampling goes face by face in bands of rows, gathering only the four neighbours of each
face pixel, so a 16K panorama is never copied whole into float; an 8-bit source is linearised
per gathered sample (for EXR output), not as a whole image.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .color import _SRGB8_TABLE, linear_to_srgb, srgb_to_linear
from .png_encode import write_png_rgb

__all__ = [
    "CROSS_CELLS",
    "FACES",
    "FACE_AXES",
    "LAYOUTS",
    "cross_image",
    "cube_face",
    "cube_faces",
    "face_directions",
    "read_equirect",
    "sample_equirect",
    "write_cubemap",
]

FACES = ("px", "nx", "py", "ny", "pz", "nz")
LAYOUTS = ("faces", "cross")
FORMATS = ("png", "exr")

# face -> (forward, right, down) in Blender world coordinates (the module docstring's table)
FACE_AXES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "px": ((1, 0, 0), (0, -1, 0), (0, 0, -1)),
    "nx": ((-1, 0, 0), (0, 1, 0), (0, 0, -1)),
    "py": ((0, 0, 1), (1, 0, 0), (0, 1, 0)),
    "ny": ((0, 0, -1), (1, 0, 0), (0, -1, 0)),
    "pz": ((0, 1, 0), (1, 0, 0), (0, 0, -1)),
    "nz": ((0, -1, 0), (-1, 0, 0), (0, 0, -1)),
}
# face -> (row, column) of its cell in the horizontal cross
CROSS_CELLS = {"py": (0, 1), "nx": (1, 0), "pz": (1, 1), "px": (1, 2), "nz": (1, 3), "ny": (2, 1)}

_BAND_PIXELS = 1 << 20  # face pixels sampled at once (bounds the index and weight arrays: ~60 MB)


def face_directions(face: str, n: int, rows: slice | None = None) -> np.ndarray:
    """(rows, n, 3) float64 directions (not normalised) of the pixel centres of an n x n face."""
    forward, right, down = (np.asarray(a, dtype=np.float64) for a in FACE_AXES[face])
    t = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    r = t[rows] if rows is not None else t
    return forward + t[None, :, None] * right + r[:, None, None] * down


def sample_equirect(image: np.ndarray, directions: np.ndarray, *, linear: bool = False) -> np.ndarray:
    """Bilinear samples (..., 3) float32 of an equirectangular image (H, W, 3) along `directions`.

    Columns wrap, rows continue over the poles (module docstring). uint8/uint16 images give values
    in 0..1 (with `linear`, each gathered sample is decoded from sRGB first); float images are
    sampled as they are (an HDR's linear values), and so is a `large.Environment`'s."""
    height, width = image.shape[:2]
    x, y, z = directions[..., 0], directions[..., 1], directions[..., 2]
    # sphere.uv_from_direction in pixel units (row 0 = top, integer positions = pixel centres)
    col = (0.5 - np.arctan2(y, x) / (2.0 * math.pi)) * width - 0.5
    row = (0.5 - np.arctan2(z, np.hypot(x, y)) / math.pi) * height - 0.5
    r0 = np.floor(row).astype(np.int64)
    c0 = np.floor(col).astype(np.int64)
    fr = (row - r0).astype(np.float32)[..., None]
    fc = (col - c0).astype(np.float32)[..., None]
    if hasattr(image, "gather"):  # a large.Environment: computes the pixels it is asked for
        fetch = image.gather
    else:
        decode = _decoder(image.dtype, linear)

        def fetch(r, c):
            return decode(image[r, c])

    out = None
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        r = r0 + dr
        # past a pole: row -1-k is row k half a turn around (and likewise below the bottom row)
        over = (r < 0) | (r >= height)
        r = np.where(r < 0, -1 - r, np.where(r >= height, 2 * height - 1 - r, r))
        shift = np.where(over, width // 2, 0)
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            c = np.mod(c0 + dc + shift, width)
            term = fetch(r, c) * (wr * wc)
            out = term if out is None else out + term
    return out


def cube_face(image: np.ndarray, face: str, n: int, *, linear: bool = False) -> np.ndarray:
    """One n x n face (n, n, 3) float32 of the panorama, sampled in bands of rows."""
    if face not in FACE_AXES:
        raise ValueError(f"unknown face {face!r}: use one of {', '.join(FACES)}")
    out = np.empty((n, n, 3), dtype=np.float32)
    band = max(1, _BAND_PIXELS // n)
    for start in range(0, n, band):
        rows = slice(start, min(n, start + band))
        out[rows] = sample_equirect(image, face_directions(face, n, rows), linear=linear)
    return out


def cube_faces(image: np.ndarray, n: int | None = None, *, linear: bool = False) -> dict[str, np.ndarray]:
    """All six faces {name: (n, n, 3) float32}; n defaults to a quarter of the panorama's width."""
    n = n or default_face_size(image.shape[1])
    return {face: cube_face(image, face, n, linear=linear) for face in FACES}


def cross_image(faces: Mapping[str, np.ndarray], dtype=np.float32) -> np.ndarray:
    """The horizontal cross (3n, 4n, 3) of six n x n faces, empty cells 0."""
    n = next(iter(faces.values())).shape[0]
    out = np.zeros((3 * n, 4 * n, 3), dtype=dtype)
    for face, (r, c) in CROSS_CELLS.items():
        out[r * n : (r + 1) * n, c * n : (c + 1) * n] = faces[face]
    return out


def default_face_size(width: int) -> int:
    return max(1, width // 4)


def read_equirect(path: str | os.PathLike) -> np.ndarray:
    """A panorama file as an array: PNG/JPEG/... as uint8 (H, W, 3) sRGB, .hdr and .exr as float32
    linear. Raises ValueError (naming the file) for anything that is not a 2:1 colour image."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".hdr":
        from .rgbe import read_hdr

        image = read_hdr(path)
    elif suffix == ".exr":
        image = _read_exr(path)
    else:
        from PIL import Image

        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except OSError as exc:  # missing, unreadable, not an image (UnidentifiedImageError)
            raise ValueError(f"cannot read {path}: {exc}") from exc
    height, width = image.shape[:2]
    if width != 2 * height:
        raise ValueError(f"{path} is {width}x{height}, not 2:1: not an equirectangular panorama")
    return image


def write_cubemap(
    image: np.ndarray,
    out_dir: str | os.PathLike,
    stem: str,
    *,
    fmt: str = "png",
    layout: str = "faces",
    size: int | None = None,
) -> list[Path]:
    """Write the cube map of `image` (see `read_equirect` for its kinds) into `out_dir`: six
    `<stem>_<face>.<fmt>` files or one `<stem>_cross.<fmt>`. PNG: 8-bit sRGB (an HDR source is
    clipped at 1 and encoded); EXR: linear half float through `panorama.exr` (an 8-bit source is
    linearised). Every file is written atomically and, if one fails, the ones written are removed:
    all or nothing. Returns the paths; raises ValueError for bad arguments, OSError for the disk."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown cube map format {fmt!r}: use png or exr")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown cube map layout {layout!r}: use faces or cross")
    if size is not None and not 1 <= size <= 32768:
        raise ValueError(f"face size {size} is out of range: use 1 to 32768 pixels")
    n = size or default_face_size(image.shape[1])
    is_float = np.issubdtype(image.dtype, np.floating)  # (a large.Environment's dtype is float32)
    writer = _exr_writer() if fmt == "exr" else _write_png
    encode = _png_encoder(is_float) if fmt == "png" else (lambda x: x)
    linear = fmt == "exr"
    out_dir = Path(out_dir)
    written: list[Path] = []
    try:
        if layout == "faces":
            for face in FACES:
                pixels = encode(cube_face(image, face, n, linear=linear))
                written.append(writer(out_dir / f"{stem}_{face}.{fmt}", pixels))
        else:
            # filled cell by cell in the file's type: one face in float32 at a time
            cross = np.zeros((3 * n, 4 * n, 3), dtype=np.uint8 if fmt == "png" else np.float32)
            for face, (r, c) in CROSS_CELLS.items():
                cross[r * n : (r + 1) * n, c * n : (c + 1) * n] = encode(
                    cube_face(image, face, n, linear=linear)
                )
            written.append(writer(out_dir / f"{stem}_cross.{fmt}", cross))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


# ---------------------------------------------------------------------------------------------


def _decoder(dtype: np.dtype, linear: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Gathered samples -> float32 in 0..1 (LDR) or as they are (float)."""
    if dtype == np.uint8:
        if linear:
            return lambda v: _SRGB8_TABLE[v]
        return lambda v: v.astype(np.float32) * np.float32(1.0 / 255.0)
    if dtype == np.uint16:
        if linear:
            return lambda v: srgb_to_linear(v)
        return lambda v: v.astype(np.float32) * np.float32(1.0 / 65535.0)
    if np.issubdtype(dtype, np.floating):
        return lambda v: v.astype(np.float32, copy=False)
    raise ValueError(f"unsupported image dtype {dtype}: use uint8, uint16 or float")


def _png_encoder(is_float: bool) -> Callable[[np.ndarray], np.ndarray]:
    if is_float:  # a linear HDR: clipped at 1, sRGB-encoded
        return lambda x: np.round(linear_to_srgb(x) * 255.0).astype(np.uint8)
    return lambda x: np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # deflated on several threads (an 8K upscale's faces are 2K each)
            write_png_rgb(f, np.ascontiguousarray(pixels), {"Software": "dit360_blender"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _exr_writer() -> Callable[[Path, np.ndarray], Path]:
    from .exr import write_exr  # the OpenEXR bindings: a worker package, not needed for PNG faces

    return write_exr


def _read_exr(path: Path) -> np.ndarray:
    import OpenEXR

    try:
        with OpenEXR.File(str(path), separate_channels=True) as exr:
            channels = exr.channels()
            missing = [c for c in "RGB" if c not in channels]
            if missing:
                raise ValueError(f"{path} has no {', '.join(missing)} channel(s): not an RGB image")
            return np.stack([np.asarray(channels[c].pixels, dtype=np.float32) for c in "RGB"], axis=-1)
    except RuntimeError as exc:  # the bindings' error for a missing or corrupt file
        raise ValueError(f"cannot read {path}: {exc}") from exc
