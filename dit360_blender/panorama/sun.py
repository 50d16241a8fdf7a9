"""Find the sun in an 8-bit equirectangular panorama, or say why there is none (numpy only).

A sun is the brightest *compact* bright region of the upper hemisphere. The criteria, all fields of
`SunParams`, with defaults for DiT360's 2048x1024 output (0.18°/pixel):

1. **Near saturation.** Region pixels have max(R, G, B) >= `saturation_level` (0.92 of full scale,
   sRGB-encoded). A sun clips; an image whose brightest sky is below that has nothing to expand and no
   sun to report (overcast, dusk, night, most interiors).
2. **Connected.** Those pixels are grouped into 8-connected regions on the sphere: columns 0 and W-1
   are neighbours (a sun on the wrap is one region) and all pixels of the top row touch each other at
   the zenith. The *core* of a region is its plateau: the pixels within `core_tolerance` (0.03) of its
   brightest value. The rest of the region is glow, whose extent depends on the sky around it, so
   everything below is measured on the core.
3. **Above the horizon.** The core's centroid elevation is > `min_elevation_deg` (0°).
4. **Compact.** Its equivalent-disc diameter (the diameter of the spherical cap with the same solid
   angle) lies in [`min_diameter_deg`, `max_diameter_deg`] = [0.3°, 12°]: smaller is a glint or noise,
   larger is a bright overcast patch, a window or a lamp-lit wall. Its roundness (equivalent radius /
   the largest angular distance of its pixels from the centroid: 1 for a disc, 0.65 for a half disc
   cut by the horizon, 0.5 for a 4:1 ellipse) is >= `min_roundness` (0.5), which rejects lit cloud
   edges and bright bits of the horizon haze.
5. **Contrast.** The core's mean linear luminance is >= `min_contrast` (1.5) times the median
   luminance of the sky ring around it (from `ring_gap_deg` (3°) to `ring_gap_deg + ring_width_deg`
   (13°) outside the core's largest radius; only the part above the horizon when there is enough of
   it). A saturated patch in an equally bright haze is not a sun.

Among the regions passing every test, the one whose core has the most light (solid-angle-weighted
luminance) is the sun. Its direction is the solid-angle-weighted mean of its core pixels' unit vectors,
normalised: a vector mean, so a region on the wrap cannot average to the opposite side and one around
the zenith is not pulled off it. An indoor lamp that is small, saturated and contrasted passes too; it
then plays the key light, which is what a Sun lamp would do for it anyway.

Colour (linear Rec.709, scaled so the largest channel is 1): the core's mean colour, unless most of
the core is clipped in every channel (white whatever the sun's colour); then the excess of the glow
just outside the core over the sky ring, both over unclipped sky pixels (the sun's own light scattered
around it), if that excess is positive in every channel; failing that, white.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from .color import _SRGB8_TABLE, linear_image, luminance, to_unit_float
from .sphere import (
    angles_from_direction,
    column_azimuths,
    row_elevations,
    row_solid_angles,
    uv_from_direction,
)

__all__ = ["SunDetection", "SunEstimate", "SunParams", "detect_sun", "label_regions"]


@dataclass(frozen=True)
class SunParams:
    """The sun criteria (see the module docstring)."""

    saturation_level: float = 0.92  # max(R,G,B), sRGB-encoded 0..1, a core pixel must reach
    min_elevation_deg: float = 0.0  # the region's centroid must be above this
    min_diameter_deg: float = 0.3  # equivalent-disc diameter bounds
    max_diameter_deg: float = 12.0
    min_roundness: float = 0.5  # equivalent radius / max radius (1 = disc)
    min_contrast: float = 1.5  # core mean luminance / median luminance of the surrounding sky ring
    ring_gap_deg: float = 3.0  # the ring starts this far outside the core (skips the glow's edge)
    ring_width_deg: float = 10.0
    core_tolerance: float = 0.03  # the core is the region's pixels within this of its brightest value
    max_candidates: int = 16  # largest regions examined in full (the rest are tiny)


@dataclass(frozen=True)
class SunEstimate:
    """The detected sun. Angles in degrees, conventions of `panorama.sphere` (Blender world, +Z up)."""

    direction: tuple[float, float, float]  # unit vector towards the sun
    azimuth_deg: float  # counter-clockwise from +X towards +Y
    elevation_deg: float  # above the horizon
    u: float  # image position of the direction: u left -> right in [0, 1)
    v: float  # v bottom -> top in [0, 1] (row = (1 - v) * H - 0.5, row 0 = top)
    color: tuple[float, float, float]  # linear Rec.709, max channel 1
    diameter_deg: float  # equivalent-disc diameter of the core
    solid_angle_sr: float
    roundness: float
    contrast: float  # core mean luminance / ring median luminance (LDR, linear)
    core_luminance: float  # mean linear luminance of the core (LDR)
    sky_rgb: tuple[float, float, float]  # per-channel median linear RGB of the ring (LDR): the sky level
    pixel_count: int
    mask: np.ndarray = field(repr=False, compare=False)  # (H, W) bool, the core pixels

    def to_dict(self) -> dict:
        """JSON-ready fields (everything but the mask)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "mask"}
        for key in ("direction", "color", "sky_rgb"):
            out[key] = list(out[key])
        return out


@dataclass(frozen=True)
class SunDetection:
    """Result of `detect_sun`: the sun, or None and the reason, plus the regions that were examined."""

    sun: SunEstimate | None
    reason: str  # "found" or why there is no sun, in words for the panel
    candidates: list = field(default_factory=list)  # dicts: each examined region and its verdict

    @property
    def found(self) -> bool:
        return self.sun is not None

    def to_dict(self) -> dict:
        return {
            "found": self.found,
            "reason": self.reason,
            "sun": self.sun.to_dict() if self.sun else None,
            "candidates": self.candidates,
        }


def detect_sun(image: np.ndarray, params: SunParams | None = None) -> SunDetection:
    """Find the sun in an equirectangular image (H, W, 3), uint8 or float 0..1 (sRGB-encoded)."""
    params = params or SunParams()
    encoded = to_unit_float(image)
    height, width = encoded.shape[:2]
    linear = _Linear(image)  # decoded only where it is looked at: the candidates and their rings
    peak = _peak(image, encoded)
    elevations = row_elevations(height)
    upper_rows = elevations > math.radians(params.min_elevation_deg)

    core = peak >= params.saturation_level
    core &= upper_rows[:, None]
    if not core.any():
        brightest = float(peak[upper_rows].max()) if upper_rows.any() else 0.0
        return SunDetection(
            None,
            f"no sun: the brightest sky pixel ({brightest:.2f}) is below the saturation level "
            f"({params.saturation_level:.2f}), e.g. overcast, dusk, night or an interior",
        )

    labels, count = label_regions(core)
    geo = _Geometry(height, width)
    rows, cols = np.nonzero(labels)
    ids = labels[rows, cols] - 1
    omega = geo.omega[rows]
    lum = luminance(linear[rows, cols])  # of the labelled pixels, in their order
    energy = np.bincount(ids, omega * lum, minlength=count)

    # examine the regions with the most light first; the rest are specks
    candidates: list[dict] = []
    passing: list[tuple[float, SunEstimate]] = []
    # each region's pixels, in image order, as one slice of a stable sort (not a scan per region)
    by_region = np.argsort(ids, kind="stable")
    region_start = np.searchsorted(ids[by_region], np.arange(count + 1))
    for index in np.argsort(-energy)[: params.max_candidates]:
        sel = by_region[region_start[index] : region_start[index + 1]]
        # the sun proper is the region's clipped plateau; the rest of the region is its glow
        values = peak[rows[sel], cols[sel]]
        sel = sel[values >= values.max() - params.core_tolerance]
        region = _measure(rows[sel], cols[sel], omega[sel], geo, linear, lum[sel], encoded, params)
        verdict = _verdict(region, params)
        candidates.append(
            {
                "azimuth_deg": round(region["azimuth"], 3),
                "elevation_deg": round(region["elevation"], 3),
                "diameter_deg": round(region["diameter"], 3),
                "roundness": round(region["roundness"], 3),
                "contrast": None if region["contrast"] is None else round(region["contrast"], 3),
                "verdict": verdict,
            }
        )
        if verdict == "sun":
            mask = np.zeros((height, width), dtype=bool)
            mask[rows[sel], cols[sel]] = True
            light = float(np.sum(omega[sel] * lum[sel]))
            passing.append((light, _estimate(region, mask)))
    if passing:
        return SunDetection(max(passing, key=lambda item: item[0])[1], "found", candidates)
    return SunDetection(None, _no_sun_reason(candidates, params), candidates)


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of a boolean equirectangular mask, on the sphere.

    Columns 0 and W-1 are neighbours, and all pixels of the top row (and of the bottom row) touch
    at the pole. Returns (labels, count): labels (H, W) int32, 0 = background, regions 1..count.
    Works on runs of pixels rather than pixels, so large masks stay fast in plain numpy.
    """
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    labels = np.zeros((height, width), dtype=np.int32)
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    run_row, run_start = np.nonzero(step == 1)
    _, run_end = np.nonzero(step == -1)  # exclusive; both come out row-major, so they pair up
    n = run_row.size
    if n == 0:
        return labels, 0

    stride = width + 2
    start_key = run_row * stride + run_start
    end_key = run_row * stride + run_end
    edges_a, edges_b = [], []

    # row r+1 run [s, e) touches row r run [s1, e1) (8-connectivity) when s1 <= e and e1 >= s
    lower = np.nonzero(run_row > 0)[0]
    above = (run_row[lower] - 1) * stride
    lo = np.searchsorted(end_key, above + run_start[lower], side="left")
    hi = np.searchsorted(start_key, above + run_end[lower], side="right")
    counts = np.maximum(hi - lo, 0)
    if counts.any():
        edges_a.append(np.repeat(lower, counts))
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        edges_b.append(np.repeat(lo, counts) + offsets)

    # the wrap: a run touching the last column meets one touching the first column in the same row
    # and (diagonally) in the rows just above and below
    first_of_row = np.full(height, -1)
    last_of_row = np.full(height, -1)
    left = np.nonzero(run_start == 0)[0]
    right = np.nonzero(run_end == width)[0]
    first_of_row[run_row[left]] = left
    last_of_row[run_row[right]] = right
    for a, b in (
        (last_of_row, first_of_row),  # same row
        (last_of_row[:-1], first_of_row[1:]),  # last column of row r, first column of row r+1
        (last_of_row[1:], first_of_row[:-1]),  # last column of row r+1, first column of row r
    ):
        ok = (a >= 0) & (b >= 0)
        edges_a.append(a[ok])
        edges_b.append(b[ok])

    # the poles: every run of the top row touches every other one there, same for the bottom row
    for pole_row in (0, height - 1):
        runs = np.nonzero(run_row == pole_row)[0]
        if runs.size > 1:
            edges_a.append(runs[:-1])
            edges_b.append(runs[1:])

    root = _connected_components(n, np.concatenate(edges_a), np.concatenate(edges_b))
    _, component = np.unique(root, return_inverse=True)
    lengths = run_end - run_start
    pixel_rows = np.repeat(run_row, lengths)
    pixel_cols = np.repeat(run_start, lengths) + (
        np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    labels[pixel_rows, pixel_cols] = np.repeat(component + 1, lengths)
    return labels, int(component.max()) + 1


# ---------------------------------------------------------------------------------------------


class _Geometry:
    """Per-row / per-column trigonometry of one image size."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.omega = row_solid_angles(height, width)
        el = row_elevations(height)
        az = column_azimuths(width)
        self.sin_el, self.cos_el = np.sin(el), np.cos(el)
        self.sin_az, self.cos_az = np.sin(az), np.cos(az)
        self.pixel_radius = 0.5 * math.pi / height  # half a pixel's angular height

    def directions(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        c = self.cos_el[rows]
        return np.stack([c * self.cos_az[cols], c * self.sin_az[cols], self.sin_el[rows]], axis=-1)

    def cos_distance_band(self, centre: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """Rows within `radius` (rad) of `centre` in elevation, and cos(angle to centre) for them x all columns."""
        el_c = math.asin(max(-1.0, min(1.0, centre[2])))
        az_c = math.atan2(centre[1], centre[0])
        el = row_elevations(self.height)
        rows = np.nonzero(np.abs(el - el_c) <= radius + self.pixel_radius)[0]
        cos_daz = self.cos_az * math.cos(az_c) + self.sin_az * math.sin(az_c)
        across = self.cos_el[rows, None] * math.cos(el_c) * cos_daz[None, :]
        return rows, across + self.sin_el[rows, None] * math.sin(el_c)


class _Linear:
    """Linear Rec.709 float64 values of an image's pixels, indexed like the image (`[rows, cols]`,
    `[band_rows]`): an 8-bit image is decoded through the sRGB table only where it is indexed (the
    sun's candidates are a few percent of a panorama); any other kind is decoded once, whole."""

    def __init__(self, image: np.ndarray) -> None:
        raw = np.asarray(image)
        self._raw = raw if _is_rgb8(raw) else None
        self._whole = None if self._raw is not None else linear_image(raw).astype(np.float64)

    def __getitem__(self, key) -> np.ndarray:
        if self._raw is None:
            return self._whole[key]
        return _SRGB8_TABLE[self._raw[key][..., :3]].astype(np.float64)


def _is_rgb8(image: np.ndarray) -> bool:
    return image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] >= 3


def _peak(image: np.ndarray, encoded: np.ndarray) -> np.ndarray:
    """max(R, G, B) of the sRGB-encoded 0..1 values (`encoded` is `to_unit_float(image)`); for an
    8-bit image taken on the bytes and scaled through a table (the same float32 values)."""
    raw = np.asarray(image)
    if _is_rgb8(raw):
        return _UNIT8_TABLE[_channel_max(raw[..., :3])]
    return _channel_max(encoded)


_UNIT8_TABLE = np.arange(256, dtype=np.float32) / np.float32(255.0)  # what to_unit_float makes of a byte


def _channel_max(rgb: np.ndarray) -> np.ndarray:
    """max(R, G, B) of (..., 3): what `.max(axis=-1)` gives, without numpy's slow reduction over an
    axis of three (seven times slower on a 2K panorama)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def _cap_diameter(solid_angle):
    """Angular diameter (rad) of the spherical cap with this solid angle: omega = 2 pi (1 - cos r)."""
    return 2.0 * np.arccos(np.clip(1.0 - np.asarray(solid_angle) / (2.0 * math.pi), -1.0, 1.0))


def _measure(rows, cols, omega, geo: _Geometry, linear, lum, encoded, params: SunParams) -> dict:
    """Shape of a core (always) and, if the shape can be a sun, its contrast and colour. `lum`: the
    core pixels' linear luminance; `linear`: a `_Linear` of the image."""
    dirs = geo.directions(rows, cols)
    mean = (omega[:, None] * dirs).sum(axis=0)
    centre = mean / max(np.linalg.norm(mean), 1e-12)
    azimuth, elevation = angles_from_direction(centre)
    area = float(omega.sum())
    radius_eq = 0.5 * float(_cap_diameter(area))
    # pixel centres lie up to half a pixel inside the region's true edge
    radius_max = float(np.arccos(np.clip(dirs @ centre, -1.0, 1.0)).max()) + geo.pixel_radius
    region = {
        "centre": centre,
        "azimuth": azimuth,
        "elevation": elevation,
        "area": area,
        "diameter": math.degrees(2.0 * radius_eq),
        "roundness": radius_eq / radius_max,
        "contrast": None,  # measured only for a sun-shaped core (it costs a pass over the sky around it)
        "core_lum": float(np.average(lum, weights=omega)),
        "count": int(rows.size),
    }
    if _verdict(region, params) != "sun":
        return region

    ring_in = radius_max + math.radians(params.ring_gap_deg)
    ring_out = ring_in + math.radians(params.ring_width_deg)
    band_rows, cos_d = geo.cos_distance_band(centre, ring_out)
    dist = np.arccos(np.clip(cos_d, -1.0, 1.0))
    above = row_elevations(geo.height)[band_rows, None] > math.radians(params.min_elevation_deg)
    ring = (dist >= ring_in) & (dist <= ring_out)
    if np.count_nonzero(ring & above) >= 8:  # the sky around the sun, not the ground below it
        ring &= above
    band = linear[band_rows]
    ring_rgb = np.median(band[ring], axis=0) if ring.any() else np.zeros(3)
    ring_lum = float(luminance(ring_rgb))
    region["contrast"] = float(min(region["core_lum"] / ring_lum, 1e6)) if ring_lum > 1e-6 else 1e6
    region["ring_rgb"] = np.asarray(ring_rgb, dtype=np.float64)

    color = np.average(linear[rows, cols], axis=0, weights=omega)
    white = encoded[rows, cols].min(axis=1) >= 0.98  # clipped in every channel
    if omega[white].sum() >= 0.5 * area:
        # a clipped core is white whatever the sun's colour: start from its clipped pixels (about
        # white; the others are mostly glow over the sky), then look at the glow between core and
        # ring, which is not clipped: its excess over the ring is the sun's own scattered light
        color = np.average(linear[rows[white], cols[white]], axis=0, weights=omega[white])
        unclipped = above & (_channel_max(encoded[band_rows]) < 0.98)
        halo = unclipped & (dist > radius_max) & (dist < ring_in)
        outer = unclipped & ring
        if np.count_nonzero(halo) >= 4 and np.count_nonzero(outer) >= 4:
            weights = np.broadcast_to(geo.omega[band_rows][:, None], dist.shape)
            excess = np.average(band[halo], axis=0, weights=weights[halo]) - np.average(
                band[outer], axis=0, weights=weights[outer]
            )
            if np.all(excess > 0) and luminance(excess) > 0.01:
                color = excess
    region["color"] = color / max(float(color.max()), 1e-12)
    return region


def _verdict(region: dict, params: SunParams) -> str:
    """Return "sun" or why not; the contrast is judged only once it has been measured."""
    diameter = region["diameter"]
    if region["elevation"] <= params.min_elevation_deg:
        return "below the horizon"
    if diameter < params.min_diameter_deg:
        return "too small"
    if diameter > params.max_diameter_deg:
        return "too large"
    if region["roundness"] < params.min_roundness:
        return "not round"
    if region["contrast"] is not None and region["contrast"] < params.min_contrast:
        return "low contrast"
    return "sun"


def _no_sun_reason(candidates: list[dict], params: SunParams) -> str:
    verdicts = {c["verdict"] for c in candidates}
    if verdicts <= {"too large"}:
        smallest = min(c["diameter_deg"] for c in candidates)
        return (
            f"no sun: the saturated regions are too large to be a sun (smallest {smallest:.1f}° > "
            f"{params.max_diameter_deg:.1f}°), e.g. a bright overcast sky or windows"
        )
    if verdicts <= {"too small"}:
        return "no sun: only tiny saturated specks (glints or noise)"
    parts = ", ".join(f"{c['verdict']} ({c['diameter_deg']:.1f}°)" for c in candidates[:4])
    return f"no sun: no compact, bright, contrasted region above the horizon; examined: {parts}"


def _estimate(region: dict, mask: np.ndarray) -> SunEstimate:
    centre = region["centre"]
    u, v = uv_from_direction(centre)
    return SunEstimate(
        direction=tuple(float(x) for x in centre),
        azimuth_deg=float(region["azimuth"]),
        elevation_deg=float(region["elevation"]),
        u=float(u),
        v=float(v),
        color=tuple(float(x) for x in region["color"]),
        diameter_deg=float(region["diameter"]),
        solid_angle_sr=float(region["area"]),
        roundness=float(region["roundness"]),
        contrast=float(region["contrast"]),
        core_luminance=float(region["core_lum"]),
        sky_rgb=tuple(float(x) for x in region["ring_rgb"]),
        pixel_count=int(region["count"]),
        mask=mask,
    )


def _connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (smallest member) of each of n nodes given undirected edges a-b: hook-and-compress."""
    parent = np.arange(n)
    if a.size == 0:
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        if np.array_equal(pa, pb):
            return parent
        low = np.minimum(pa, pb)
        np.minimum.at(parent, pa, low)  # hook each root onto the smaller root it touches
        np.minimum.at(parent, pb, low)
        while True:  # pointer jumping until every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
