"""Analysis and HDR expansion of large panoramas (4K to 16K wide) in bounded memory (numpy only).

`hdr.expand_to_hdr` works on whole float64 images: at 16384x8192 one such copy is 3.2 GB and the
expansion makes several. For an 8-bit panorama wider than `ANALYSIS_WIDTH` (2048, DiT360's size),
`analyze.analyze` comes here instead:

* **Sun detection at 2K.** `detect_sun` runs on a box-averaged copy at most 2048 wide (an integer
  factor: 4K -> /2, 8K -> /4, 16K -> /8; a clipped sun stays clipped in the average). Its core is
  then found again at full size: in the full-size pixels of the 2K core's blocks and one block
  around them, those within `core_tolerance` of their brightest value (and saturated), which is how
  `detect_sun` defines the core at any size. Direction, solid angle, diameter, roundness and the
  mask come from that full-size core; colour, contrast and the sky level around it from the 2K copy
  (they are averages over many pixels). `tests/test_panorama_large.py` checks the direction
  against `detect_sun` on the full-size image.
* **Pole detail at 2K** (the seam statistics are measured at full size, in bands of rows: see
  `seam.seam_score`'s `pole_image`).
* **Expansion on demand.** The HDR images are never stored: `Environment` holds the 8-bit
  panorama, the curve's settings and the sun's few pixels (flat indices and float32 values), and
  computes any band of rows (`band`) or any set of pixels (`gather`, for the cube maps) exactly as
  `expand_to_hdr` does (float64, then float32). The sums the sun's gain, share and the exposure
  need are taken in one pass of bands at full size, so the numbers are those of the full image.
  `rgbe.write_hdr` writes an `Environment` band by band; `exr.write_exr` fills one array of the
  file's type (half float: 2 bytes per channel) band by band; `cubemap` gathers from it.

Peak memory beyond the 8-bit panorama itself: one band's float64 temporaries (~2M pixels, ~50 MB
each, a few at a time), the sun mask (1 byte per pixel) and, while an EXR is written, the file's
half-float array (6 bytes per pixel) and what the OpenEXR library buffers for it.
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from .color import _SRGB8_TABLE, luminance
from .hdr import HdrResult, expand_highlights, exposure_for
from .seam import row_bands
from .sphere import row_solid_angles, row_upward_cosine_weights, uv_from_direction
from .sun import SunDetection, SunParams, _cap_diameter, _Geometry, angles_from_direction, detect_sun

__all__ = ["ANALYSIS_WIDTH", "Environment", "analysis_copy", "detect_sun_large", "expand_large"]

ANALYSIS_WIDTH = 2048
BAND_THREADS = 4  # threads computing an Environment's bands ahead of its writer


def analysis_factor(width: int) -> int:
    """The box factor that brings `width` to at most ANALYSIS_WIDTH."""
    return max(1, math.ceil(width / ANALYSIS_WIDTH))


def analysis_copy(rgb: np.ndarray) -> np.ndarray:
    """A box-averaged float32 copy (0..1, sRGB-encoded) at most ANALYSIS_WIDTH wide, made band by
    band (never a whole-size float array). Sizes that the factor does not divide lose the last
    partial block of rows/columns (at most factor - 1 pixels, never more than 7 of a 16K image)."""
    f = analysis_factor(rgb.shape[1])
    h, w = rgb.shape[0] // f, rgb.shape[1] // f
    out = np.empty((h, w, 3), dtype=np.float32)
    rows_per_band = max(1, (1 << 21) // max(rgb.shape[1] * f, 1))  # small rows per band
    for start in range(0, h, rows_per_band):
        stop = min(h, start + rows_per_band)
        block = rgb[start * f : stop * f, : w * f, :3].astype(np.float32)
        block = block.reshape(stop - start, f, w, f, 3).mean(axis=(1, 3))
        out[start:stop] = block * np.float32(1.0 / 255.0)
    return out


def detect_sun_large(rgb: np.ndarray, small: np.ndarray, params: SunParams | None = None) -> SunDetection:
    """`detect_sun` on the analysis copy `small`, with the core found again at full size (module
    docstring). Without a sun: the 2K detection as it is."""
    params = params or SunParams()
    found = detect_sun(small, params)
    if found.sun is None:
        return found
    height, width = rgb.shape[:2]
    f = analysis_factor(width)
    h, w = small.shape[:2]
    # the 2K core's blocks and one block around them (the wrap wraps, the rows stop at the poles)
    r2, c2 = np.nonzero(found.sun.mask)
    near = np.zeros((h, w), dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near[np.clip(r2 + dr, 0, h - 1), (c2 + dc) % w] = True
    br, bc = np.nonzero(near)
    offsets = np.arange(f)
    rows = (br[:, None, None] * f + offsets[None, :, None]).repeat(f, axis=2).ravel()
    cols = (bc[:, None, None] * f + offsets[None, None, :]).repeat(f, axis=1).ravel()
    keep = (rows < height) & (cols < width)
    rows, cols = rows[keep], cols[keep]
    peak = rgb[rows, cols, :3].max(axis=1).astype(np.float64) / 255.0
    level = max(params.saturation_level, float(peak.max()) - params.core_tolerance)
    rows, cols = rows[peak >= level], cols[peak >= level]
    order = np.argsort(rows * width + cols)
    rows, cols = rows[order], cols[order]

    geo = _Geometry(height, width)
    omega = geo.omega[rows]
    dirs = geo.directions(rows, cols)
    mean = (omega[:, None] * dirs).sum(axis=0)
    centre = mean / max(float(np.linalg.norm(mean)), 1e-12)
    azimuth, elevation = angles_from_direction(centre)
    area = float(omega.sum())
    radius_eq = 0.5 * float(_cap_diameter(area))
    radius_max = float(np.arccos(np.clip(dirs @ centre, -1.0, 1.0)).max()) + geo.pixel_radius
    u, v = uv_from_direction(centre)
    mask = np.zeros((height, width), dtype=bool)
    mask[rows, cols] = True
    lum = luminance(_SRGB8_TABLE[rgb[rows, cols, :3]].astype(np.float64))
    sun = replace(
        found.sun,
        direction=tuple(float(x) for x in centre),
        azimuth_deg=float(azimuth),
        elevation_deg=float(elevation),
        u=float(u),
        v=float(v),
        diameter_deg=math.degrees(2.0 * radius_eq),
        solid_angle_sr=area,
        roundness=radius_eq / radius_max,
        core_luminance=float(np.average(lum, weights=omega)),
        pixel_count=int(rows.size),
        mask=mask,
    )
    return SunDetection(sun, found.reason, found.candidates)


class Environment:
    """A linear HDR environment (H, W, 3) computed on demand from an 8-bit panorama (module
    docstring): `band(start, stop)` rows, `gather(rows, cols)` pixels, `upper_bound()`, and `np.asarray`
    (the whole float32 image: for small images and tests only)."""

    dtype = np.dtype(np.float32)
    ndim = 3

    def __init__(
        self, rgb: np.ndarray, knee: float, gain: float, sun_flat: np.ndarray, sun_values: np.ndarray
    ) -> None:
        self.rgb, self.knee, self.gain = rgb, knee, gain
        self.sun_flat = sun_flat  # sorted flat indices (row * W + col) of the patched pixels
        self.sun_values = sun_values  # (k, 3) float32: their values
        self.shape = (rgb.shape[0], rgb.shape[1], 3)

    def _expand(self, values: np.ndarray) -> np.ndarray:
        base = expand_highlights(
            _SRGB8_TABLE[values[..., :3]].astype(np.float64), knee=self.knee, gain=self.gain
        )
        return base.astype(np.float32)

    def band(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop as float32 (stop - start, W, 3)."""
        out = self._expand(self.rgb[start:stop])
        width = self.shape[1]
        lo, hi = np.searchsorted(self.sun_flat, [start * width, stop * width])
        if hi > lo:
            local = self.sun_flat[lo:hi] - start * width
            out.reshape(-1, 3)[local] = self.sun_values[lo:hi]
        return out

    def gather(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The pixels (rows, cols) (any matching shapes) as float32 (..., 3)."""
        out = self._expand(self.rgb[rows, cols])
        if self.sun_flat.size:
            flat = rows * self.shape[1] + cols
            at = np.minimum(np.searchsorted(self.sun_flat, flat), self.sun_flat.size - 1)
            hit = self.sun_flat[at] == flat
            out[hit] = self.sun_values[at[hit]]
        return out

    def bands(self):
        """(start, stop, band) over the whole image, in order. The bands are computed a few ahead on
        worker threads (numpy releases the GIL in its array work): the writers are then bound by
        the cores, not by one; at most 2 x threads bands (~6 MB each) wait at a time."""
        slices = row_bands(self.shape[0], self.shape[1])
        threads = max(1, min(BAND_THREADS, os.cpu_count() or 1, len(slices)))
        if threads == 1:
            for rows in slices:
                yield rows.start, rows.stop, self.band(rows.start, rows.stop)
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dit360-band") as pool:
            pending: deque = deque()
            for rows in slices:
                pending.append((rows, pool.submit(self.band, rows.start, rows.stop)))
                if len(pending) >= 2 * threads:
                    done, future = pending.popleft()
                    yield done.start, done.stop, future.result()
            while pending:
                done, future = pending.popleft()
                yield done.start, done.stop, future.result()

    def upper_bound(self) -> float:
        """A bound on every value, without a pass over the image: the curve is monotone in the
        luminance and maps channel values <= 1 to at most `gain` (full white), and the sun's
        pixels are stored. Decides half or float32 for an EXR exactly as the true maximum would
        whenever `gain` fits half float (it is 2 by default)."""
        return max(float(self.gain), float(self.sun_values.max(initial=0.0)))

    def to_array(self, dtype) -> np.ndarray:
        """The whole image in `dtype` (e.g. float16 for a half-float EXR), filled band by band."""
        out = np.empty(self.shape, dtype=dtype)
        for start, stop, band in self.bands():
            out[start:stop] = band
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.to_array(dtype or np.float32)


def expand_large(
    rgb: np.ndarray,
    sun_share: float = 0.6,
    *,
    small: np.ndarray | None = None,
    params: SunParams | None = None,
    detection: SunDetection | None = None,
    knee: float = 0.6,
    highlight_gain: float = 2.0,
    grey_target: float = 0.18,
    exposure_limits: tuple[float, float] = (1.0 / 256.0, 256.0),
) -> HdrResult:
    """`hdr.expand_to_hdr` for a large 8-bit panorama: the same numbers and pixels (up to the order
    of float sums), with `hdr` and `lighting` as `Environment`s. `small`: the analysis copy (made
    when not given); `detection`: a full-size detection to use instead of `detect_sun_large`."""
    if not 0.0 <= sun_share < 1.0:
        raise ValueError(f"sun_share must be in [0, 1), got {sun_share}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) uint8 panorama, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    if detection is None:
        detection = detect_sun_large(rgb, analysis_copy(rgb) if small is None else small, params)
    omega = row_solid_angles(height, width)
    upward = row_upward_cosine_weights(height, width)
    e_total, e_up = 0.0, 0.0  # of the map without the sun patch, at world strength 1
    for rows in row_bands(height, width):
        base = expand_highlights(
            _SRGB8_TABLE[rgb[rows, :, :3]].astype(np.float64), knee=knee, gain=highlight_gain
        )
        y_rows = luminance(base).sum(axis=1)
        e_total += float(omega[rows] @ y_rows)
        e_up += float(upward[rows] @ y_rows)

    sun = detection.sun
    sun_gain, share, irradiance = 1.0, 0.0, (0.0, 0.0, 0.0)
    empty = (np.zeros(0, np.int64), np.zeros((0, 3), np.float32))
    hdr_patch, lighting_patch = empty, empty
    if sun is not None:
        rows, cols = np.nonzero(sun.mask)  # row-major: the flat indices come out sorted
        flat = rows * width + cols
        base = expand_highlights(
            _SRGB8_TABLE[rgb[rows, cols, :3]].astype(np.float64), knee=knee, gain=highlight_gain
        )
        y_base = luminance(base)
        w_sun = omega[rows]
        e_sun = float(np.sum(w_sun * y_base))
        e_rest = e_total - e_sun
        sun_gain = max(1.0, sun_share * e_rest / ((1.0 - sun_share) * e_sun)) if e_sun > 0 else 1.0
        color = np.asarray(sun.color, dtype=np.float64)
        color_y1 = color / max(float(luminance(color)), 1e-12)
        hdr_sun = color_y1[None, :] * (sun_gain * y_base)[:, None]
        fill = expand_highlights(
            np.asarray(sun.sky_rgb, dtype=np.float64)[None, :], knee=knee, gain=highlight_gain
        )
        lighting_sun = np.broadcast_to(fill, hdr_sun.shape)
        y_hdr_sun = luminance(hdr_sun)
        e_hdr_sun = float(np.sum(w_sun * y_hdr_sun))
        share = e_hdr_sun / (e_rest + e_hdr_sun)
        removed = (hdr_sun - lighting_sun) * w_sun[:, None]
        irradiance = tuple(float(x) for x in np.clip(removed.sum(axis=0), 0.0, None))
        e_up += float(upward[rows] @ (y_hdr_sun - y_base))
        hdr_patch = (flat, hdr_sun.astype(np.float32))
        lighting_patch = (flat, np.ascontiguousarray(lighting_sun, dtype=np.float32))
    exposure = exposure_for(e_up, grey_target=grey_target, limits=exposure_limits)
    return HdrResult(
        hdr=Environment(rgb, knee, highlight_gain, *hdr_patch),
        lighting=Environment(rgb, knee, highlight_gain, *lighting_patch),
        detection=detection,
        sun_share=share,
        sun_share_requested=float(sun_share),
        sun_gain=float(sun_gain),
        sun_irradiance_rgb=irradiance,
        exposure=exposure,
        upward_irradiance=e_up,
        settings={
            "knee": knee,
            "highlight_gain": highlight_gain,
            "grey_target": grey_target,
            "exposure_limits": list(exposure_limits),
            "method": "srgb-eotf + quadratic highlight expansion + sun share",
            "analysis_width": int(rgb.shape[1] // analysis_factor(rgb.shape[1])),
        },
    )
