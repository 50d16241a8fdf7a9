"""Equirectangular image <-> sphere, in Blender's world coordinates (+Z up).

Conventions used by the whole `panorama` package:

* An image is an array (H, W, C) whose **row 0 is the top** of the panorama (the zenith side), as PIL
  and numpy load a PNG. Blender's `Image.pixels` start at the bottom row: flip before comparing.
* `u` in [0, 1) runs left -> right; `v` in [0, 1] runs bottom -> top (Blender's texture v, so v = 1 is
  the zenith). The pixel at (row i, column j) has its centre at u = (j + 0.5) / W, v = 1 - (i + 0.5) / H.
* Directions are unit vectors (x, y, z) in Blender world space. Azimuth is measured in degrees
  counter-clockwise from +X towards +Y when seen from above (atan2(y, x), in (-180, 180]); elevation
  is degrees above the horizon (+90 = zenith = +Z).
* The mapping is exactly the one Blender's Environment Texture node uses with no Mapping node (Cycles
  `direction_to_equirectangular` in kernel/camera/projection.h, the OSL `node_environment_texture` and
  EEVEE's `node_tex_environment_equirectangular` all agree):

      u = 0.5 - atan2(y, x) / (2 pi)          v = 0.5 + atan2(z, hypot(x, y)) / pi

  so the image centre (u = 0.5) looks along +X, u = 0.25 along +Y, u = 0.75 along -Y and the wrap
  (u = 0 = 1) along -X. Moving right in the image turns clockwise seen from above, as it must for a view
  from inside the sphere. `tests/test_panorama_blender.py` checks this by rendering in Cycles.

Solid angles are exact per row band (not cos(latitude) sampled at the centre), so they sum to 4 pi.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "angles_from_direction",
    "direction_from_angles",
    "direction_from_uv",
    "pixel_from_uv",
    "row_elevations",
    "row_solid_angles",
    "row_upward_cosine_weights",
    "column_azimuths",
    "sun_lamp_rotation",
    "uv_from_direction",
    "uv_from_pixel",
]


def direction_from_uv(u, v) -> np.ndarray:
    """Unit direction(s) (..., 3) that Blender's Environment Texture samples at (u, v).

    u and v may be scalars or arrays (they broadcast); v is bottom -> top (v = 1 is the zenith).
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    azimuth = (0.5 - u) * (2.0 * math.pi)
    elevation = (v - 0.5) * math.pi
    return _direction(azimuth, elevation)


def uv_from_direction(direction) -> tuple:
    """(u, v) of direction(s) (..., 3); u in [0, 1), v in [0, 1]. Floats for one direction, else arrays.

    The direction need not be normalised. The zenith and nadir map to u = 0.5 (any u is right there).
    """
    d = np.asarray(direction, dtype=np.float64)
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    u = np.mod(0.5 - np.arctan2(y, x) / (2.0 * math.pi), 1.0)
    # mod can return exactly 1.0 for tiny negative inputs; keep the documented half-open range
    u = np.where(u >= 1.0, 0.0, u)
    v = 0.5 + np.arctan2(z, np.hypot(x, y)) / math.pi
    if d.ndim == 1:
        return float(u), float(v)
    return u, v


def direction_from_angles(azimuth_deg, elevation_deg) -> np.ndarray:
    """Unit direction(s) (..., 3) from azimuth/elevation in degrees (see the module conventions)."""
    return _direction(np.radians(azimuth_deg), np.radians(elevation_deg))


def angles_from_direction(direction) -> tuple:
    """(azimuth_deg, elevation_deg) of direction(s) (..., 3); floats for one direction."""
    d = np.asarray(direction, dtype=np.float64)
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    azimuth = np.degrees(np.arctan2(y, x))
    elevation = np.degrees(np.arctan2(z, np.hypot(x, y)))
    if d.ndim == 1:
        return float(azimuth), float(elevation)
    return azimuth, elevation


def uv_from_pixel(row, col, height: int, width: int) -> tuple:
    """(u, v) of a (possibly fractional) pixel position; integer positions are pixel centres."""
    u = (np.asarray(col, dtype=np.float64) + 0.5) / width
    v = 1.0 - (np.asarray(row, dtype=np.float64) + 0.5) / height
    return u, v


def pixel_from_uv(u, v, height: int, width: int) -> tuple:
    """(row, col) as floats (row 0 = top) of (u, v); the inverse of `uv_from_pixel`."""
    col = np.asarray(u, dtype=np.float64) * width - 0.5
    row = (1.0 - np.asarray(v, dtype=np.float64)) * height - 0.5
    return row, col


def row_elevations(height: int) -> np.ndarray:
    """Elevation in radians of each row's centre, top row first."""
    return (0.5 - (np.arange(height) + 0.5) / height) * math.pi


def column_azimuths(width: int) -> np.ndarray:
    """Azimuth in radians of each column's centre, left column first."""
    return (0.5 - (np.arange(width) + 0.5) / width) * (2.0 * math.pi)


def row_solid_angles(height: int, width: int) -> np.ndarray:
    """Solid angle (sr) of ONE pixel of each row; the whole image sums to 4 pi.

    Exact for the band between the row's edges: (2 pi / W) * (sin(top) - sin(bottom)). This is the
    cos(latitude) weight every spherical average uses, without the error of sampling it at the centre
    (which matters for the pole rows).
    """
    edges = (0.5 - np.arange(height + 1) / height) * math.pi
    return (2.0 * math.pi / width) * (np.sin(edges[:-1]) - np.sin(edges[1:]))


def row_upward_cosine_weights(height: int, width: int) -> np.ndarray:
    """Per-pixel weight of each row for the irradiance on a horizontal surface facing up.

    The integral of sin(elevation) over the pixel's solid angle (the cosine to the surface normal),
    exact per row band; rows below the horizon get 0. Summed over the image it is pi, so a uniform
    environment of radiance L gives irradiance pi * L.
    """
    edges = (0.5 - np.arange(height + 1) / height) * math.pi
    top = np.clip(np.sin(edges[:-1]), 0.0, None)
    bottom = np.clip(np.sin(edges[1:]), 0.0, None)
    return (2.0 * math.pi / width) * 0.5 * (top**2 - bottom**2)


def sun_lamp_rotation(direction) -> tuple[float, float, float]:
    """Euler XYZ rotation (radians) for a Blender Sun lamp whose light comes FROM `direction`.

    A Blender light shines along its local -Z, so its local +Z must point at the sun: rotate by
    (pi/2 - elevation) about Y (tilting +Z towards +X), then by the azimuth about Z.
    """
    azimuth, elevation = angles_from_direction(np.asarray(direction, dtype=np.float64).reshape(3))
    return 0.0, math.radians(90.0 - elevation), math.radians(azimuth)


def _direction(azimuth, elevation) -> np.ndarray:
    azimuth = np.asarray(azimuth, dtype=np.float64)
    elevation = np.asarray(elevation, dtype=np.float64)
    cos_el = np.cos(elevation)
    return np.stack(
        np.broadcast_arrays(cos_el * np.cos(azimuth), cos_el * np.sin(azimuth), np.sin(elevation)), axis=-1
    )
