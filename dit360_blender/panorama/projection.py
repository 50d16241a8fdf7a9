"""Perspective cameras and photos on the equirectangular sphere (numpy only; Pillow only for EXIF).

Conventions: those of `sphere.py` (Blender world space, +Z up; an equirectangular image (H, W, C) has
row 0 at the top, u = 0.5 - atan2(y, x) / (2 pi), so the image centre looks along +X and the wrap
along -X). A camera is given by

* **yaw** (degrees): the azimuth it looks at, counter-clockwise from +X seen from above, as in
  `sphere.direction_from_angles`: yaw 0 looks at the panorama's centre column, yaw +90 at the column a
  quarter of the width to the LEFT of the centre (u = 0.25, +Y), yaw -90 a quarter to the right;
* **pitch** (degrees): elevation of the view axis, + up;
* **roll** (degrees): a turn about the view axis, as Blender's camera turns about its local Z (its
  local -Z is the view axis): + turns the camera's up vector counter-clockwise seen by the
  photographer, so the picture's content turns clockwise in the frame;
* **hfov** (degrees): the horizontal field of view, 0 < hfov < 180, and the frame's **aspect**
  (width / height, square pixels); the vertical field of view is 2 atan(tan(hfov / 2) / aspect).

`camera_matrix(yaw, pitch, roll)` is the camera's rotation as Blender stores it (columns: local +X =
right, +Y = up, +Z = backwards), so a Blender camera with that `matrix_world` renders what
`equirect_to_perspective` samples (`tests/test_edit_geometry_blender.py` renders it in Cycles).
The World's Mapping node (vector type Point: lookup = R(S d)) turns a world direction d into the
texture direction the image is read at; `mapping_matrix` builds that 3x3 map and `view_angles`
turns a Blender camera's world rotation into the yaw/pitch/roll of the panorama's own frame.

A perspective pixel (row i, column j) of a w x h frame has its centre on the image plane (at distance
1 along the view axis) at x = ((j + 0.5) / w * 2 - 1) tan(hfov / 2), y = (1 - (i + 0.5) / h * 2) *
tan(hfov / 2) / aspect; a photo is sampled with the same convention, so projecting it into the
panorama and back samples each photo pixel at its centre.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np

from .cubemap import sample_equirect
from .masks import GeometryError, area_resize, smooth_ramp
from .sphere import direction_from_uv, uv_from_pixel

__all__ = [
    "MAX_HFOV",
    "GeometryError",
    "PhotoProjection",
    "ViewError",
    "camera_matrix",
    "check_hfov",
    "equirect_directions",
    "equirect_to_perspective",
    "exif_hfov",
    "fit_photo",
    "mapping_matrix",
    "max_photo_width",
    "perspective_rays",
    "photo_to_equirect",
    "view_angles",
    "view_mask",
    "view_signed_distance",
]

MAX_HFOV = 180.0
ViewError = GeometryError  # the name this module's errors had first
_ROW_BAND = 256  # panorama rows projected at once (bounds the float64 direction arrays)


def check_hfov(hfov: float) -> float:
    """`hfov` as a float; GeometryError unless 0 < hfov < 180 degrees (a flat image can't see 180°)."""
    try:
        value = float(hfov)
    except (TypeError, ValueError):
        raise GeometryError(
            f"the field of view {hfov!r} is not a number", "give it in degrees, e.g. 60"
        ) from None
    if not (0.0 < value < MAX_HFOV) or not math.isfinite(value):
        raise GeometryError(
            f"a horizontal field of view of {value:g}° is impossible for a perspective camera or photo",
            "give one between 0 and 180 degrees (exclusive), e.g. 60",
        )
    return value


def _check_aspect(aspect: float) -> float:
    value = float(aspect)
    if not (value > 0.0 and math.isfinite(value)):
        raise GeometryError(
            f"the frame's aspect {aspect!r} is not a positive number", "width / height, e.g. 1.778"
        )
    return value


def camera_matrix(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """(3, 3) float64 rotation of a camera looking at (yaw, pitch) with `roll`: columns right, up,
    backwards (Blender's camera axes local +X, +Y, +Z; the camera looks along -Z)."""
    y, p, r = (math.radians(float(a)) for a in (yaw, pitch, roll))
    forward = np.array([math.cos(p) * math.cos(y), math.cos(p) * math.sin(y), math.sin(p)])
    right = np.array([math.sin(y), -math.cos(y), 0.0])  # horizontal even at the poles
    up = np.cross(right, forward)
    c, s = math.cos(r), math.sin(r)
    # roll: a turn about local +Z (backwards) by r
    right, up = c * right + s * up, -s * right + c * up
    return np.stack([right, up, -forward], axis=1)


def view_angles(rotation, mapping=None) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in the panorama's frame of a camera whose world rotation is `rotation`
    ((3, 3), Blender's camera axes as columns; scale is removed), seen through the World's Mapping
    `mapping` ((3, 3) from `mapping_matrix`; None = no Mapping node). Inverse of `camera_matrix`.

    At pitch +-90° the yaw is taken from the camera's up vector (roll 0)."""
    m = np.asarray(rotation, dtype=np.float64).reshape(3, 3)
    if mapping is not None:
        m = np.asarray(mapping, dtype=np.float64).reshape(3, 3) @ m
    q, r = np.linalg.qr(m)  # orthonormalise (a scaled camera object, a mapping with uniform scale)
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        raise GeometryError(
            "the camera's rotation (through the World's Mapping) is mirrored",
            "remove the negative scale from the camera or the Mapping node",
        )
    right, up, forward = q[:, 0], q[:, 1], -q[:, 2]
    pitch = math.degrees(math.asin(float(np.clip(forward[2], -1.0, 1.0))))
    horizontal = math.hypot(forward[0], forward[1])
    if horizontal < 1e-9:  # straight up or down: right/up of roll 0 are not defined by forward
        base = up if forward[2] < 0 else -up
        return math.degrees(math.atan2(base[1], base[0])), pitch, 0.0
    yaw = math.degrees(math.atan2(forward[1], forward[0]))
    base = camera_matrix(yaw, pitch, 0.0)
    roll = math.degrees(math.atan2(float(right @ base[:, 1]), float(right @ base[:, 0])))
    return yaw, pitch, roll


def mapping_matrix(rotation=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0), vector_type: str = "POINT") -> np.ndarray:
    """(3, 3) map from a world direction to the texture direction a Mapping node makes of it.

    `rotation`: Euler XYZ in radians (Blender's: R = Rz Ry Rx). Point and Vector: R S; Texture: its
    inverse. Location only moves points, never the direction a World looks up, so it is ignored
    for Vector and refused by the Blender side for Point/Texture; Normal mappings are refused there."""
    rx, ry, rz = (float(a) for a in rotation)
    cx, sx, cy, sy, cz, sz = (
        math.cos(rx),
        math.sin(rx),
        math.cos(ry),
        math.sin(ry),
        math.cos(rz),
        math.sin(rz),
    )
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    m = r_z @ r_y @ r_x @ np.diag(np.asarray(scale, dtype=np.float64))
    if vector_type in ("POINT", "VECTOR"):
        return m
    if vector_type == "TEXTURE":
        return np.linalg.inv(m)
    raise GeometryError(f"a Mapping node of type {vector_type!r} can't be followed", "use type Point")


def _half_extent(hfov: float, aspect: float) -> tuple[float, float]:
    half_w = math.tan(math.radians(check_hfov(hfov)) / 2.0)
    return half_w, half_w / _check_aspect(aspect)


def perspective_rays(
    width: int, height: int, yaw: float, pitch: float, hfov: float, roll: float = 0.0
) -> np.ndarray:
    """(height, width, 3) float64 unit directions through the pixel centres of a width x height frame
    (aspect = width / height)."""
    half_w, half_h = _half_extent(hfov, width / height)
    x = ((np.arange(width) + 0.5) / width * 2.0 - 1.0) * half_w
    y = (1.0 - (np.arange(height) + 0.5) / height * 2.0) * half_h
    m = camera_matrix(yaw, pitch, roll)
    rays = x[None, :, None] * m[:, 0] + y[:, None, None] * m[:, 1] - m[:, 2]
    return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


def equirect_to_perspective(
    panorama: np.ndarray, width: int, height: int, yaw: float, pitch: float, hfov: float, roll: float = 0.0,
    mapping=None,
) -> np.ndarray:  # fmt: skip
    """What a width x height camera sees of `panorama` (bilinear, the wrap and poles continuous):
    (height, width, C) float32. `mapping`: the World's Mapping (3x3), so that the camera's angles
    are world angles as a Blender camera's are; None = the panorama's own frame."""
    rays = perspective_rays(width, height, yaw, pitch, hfov, roll)
    if mapping is not None:
        rays = rays @ np.asarray(mapping, dtype=np.float64).T
    return sample_equirect(panorama, rays)


def equirect_directions(height: int, width: int, rows: slice | None = None) -> np.ndarray:
    """(rows, width, 3) float64 unit directions of the panorama's pixel centres."""
    r = np.arange(height)[rows] if rows is not None else np.arange(height)
    u, v = uv_from_pixel(r[:, None], np.arange(width)[None, :], height, width)
    return direction_from_uv(u, v)


def _camera_coordinates(directions: np.ndarray, yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Directions in the camera's frame: (..., 3) of (right, up, forward) components."""
    m = camera_matrix(yaw, pitch, roll)
    return directions @ np.stack([m[:, 0], m[:, 1], -m[:, 2]], axis=1)


def view_signed_distance(
    directions: np.ndarray, yaw: float, pitch: float, hfov: float, aspect: float, roll: float = 0.0
) -> np.ndarray:
    """Angular distance in degrees from each direction (..., 3) to the edge of what the camera sees:
    positive inside the frame, negative outside, exact on the sphere (the frame is a convex
    spherical quadrilateral: inside, the distance to its nearest side's great circle; outside, to
    the nearest point of its sides or corners)."""
    half_w, half_h = _half_extent(hfov, aspect)
    d = _camera_coordinates(np.asarray(directions, dtype=np.float64), yaw, pitch, roll)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    corners = np.array(
        [[-half_w, -half_h, 1.0], [half_w, -half_h, 1.0], [half_w, half_h, 1.0], [-half_w, half_h, 1.0]]
    )
    corners /= np.linalg.norm(corners, axis=1, keepdims=True)
    inside = np.full(d.shape[:-1], np.inf)
    outside = np.full(d.shape[:-1], np.inf)
    for k in range(4):
        a, b = corners[k], corners[(k + 1) % 4]
        normal = np.cross(a, b)  # corners counter-clockwise seen along the view axis: it points in
        normal /= np.linalg.norm(normal)
        sine = d @ normal
        inside = np.minimum(inside, np.arcsin(np.clip(sine, -1.0, 1.0)))
        # nearest point of the side's great circle, and whether it lies between the side's corners
        foot = d - sine[..., None] * normal
        on_arc = (np.cross(a, foot) @ normal >= 0) & (np.cross(foot, b) @ normal >= 0) & (foot @ (a + b) > 0)
        to_arc = np.where(on_arc, np.abs(np.arcsin(np.clip(sine, -1.0, 1.0))), np.inf)
        to_corner = np.arccos(np.clip(d @ a, -1.0, 1.0))
        outside = np.minimum(outside, np.minimum(to_arc, to_corner))
    return np.degrees(np.where(inside >= 0, inside, -outside))


def view_mask(
    width: int, height: int, yaw: float, pitch: float, hfov: float, aspect: float, roll: float = 0.0,
    feather: float = 0.0,
) -> np.ndarray:  # fmt: skip
    """(height, width) float32 mask of the panorama: 1 where the camera sees (each pixel's centre
    direction), 0 elsewhere; with `feather` > 0 degrees it falls smoothly from 1 at the frame's
    edge to exactly 0 at `feather` degrees outside it (what the camera sees stays 1)."""
    out = np.empty((height, width), dtype=np.float32)
    for start in range(0, height, _ROW_BAND):
        rows = slice(start, min(height, start + _ROW_BAND))
        s = view_signed_distance(equirect_directions(height, width, rows), yaw, pitch, hfov, aspect, roll)
        out[rows] = (s >= 0) if feather <= 0 else smooth_ramp(1.0 + s / float(feather))
    return out


# -- photos ------------------------------------------------------------------------------------------


def max_photo_width(hfov: float, panorama_width: int) -> int:
    """The widest photo (pixels) of this field of view that a panorama `panorama_width` pixels wide
    holds without losing detail: at its centre the photo has W / (2 tan(hfov/2)) pixels per radian,
    the panorama W / (2 pi) at the horizon."""
    half = math.tan(math.radians(check_hfov(hfov)) / 2.0)
    return max(1, int(math.floor(panorama_width * half / math.pi + 1e-9)))


def fit_photo(photo: np.ndarray, hfov: float, panorama_width: int) -> np.ndarray:
    """`photo` (h, w, C) area-averaged down to `max_photo_width` when it is wider (float32), else
    as it is: what to pass to `photo_to_equirect` when the user asked for the photo to be fitted."""
    limit = max_photo_width(hfov, panorama_width)
    h, w = photo.shape[:2]
    if w <= limit:
        return photo
    new_h = max(1, round(h * limit / w))
    return area_resize(np.asarray(photo, dtype=np.float32), new_h, limit)


class PhotoProjection(NamedTuple):
    rgb: np.ndarray  # (H, W, C) float32: the photo where it lands, the photo's mean colour elsewhere
    coverage: np.ndarray  # (H, W) float32: 1 where a pixel's centre falls on the photo, else 0

    @property
    def mask(self) -> np.ndarray:
        """The mask of the rest, to be generated: 1 - coverage."""
        return 1.0 - self.coverage


def photo_to_equirect(
    photo: np.ndarray, width: int, height: int, hfov: float, yaw: float = 0.0, pitch: float = 0.0,
    roll: float = 0.0,
) -> PhotoProjection:  # fmt: skip
    """Project a perspective photo (h, w, C) of horizontal field of view `hfov`, taken looking at
    (yaw, pitch) with `roll`, into a width x height panorama by inverse mapping: each panorama pixel
    centre's direction is followed into the photo and read there bilinearly (edge pixels extend half
    a pixel, the photo's own extent). A panorama pixel that lands on a photo pixel's centre gets that
    pixel's value exactly. Returns (rgb (H, W, C) float32: the photo where it lands, its mean colour
    elsewhere; coverage (H, W) float32: 1 where a pixel's centre falls on the photo, else 0), a
    named tuple whose `.mask` is the mask to generate, 1 - coverage.

    GeometryError: hfov outside (0, 180); a photo wider than `max_photo_width` (the panorama would lose
    its detail: `fit_photo` first, or make the panorama wider); a photo that covers no panorama pixel
    or leaves none to generate."""
    photo = np.asarray(photo)
    if photo.ndim == 2:
        photo = photo[..., None]
    if photo.ndim != 3 or photo.shape[0] < 1 or photo.shape[1] < 1:
        raise GeometryError(f"the photo's pixels have shape {photo.shape}", "give an (h, w, channels) image")
    ph, pw = photo.shape[:2]
    check_hfov(hfov)
    limit = max_photo_width(hfov, width)
    if pw > limit:
        raise GeometryError(
            f"the photo is {pw} px wide over {float(hfov):g}°, more than a {width}x{height} panorama holds "
            f"({limit} px over that angle)",
            f"resize the photo to at most {limit} px wide, or make the panorama wider",
        )
    half_w, half_h = _half_extent(hfov, pw / ph)
    pixels = photo.astype(np.float64)
    rgb = np.empty((height, width, photo.shape[2]), dtype=np.float32)
    coverage = np.zeros((height, width), dtype=np.float32)
    fill = pixels.reshape(-1, photo.shape[2]).mean(axis=0)
    for start in range(0, height, _ROW_BAND):
        rows = slice(start, min(height, start + _ROW_BAND))
        d = _camera_coordinates(equirect_directions(height, width, rows), yaw, pitch, roll)
        front = d[..., 2] > 0
        z = np.where(front, d[..., 2], 1.0)
        col = (d[..., 0] / z / half_w + 1.0) / 2.0 * pw - 0.5
        row = (1.0 - d[..., 1] / z / half_h) / 2.0 * ph - 0.5
        hit = front & (col >= -0.5) & (col <= pw - 0.5) & (row >= -0.5) & (row <= ph - 0.5)
        band = np.broadcast_to(fill, rgb[rows].shape).copy()
        band[hit] = _bilinear(pixels, row[hit], col[hit])
        rgb[rows] = band
        coverage[rows] = hit
    covered = int(coverage.sum())
    if covered == 0:
        raise GeometryError(
            f"the photo ({float(hfov):g}° wide) covers no pixel of a {width}x{height} panorama",
            "give the photo's real field of view, or a larger panorama",
        )
    if covered == width * height:
        raise GeometryError(
            "the photo covers the whole panorama: there is nothing left to generate", "check hfov"
        )
    return PhotoProjection(rgb, coverage)


def _bilinear(pixels: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Bilinear samples (n, C) of (h, w, C) at fractional (row, col), edges clamped."""
    h, w = pixels.shape[:2]
    row = np.clip(row, 0.0, h - 1.0)
    col = np.clip(col, 0.0, w - 1.0)
    r0 = np.minimum(np.floor(row).astype(np.int64), h - 1)
    c0 = np.minimum(np.floor(col).astype(np.int64), w - 1)
    fr = (row - r0)[:, None]
    fc = (col - c0)[:, None]
    r1 = np.minimum(r0 + 1, h - 1)
    c1 = np.minimum(c0 + 1, w - 1)
    top = pixels[r0, c0] * (1.0 - fc) + pixels[r0, c1] * fc
    bottom = pixels[r1, c0] * (1.0 - fc) + pixels[r1, c1] * fc
    return top * (1.0 - fr) + bottom * fr


def exif_hfov(path: str | os.PathLike) -> float | None:
    """The horizontal field of view (degrees) a photo's EXIF states, or None when it can't tell.

    From FocalLengthIn35mmFilm (a 36 mm wide frame, the 3:2 full-frame convention), else from
    FocalLength and the sensor's width, from FocalPlaneXResolution (pixels per FocalPlaneResolutionUnit
    across the sensor, at the ExifImageWidth the camera wrote). The width that counts is the photo's
    longer side when the EXIF Orientation turns it (portrait shots): the focal-length equivalents
    are stated for the frame's long side. Needs Pillow (the worker's and the CLI's)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            exif = image.getexif()
            size = image.size
    except OSError:
        return None
    ifd = exif.get_ifd(0x8769)  # the Exif sub-IFD holds the focal lengths
    tags = {**dict(exif), **dict(ifd)}
    rotated = tags.get(0x0112) in (5, 6, 7, 8)  # Orientation: stored turned by 90°
    width_is_long = (size[1] if rotated else size[0]) >= (size[0] if rotated else size[1])
    long_mm = None
    f35 = _number(tags.get(0xA405))  # FocalLengthIn35mmFilm
    if f35:
        long_mm, focal = 36.0, f35
    else:
        focal = _number(tags.get(0x920A))  # FocalLength (mm)
        xres = _number(tags.get(0xA20E))  # FocalPlaneXResolution
        unit = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}.get(int(tags.get(0xA210, 2) or 2))  # ResolutionUnit -> mm
        exif_width = _number(tags.get(0xA002)) or float(max(size))  # ExifImageWidth
        if not (focal and xres and unit):
            return None
        long_mm = exif_width / xres * unit
    half_long = math.atan(long_mm / 2.0 / focal)
    if width_is_long:
        return math.degrees(2.0 * half_long)
    short, long = sorted(size)
    return math.degrees(2.0 * math.atan(math.tan(half_long) * short / long))


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) and number > 0 else None
