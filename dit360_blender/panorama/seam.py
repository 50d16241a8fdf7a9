"""How visible is the 0°/360° seam, and do the poles keep their detail? (numpy only)

Seam score
----------
Two statistics are measured at every boundary between neighbouring columns x and x+1 (x = 0 .. W-2,
the W-1 *interior* boundaries) and at the *wrap* boundary between the last and the first column, on
the sRGB-encoded values in 0..1 (what the eye sees), per R, G, B channel:

* **step**: the mean |I(y, x+1) - I(y, x)| over the rows, each row weighted by its solid angle (cos
  latitude: rows near the poles are many pixels for very little of the sphere, and their neighbouring
  columns are nearly identical, so they must not count as much as the horizon). It catches a
  *mismatch* of content: texture that does not continue across the wrap.
* **offset**: the same signed difference averaged over bands of rows (16 bands of 11.25° latitude),
  then made absolute and averaged over the bands. Texture differences of either sign cancel inside a
  band while a brightness or colour shift across the wrap does not, so this catches a low-frequency
  step hidden in per-pixel texture noise (a mean |difference| grows only quadratically with a small
  offset). Averaging rows (not columns) keeps the boundary sharp.

Natural images mix smooth sky with busy texture, so a raw step is large or small mostly because of
*where* it is. Each boundary's value is therefore divided by the median value of its neighbouring
boundaries at distances 2..9 columns on both sides, floored at ``noise_floor`` (0.5/255) so a flat
neighbourhood does not divide by zero (distance 1 is skipped so that a seam smeared over
2-3 columns is still compared with the texture beyond it): a *local ratio*, about 1 anywhere in a
seamless image. The wrap's local ratio is then compared with the distribution of the W - 1 interior
ones, robustly:

* ``z`` = (wrap - median) / sigma with sigma = 1.4826 * MAD (which equals the standard deviation for
  normal data: the Iglewicz-Hoaglin "modified z-score"), floored at 0.05 for images whose columns are
  all alike.
* ``percentile`` = share (%) of interior boundaries with a smaller local ratio (ties count half):
  about 50 is typical, 100 means the wrap is the most unusual boundary of the image.

An image upscaled by a whole factor p (``period``; an upscale job passes its output width over its
source width) has a grid: every p-th boundary lies between two source pixels and the others inside
one, so the two kinds differ systematically (a network that adds a nearest-neighbour copy of its
input, as Real-ESRGAN Compact does, makes the first kind a step and the second nearly flat) and the
wrap, always between source pixels, would stand out among all boundaries however seamless it is.
With ``period`` p only the W/p boundaries between source pixels (x = p-1, 2p-1, ..., the wrap) are
scored, each against its own kind (distances 2..9 counted among them).

``seam_ok`` is false when, for either statistic, z > 3.5 (the usual outlier cut for modified
z-scores) AND the wrap's value exceeds its neighbourhood's by more than 1/255 (``2 * noise_floor``), so
an invisible 1/255 step in a flat sky is not called a seam. Measured on synthetic 512x256 panoramas:
seamless textures give |z| < 2.5, an unrelated texture across the wrap z > 9, a 0.04 linear brightness
offset z_offset > 4.

Pole detail
-----------
The panorama is resampled (bilinear) onto the six faces of a cube (face size W/4), which sample the
sphere almost uniformly, unlike the equirectangular rows near the poles. The detail of a face is the
RMS of the 4-neighbour Laplacian of its luma. ``pole_detail_top`` / ``pole_detail_bottom`` are the top
(+Z) and bottom (-Z) faces' detail divided by the mean detail of the four side faces, and
``pole_detail_ratio`` uses both pole faces together. About 1 means the zenith and nadir are as detailed
as the horizon belt; well below 1 (say < 0.5) means blurred or smeared poles, which is the usual
artefact of equirectangular generators but also what a clear sky looks like, so read it with the
image; well above 1 (> 2) points at pinched or swirly noise at the poles. ``None`` when the side faces
have no detail at all (a flat image).
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from .color import LUMA_709, to_unit_float
from .sphere import row_solid_angles

BAND_PIXELS = 2048 * 1024  # up to this size the statistics are taken in one pass
# larger images (and panorama/large.py) go in bands of this many pixels: their float64 temporaries
# stay ~6 MB each (small enough for malloc to reuse instead of mapping fresh pages every band)
LARGE_BAND_PIXELS = 1 << 18

__all__ = ["SEAM_MIN_PERIODS", "SeamReport", "column_offsets", "column_steps", "pole_detail", "seam_score"]

MAD_TO_SIGMA = 1.4826  # MAD * this = standard deviation for normally distributed data
SEAM_Z_THRESHOLD = 3.5  # Iglewicz & Hoaglin's outlier cut for modified z-scores
LOCAL_NEAR, LOCAL_FAR = 2, 9  # neighbouring boundaries (distance in columns) that set the local scale
MIN_RATIO_SIGMA = 0.05  # floor of the ratios' spread: an image with identical columns has MAD 0
SEAM_MIN_PERIODS = 2 * (LOCAL_FAR + 1)  # a `period` must leave this many boundaries to compare


@dataclass(frozen=True)
class SeamReport:
    """Seam and pole scores of one panorama. All plain floats/bools/None: `to_dict()` is JSON-ready."""

    seam_z: float  # robust z-score of the wrap's step (local ratio) among the interior boundaries
    seam_percentile: float  # % of interior boundaries with a smaller step (local ratio)
    seam_z_offset: float  # the same for the row-band-averaged signed step: brightness/colour shifts
    seam_percentile_offset: float
    wrap_step: float  # solid-angle-weighted mean |step| across the wrap, 0..1 units
    interior_step_median: float  # median of the same over interior boundaries
    wrap_offset: float  # band-averaged |signed step| across the wrap, 0..1 units
    interior_offset_median: float
    seam_ok: bool  # no outlier that is also visible (see the module docstring)
    period: int  # 1, or p: only every p-th boundary (between an upscale's source pixels) was scored
    pole_detail_top: float | None  # zenith cube face detail / side faces' detail
    pole_detail_bottom: float | None  # nadir cube face detail / side faces' detail
    pole_detail_ratio: float | None  # both pole faces / side faces (~1 good, << 1 blurred, >> 1 noisy)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines (what the CLI prints)."""
        verdict = "no visible seam" if self.seam_ok else "VISIBLE SEAM at the 0°/360° wrap"
        lines = [
            f"seam        {verdict}",
            f"  step      z {self.seam_z:.2f}, percentile {self.seam_percentile:.1f}: "
            f"{self.wrap_step * 255:.2f}/255 across the wrap, interior median {self.interior_step_median * 255:.2f}/255",
            f"  offset    z {self.seam_z_offset:.2f}, percentile {self.seam_percentile_offset:.1f}: "
            f"{self.wrap_offset * 255:.2f}/255 across the wrap, interior median {self.interior_offset_median * 255:.2f}/255",
            f"  (z above {SEAM_Z_THRESHOLD} = an outlier among the image's own column boundaries)",
        ]
        if self.period > 1:
            lines.append(
                f"  compared with the boundaries between source pixels only (every {self.period}th "
                "column: an upscale's grid)"
            )
        if self.pole_detail_ratio is None:
            lines.append("poles       no detail anywhere (flat image)")
        else:
            lines.append(
                f"poles       detail ratio {self.pole_detail_ratio:.2f} (top {self.pole_detail_top:.2f}, "
                f"bottom {self.pole_detail_bottom:.2f}); ~1 = as detailed as the horizon, "
                "<0.5 blurred, >2 noisy"
            )
        return "\n".join(lines)


def seam_score(
    image: np.ndarray,
    *,
    bands: int = 16,
    noise_floor: float = 0.5 / 255,
    z_threshold: float = SEAM_Z_THRESHOLD,
    pole_image: np.ndarray | None = None,
    period: int = 1,
) -> SeamReport:
    """Score the wrap seam and the pole detail of an equirectangular image (H, W, 3), uint8 or float 0..1.

    `bands`: row bands of the offset statistic; `noise_floor`: smallest meaningful step (0..1 units);
    `z_threshold`: the outlier cut. See the module docstring. `pole_image`: where to measure the pole
    detail instead (a downsampled copy of a large panorama: the cube faces of a 16K image would be
    4096 pixels square); the seam statistics are always measured on `image`, in bands of rows.
    `period`: score only every `period`-th boundary, those between the source pixels of an image
    upscaled by that whole factor (see the module docstring); it must divide the width.
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    if width < 8 or height < 4:
        raise ValueError(f"image too small for a seam score: {width}x{height}")
    period = int(period)
    if period < 1 or width % period or (period > 1 and width // period < SEAM_MIN_PERIODS):
        raise ValueError(
            f"a seam period of {period} does not fit a {width} px wide image: it must divide the "
            f"width and leave at least {SEAM_MIN_PERIODS} source columns"
        )
    on_grid = slice(period - 1, None, period)  # the last of them is the wrap (x = W-1)
    # two independent passes over the image, side by side (numpy releases the GIL in its array
    # work): this runs on every job's tail
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit360-seam-part") as pool:
        poles_pending = pool.submit(pole_detail, image if pole_image is None else pole_image)
        steps, offsets = column_statistics(image, bands)
        step = _wrap_stats(steps[on_grid], noise_floor)
        offset = _wrap_stats(offsets[on_grid], noise_floor)
        poles = poles_pending.result()
    return SeamReport(
        seam_z=step["z"],
        seam_percentile=step["percentile"],
        seam_z_offset=offset["z"],
        seam_percentile_offset=offset["percentile"],
        wrap_step=step["wrap"],
        interior_step_median=step["median"],
        wrap_offset=offset["wrap"],
        interior_offset_median=offset["median"],
        seam_ok=not any(st["z"] > z_threshold and st["excess"] > 2 * noise_floor for st in (step, offset)),
        period=period,
        pole_detail_top=poles["top"],
        pole_detail_bottom=poles["bottom"],
        pole_detail_ratio=poles["ratio"],
    )


def column_steps(image: np.ndarray) -> np.ndarray:
    """The *step* statistic at each of the W column boundaries: entry x is between column x and x+1,
    and the last entry (x = W-1) is the wrap between the last and the first column.

    |difference| averaged over the channels, then over the rows weighted by solid angle. Measured in
    bands of rows (one band up to 2048x1024), so a 16K panorama is never copied whole into float.
    """
    return column_statistics(image, steps=True, offsets=False)[0]


def column_offsets(image: np.ndarray, bands: int = 16) -> np.ndarray:
    """The *offset* statistic at each column boundary (same indexing as `column_steps`).

    The signed difference averaged (solid-angle weighted) over each of `bands` bands of rows, made
    absolute, averaged over the channels and over the bands weighted by their solid angle. Summed
    in chunks of rows like `column_steps`.
    """
    return column_statistics(image, bands, steps=False, offsets=True)[1]


def column_statistics(
    image: np.ndarray, bands: int = 16, *, steps: bool = True, offsets: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(`column_steps`, `column_offsets`) of `image` from one pass over its column differences
    (either is None when not asked for). An 8-bit image is differenced in integers (exact, and a
    sixth of the memory traffic of float64); the sums over rows are float64 matrix products."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    weights = row_solid_angles(height, width)
    bands = max(1, min(bands, height))
    starts = np.arange(bands) * height // bands  # contiguous bands of rows
    band_of_row = np.searchsorted(starts, np.arange(height), side="right") - 1
    band_weight = np.add.reduceat(weights, starts)
    step_total = np.zeros(width) if steps else None
    band_sums = np.zeros((bands, width * 3)) if offsets else None  # to_unit_float makes every image RGB
    scale = 1.0
    for rows in row_bands(height, width):
        diff, scale = _column_differences(image[rows])  # (rows, W, 3), column x+1 minus x (mod W)
        if step_total is not None:
            a = np.abs(diff)
            step_total += weights[rows] @ (a[..., 0] + a[..., 1] + a[..., 2]).astype(np.float64)
            del a
        if band_sums is not None:  # (bands, rows) weights, nonzero where the row is in the band
            ids = band_of_row[rows]
            by_band = np.zeros((bands, ids.size))
            by_band[ids, np.arange(ids.size)] = weights[rows]
            band_sums += by_band @ diff.reshape(ids.size, -1).astype(np.float64)
    step = None if step_total is None else step_total * (scale / 3.0) / weights.sum()
    offset = None
    if band_sums is not None:
        means = band_sums.reshape(bands, width, 3) * scale / np.maximum(band_weight, 1e-30)[:, None, None]
        means = np.abs(means).mean(axis=2)  # (bands, W)
        offset = band_weight @ means / band_weight.sum()
    return step, offset


def _column_differences(block: np.ndarray) -> tuple[np.ndarray, float]:
    """Column x+1 minus column x (the last column: the first minus it) of a band of rows, (rows, W, 3),
    and the factor to 0..1 units: int16 and 1/255 for 8-bit RGB (exact), else float64 and 1."""
    if block.dtype == np.uint8 and block.ndim == 3 and block.shape[2] >= 3:
        rgb = block[..., :3]
        diff = np.empty(rgb.shape, dtype=np.int16)
        np.subtract(rgb[:, 1:], rgb[:, :-1], out=diff[:, :-1], dtype=np.int16)
        np.subtract(rgb[:, :1], rgb[:, -1:], out=diff[:, -1:], dtype=np.int16)
        return diff, 1.0 / 255.0
    img = to_unit_float(block).astype(np.float64)
    return np.roll(img, -1, axis=1) - img, 1.0


def row_bands(height: int, width: int, pixels: int | None = None) -> list[slice]:
    """Contiguous slices of rows of about `pixels` pixels each; by default one slice up to 2048x1024
    (so a generated panorama's numbers are those of one pass), else bands of LARGE_BAND_PIXELS."""
    if pixels is None:
        pixels = height * width if height * width <= BAND_PIXELS else LARGE_BAND_PIXELS
    step = max(1, pixels // max(width, 1))
    return [slice(start, min(height, start + step)) for start in range(0, height, step)]


def pole_detail(image: np.ndarray, face_size: int | None = None) -> dict:
    """Detail (RMS Laplacian of luma) of the zenith/nadir cube faces relative to the side faces.

    Returns {"top", "bottom", "ratio"} (floats, or None for a flat image); see the module docstring.
    """
    img = to_unit_float(image)
    height, width = img.shape[:2]
    # channel by channel: a product with LUMA_709 over a last axis of 3 is several times slower
    # (in float64 whatever numpy's scalar promotion rules: numpy 1 would keep float32 here)
    luma = sum(np.multiply(img[..., c], LUMA_709[c], dtype=np.float64) for c in range(3))
    n = face_size or max(16, width // 4)
    energies = {face: _laplacian_energy(_cube_face(luma, face, n)) for face in _FACES}
    side = np.mean([energies[f] for f in ("+X", "-X", "+Y", "-Y")])
    if side <= 1e-12:
        return {"top": None, "bottom": None, "ratio": None}
    top, bottom = energies["+Z"], energies["-Z"]
    return {
        "top": float(math.sqrt(top / side)),
        "bottom": float(math.sqrt(bottom / side)),
        "ratio": float(math.sqrt(0.5 * (top + bottom) / side)),
    }


# ---------------------------------------------------------------------------------------------


def _local_ratio(values: np.ndarray, noise_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Each boundary's value over the median of its neighbours at distances 2..9 on both sides
    (circularly), and that reference. Distance 1 is left out so that a seam smeared over 2-3 columns
    (a blend, a decoder's border) is still compared with the texture beyond it."""
    offsets = np.r_[-np.arange(LOCAL_NEAR, LOCAL_FAR + 1), np.arange(LOCAL_NEAR, LOCAL_FAR + 1)]
    index = (np.arange(values.size)[:, None] + offsets[None, :]) % values.size
    reference = np.median(values[index], axis=1)
    return values / np.maximum(reference, noise_floor), reference


def _wrap_stats(values: np.ndarray, noise_floor: float) -> dict:
    """Robust z-score and percentile of the wrap's (the last) local ratio among the interior ones."""
    ratio, reference = _local_ratio(values, noise_floor)
    wrap, interior = ratio[-1], ratio[:-1]
    median = float(np.median(interior))
    sigma = max(MAD_TO_SIGMA * float(np.median(np.abs(interior - median))), MIN_RATIO_SIGMA)
    below = np.count_nonzero(interior < wrap) + 0.5 * np.count_nonzero(interior == wrap)
    return {
        "z": float((wrap - median) / sigma),
        "percentile": float(100.0 * below / interior.size),
        "wrap": float(values[-1]),
        "median": float(np.median(values[:-1])),
        "excess": float(values[-1] - reference[-1]),  # how much larger than the texture around it
    }


# face name -> (centre, right, down) axes; the down axis of a side face is -Z so rows run top -> bottom
_FACES = {
    "+X": ((1, 0, 0), (0, -1, 0), (0, 0, -1)),
    "-X": ((-1, 0, 0), (0, 1, 0), (0, 0, -1)),
    "+Y": ((0, 1, 0), (1, 0, 0), (0, 0, -1)),
    "-Y": ((0, -1, 0), (-1, 0, 0), (0, 0, -1)),
    "+Z": ((0, 0, 1), (0, -1, 0), (-1, 0, 0)),
    "-Z": ((0, 0, -1), (0, -1, 0), (1, 0, 0)),
}


def _cube_face(luma: np.ndarray, face: str, n: int) -> np.ndarray:
    """Bilinear resampling of an equirectangular (H, W) array onto one n x n cube face."""
    i00, i01, i10, i11, fr, fc = _cube_face_plan(face, n, *luma.shape)
    flat = luma.reshape(-1)  # gathers by flat index: several times faster than 2-D fancy indexing
    top = flat.take(i00) * (1 - fc) + flat.take(i01) * fc
    bottom = flat.take(i10) * (1 - fc) + flat.take(i11) * fc
    return top * (1 - fr) + bottom * fr


@functools.lru_cache(maxsize=12)
def _cube_face_plan(face: str, n: int, height: int, width: int) -> tuple[np.ndarray, ...]:
    """Where each face pixel samples the panorama: the flat indices of its four neighbours (top
    left, top right, bottom left, bottom right; columns wrapped) and the bilinear weights. It
    depends only on the sizes, so it is computed once per size (every image of a job is the same)."""
    centre, right, down = (np.asarray(a, dtype=np.float64) for a in _FACES[face])
    t = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    d = centre + t[None, :, None] * right + t[:, None, None] * down  # (n, n, 3), not normalised
    # same mapping as sphere.uv_from_direction, written out to stay in pixel units
    col = (0.5 - np.arctan2(d[..., 1], d[..., 0]) / (2 * math.pi)) * width - 0.5
    row = (0.5 - np.arctan2(d[..., 2], np.hypot(d[..., 0], d[..., 1])) / math.pi) * height - 0.5
    row = np.clip(row, 0.0, height - 1.0)
    r0 = np.floor(row).astype(np.int64)
    c0 = np.floor(col).astype(np.int64)
    fr, fc = row - r0, col - c0
    r1 = np.minimum(r0 + 1, height - 1)
    c0w, c1w = np.mod(c0, width), np.mod(c0 + 1, width)  # columns wrap around the seam
    plan = (r0 * width + c0w, r0 * width + c1w, r1 * width + c0w, r1 * width + c1w, fr, fc)
    for array in plan:
        array.flags.writeable = False  # shared between calls
    return plan


def _laplacian_energy(face: np.ndarray) -> float:
    lap = face[1:-1, :-2] + face[1:-1, 2:] + face[:-2, 1:-1] + face[2:, 1:-1] - 4.0 * face[1:-1, 1:-1]
    return float(np.mean(lap**2))
