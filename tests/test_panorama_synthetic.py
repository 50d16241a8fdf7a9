"""Synthetic equirectangular panoramas with known content, drawn in direction space (so a disc near the
zenith is correctly stretched), and checks that the drawings are what the other tests assume.

Imported by the other `test_panorama*` modules; everything here is numpy only.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from dit360_blender.panorama.color import linear_to_srgb
from dit360_blender.panorama.sphere import column_azimuths, direction_from_angles, row_elevations

SUN_COLOR = (1.0, 0.93, 0.8)  # warm white, linear


def direction_grid(height: int, width: int) -> np.ndarray:
    """(H, W, 3) unit direction of every pixel centre (row 0 = top)."""
    el = row_elevations(height)[:, None]
    az = column_azimuths(width)[None, :]
    return np.stack(
        np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)), axis=-1
    )


def periodic_noise(height: int, width: int, scale_px: float, seed: int, channels: int = 1) -> np.ndarray:
    """Smooth noise, zero mean, unit std, periodic in both axes (low-pass filtered white noise)."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal((channels, height, width))
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    filt = np.exp(-0.5 * (fx**2 + fy**2) * (2 * math.pi * scale_px) ** 2)
    out = np.real(np.fft.ifft2(np.fft.fft2(white) * filt))
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-12
    return np.moveaxis(out, 0, -1)


def natural_texture(height: int, width: int, seed: int, extra_width: int = 0) -> np.ndarray:
    """A natural-looking linear RGB texture (1/f amplitude spectrum, like photographs), periodic over
    width + extra_width columns: crop the first `width` columns of a wider one to break the wrap."""
    rng = np.random.default_rng(seed)
    full = width + extra_width
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(full)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / width)  # isotropic: ERP pixels are square in angle
    amp[0, 0] = 0.0
    spectrum = np.fft.fft2(rng.standard_normal((3, height, full))) * amp
    out = np.real(np.fft.ifft2(spectrum))
    out = out[0] * 0.8 + out * 0.2  # mostly shared between channels, some colour variation
    out = (out - out.mean()) / out.std()
    return np.clip(0.25 + 0.1 * np.moveaxis(out, 0, -1)[:, :width], 0.0, 1.0)


def encode(linear: np.ndarray) -> np.ndarray:
    """Linear float -> sRGB uint8 (clipped), as a generator's PNG would hold it."""
    return np.round(linear_to_srgb(np.clip(linear, 0.0, 1.0)) * 255.0).astype(np.uint8)


def sky_linear(height: int, width: int, seed: int = 0, clouds: float = 0.04) -> np.ndarray:
    """A clear-sky gradient over a textured ground, linear RGB (H, W, 3), seamless in u."""
    d = direction_grid(height, width)
    z = d[..., 2:3]
    zenith = np.array([0.10, 0.22, 0.60])
    horizon = np.array([0.55, 0.65, 0.80])
    t = np.clip(z, 0.0, 1.0) ** 0.5
    sky = horizon * (1 - t) + zenith * t
    ground = np.array([0.12, 0.10, 0.07]) * (1.0 + 0.3 * periodic_noise(height, width, 3.0, seed + 1))
    img = np.where(z > 0, sky, ground)
    img = img * (1.0 + clouds * periodic_noise(height, width, 6.0, seed + 2))
    return np.clip(img, 0.0, None)


def add_sun(
    linear: np.ndarray,
    azimuth_deg: float,
    elevation_deg: float,
    radius_deg: float = 1.5,
    color=SUN_COLOR,
    glow: float = 0.25,
    glow_deg: float = 3.0,
) -> np.ndarray:
    """Draw a sun disc (far above white, so it clips) with a soft glow of its colour, in direction space."""
    height, width = linear.shape[:2]
    d = direction_grid(height, width)
    centre = direction_from_angles(azimuth_deg, elevation_deg)
    dist = np.degrees(np.arccos(np.clip(d @ centre, -1.0, 1.0)))
    color = np.asarray(color)
    out = linear + glow * color * np.exp(-np.clip(dist - radius_deg, 0.0, None) / glow_deg)[..., None]
    out[dist <= radius_deg] = 50.0 * color
    return out


def sun_panorama(
    azimuth_deg: float, elevation_deg: float, height: int = 256, width: int = 512, **kw
) -> np.ndarray:
    """uint8 sRGB panorama of a clear sky with a sun (a fresh copy: callers may modify it)."""
    return _sun_panorama(azimuth_deg, elevation_deg, height, width, tuple(sorted(kw.items()))).copy()


@functools.lru_cache(maxsize=64)
def _sun_panorama(azimuth_deg, elevation_deg, height, width, kw) -> np.ndarray:
    # cached: a 2048x1024 one takes ~2 s to draw and several tests use the same one
    return encode(add_sun(sky_linear(height, width), azimuth_deg, elevation_deg, **dict(kw)))


def overcast(height: int = 256, width: int = 512, bright: bool = False) -> np.ndarray:
    """Grey overcast sky; `bright` pushes the whole upper sky into saturation (no compact region)."""
    d = direction_grid(height, width)
    z = d[..., 2:3]
    top, horizon = (1.3, 0.95) if bright else (0.55, 0.45)
    level = np.where(z > 0, horizon + (top - horizon) * np.clip(z, 0, 1), 0.15)
    img = level * np.array([0.95, 0.97, 1.0]) * (1.0 + 0.02 * periodic_noise(height, width, 5.0, 3))
    return encode(img)


def _rect_mask(d, az0, az1, el0, el1):
    az = np.degrees(np.arctan2(d[..., 1], d[..., 0]))
    el = np.degrees(np.arcsin(np.clip(d[..., 2], -1, 1)))
    daz = (az - 0.5 * (az0 + az1) + 180.0) % 360.0 - 180.0
    return (np.abs(daz) <= 0.5 * (az1 - az0)) & (el >= el0) & (el <= el1)


def room(height: int = 256, width: int = 512, windows: bool = True) -> np.ndarray:
    """An interior: textured walls, a darker floor, a ceiling; with `windows`, three large saturated
    windows and a large ceiling light panel (bright but none of them compact); else evenly lit."""
    d = direction_grid(height, width)
    z = d[..., 2:3]
    tex = periodic_noise(height, width, 2.0, 7, channels=3)
    wall = np.array([0.30, 0.26, 0.20]) * (1 + 0.15 * tex)
    floor = np.array([0.10, 0.07, 0.05]) * (1 + 0.3 * tex)
    ceiling = np.array([0.40, 0.40, 0.38]) * (1 + 0.05 * tex)
    img = np.where(z < -0.35, floor, np.where(z > 0.6, ceiling, wall))
    if windows:
        for az0, az1 in ((-60, -25), (20, 50), (120, 160)):
            img[_rect_mask(d, az0, az1, -15, 30)] = (2.0, 2.0, 2.1)  # blown-out daylight
        panel = np.degrees(np.arccos(np.clip(d[..., 2], -1, 1))) < 14.0  # ceiling panel around the zenith
        img[panel] = 3.0
    return encode(img)


# --- checks of the drawings themselves ---------------------------------------------------------


def test_sun_is_drawn_where_asked():
    img = sun_panorama(30.0, 40.0)
    white = img.min(axis=2) == 255
    rows, cols = np.nonzero(white)
    el = np.degrees(row_elevations(256))[rows].mean()
    az = np.degrees(column_azimuths(512))[cols].mean()
    assert abs(el - 40.0) < 1.0 and abs(az - 30.0) < 1.5


def test_noise_is_periodic():
    n = periodic_noise(32, 64, 2.0, 0)[..., 0]
    wrap = np.abs(n[:, 0] - n[:, -1]).mean()
    interior = np.abs(np.diff(n, axis=1)).mean()
    assert wrap < 3 * interior
