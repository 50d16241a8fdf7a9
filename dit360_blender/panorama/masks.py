"""Edit masks on the equirectangular sphere (numpy only): a user's mask of any size made the
panorama's size, its edge feathered in degrees on the sphere, and the seam-repair band.

Masks are (H, W) float32 in [0, 1], row 0 at the top (`sphere.py`'s conventions); 1 = regenerate,
0 = keep the source. Feathering only ever ADDS a soft margin outside what the mask marks: a pixel
the mask marks (>= 0.5) keeps its value, and a pixel farther than the feather radius from every
marked pixel keeps its value too (0 stays exactly 0), so the edit's pixel composite leaves everything
outside the feathered mask bit for bit as it was.
"""

from __future__ import annotations

import math

import numpy as np

from .sphere import direction_from_uv

__all__ = [
    "GeometryError",
    "area_resize",
    "feather_mask",
    "mask_from_image",
    "resize_mask",
    "roll_half",
    "seam_band_mask",
    "smooth_ramp",
    "unroll_half",
]

ASPECT_TOLERANCE = 0.02  # a mask within 2 % of the panorama's 2:1 (or a pixel of rounding) is resized
_MAX_FEATHER_CELLS = 256  # rows of the grid the feather's distances are measured on
_MAX_EDGE_CELLS = 8192  # edge cells compared at once with every grid cell (else a coarser grid)
_TILE = 32  # pixels per side of the tiles the exact pass measures at once
_MAX_EDGE_PIXELS = 20000  # edge pixels the exact pass compares with (else the grid's distances)


class GeometryError(ValueError):
    """A camera, photo or mask the geometry cannot use: `message` says why, `hint` what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(f"{message}; {hint}" if hint else message)
        self.message, self.hint = message, hint


def smooth_ramp(t) -> np.ndarray:
    """Smoothstep of t clipped to [0, 1] (0 -> 0, 1 -> 1, flat at both ends), float32."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def mask_from_image(pixels: np.ndarray) -> np.ndarray:
    """An image's pixels (h, w[, C]; bool, 8/16-bit or float) as a mask (h, w) float32 in [0, 1].

    Grey or colour: the mean of the colour channels (white = 1). With an alpha channel over colours
    that are all the same (a mask painted as transparency), the alpha."""
    a = np.asarray(pixels)
    if a.dtype == bool:
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    else:
        a = a.astype(np.float32)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[2] in (2, 3, 4):
        colour = a[..., : 1 if a.shape[2] == 2 else 3]
        alpha = a[..., -1] if a.shape[2] in (2, 4) else None
        if alpha is not None and np.ptp(colour) == 0 and np.ptp(alpha) > 0:
            a = alpha
        else:
            a = colour.mean(axis=-1)
    if a.ndim != 2 or a.size == 0:
        raise GeometryError(f"a mask image of shape {a.shape} is not a picture", "give a grey or RGB image")
    if not np.isfinite(a).all():
        raise GeometryError(
            "the mask has NaN or infinite values", "give values from 0 (keep) to 1 (regenerate)"
        )
    return np.clip(a, 0.0, 1.0)


def area_resize(a: np.ndarray, height: int, width: int, *, wrap_columns: bool = False) -> np.ndarray:
    """(h, w[, C]) resized to (height, width[, C]) float32: area averages where an axis shrinks
    (each output pixel the exact mean of the input area it covers), bilinear at pixel centres where
    it grows (columns wrapping around with `wrap_columns`, rows clamped)."""
    out = np.asarray(a, dtype=np.float64)
    out = _resize_axis(out, height, axis=0, wrap=False)
    out = _resize_axis(out, width, axis=1, wrap=wrap_columns)
    return out.astype(np.float32)


def _resize_axis(a: np.ndarray, n_out: int, axis: int, wrap: bool) -> np.ndarray:
    n_in = a.shape[axis]
    if n_out == n_in:
        return a
    a = np.moveaxis(a, axis, 0)
    if n_out < n_in:
        edges = np.arange(n_out + 1) * (n_in / n_out)
        cumulative = np.concatenate([np.zeros((1, *a.shape[1:])), np.cumsum(a, axis=0)])
        index = np.minimum(np.floor(edges).astype(np.int64), n_in - 1)
        frac = (edges - index).reshape(-1, *([1] * (a.ndim - 1)))
        at_edge = cumulative[index] + frac * a[index]  # the integral of the input up to each edge
        out = np.diff(at_edge, axis=0) / (n_in / n_out)
    else:
        x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        x0 = np.floor(x).astype(np.int64)
        f = (x - x0).reshape(-1, *([1] * (a.ndim - 1)))
        if wrap:
            i0, i1 = np.mod(x0, n_in), np.mod(x0 + 1, n_in)
        else:
            i0, i1 = np.clip(x0, 0, n_in - 1), np.clip(x0 + 1, 0, n_in - 1)
        out = a[i0] * (1.0 - f) + a[i1] * f
    return np.moveaxis(out, 0, axis)


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A mask of any size (h, w) as the panorama's (height, width) float32 in [0, 1].

    GeometryError when its aspect is not the panorama's (2:1) within 2 % or a pixel of rounding:
    stretching it would move what it marks to other directions."""
    m = mask_from_image(mask)
    h, w = m.shape
    if (h, w) == (height, width):
        return m.astype(np.float32)
    ratio = (w / h) / (width / height)
    if abs(ratio - 1.0) > ASPECT_TOLERANCE and round(w * height / width) != h:
        raise GeometryError(
            f"the mask is {w}x{h} ({w / h:.3g}:1), the panorama {width}x{height} "
            f"({width / height:.3g}:1): stretched, it would mark other directions",
            f"paint or export the mask as an equirectangular image of the panorama's shape, e.g. {width}x{height}",
        )
    return np.clip(area_resize(m, height, width, wrap_columns=True), 0.0, 1.0)


def feather_mask(mask: np.ndarray, feather_deg: float) -> np.ndarray:
    """Soften the mask's edge over `feather_deg` degrees on the sphere (across the 0°/360° wrap and
    over the poles alike): marked pixels (mask >= 0.5) keep their value; every other pixel gets
    max(mask, ramp), the ramp falling smoothly from 1 at the edge of the marked area to exactly 0
    at `feather_deg` degrees from it.

    Distances are angles on the sphere from a pixel's centre to the nearest marked pixel's centre
    with an unmarked neighbour, less half a pixel (the edge lies between the two centres). A coarse
    grid (up to 256 x 512 cells) first finds the pixels that can be that near; an edge of more than
    20000 pixels (a noise-like mask) is measured on that grid alone."""
    m = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
    if m.ndim != 2:
        raise GeometryError(f"a mask must be (H, W), not {m.shape}", "convert it with mask_from_image")
    feather = float(feather_deg)
    if not math.isfinite(feather) or feather < 0:
        raise GeometryError(f"a feather of {feather_deg!r} degrees", "give 0 or more degrees")
    marked = m >= 0.5
    if feather == 0 or not marked.any() or marked.all():
        return m.copy()
    height, width = m.shape
    rows = int(min(height, _MAX_FEATHER_CELLS, max(32, math.ceil(180.0 / (feather / 4.0)))))
    while True:
        coarse = _distance_grid(marked, rows, min(width, 2 * rows))
        if coarse is not None:
            break
        rows //= 2
    distance = area_resize(coarse, height, width, wrap_columns=True)
    edge = _edge(marked)
    if edge.sum() <= _MAX_EDGE_PIXELS:
        # the coarse distances are low by at most about two cells: every pixel that can be within
        # the feather is measured again against the mask's own edge pixels
        near = ~marked & (distance < feather + 2.0 * 180.0 / rows)
        distance = _edge_distance(near, edge, feather)
    ramp = smooth_ramp(1.0 - distance / feather)
    ramp[marked] = 0.0  # a marked pixel keeps its own (soft) value
    return np.maximum(m, ramp)


def _edge_distance(near: np.ndarray, edge: np.ndarray, limit: float) -> np.ndarray:
    """Degrees from each `near` pixel to the nearest `edge` pixel less half a pixel (inf elsewhere,
    and where none is within `limit`), tile by tile against the edge pixels that can be that near."""
    height, width = near.shape
    dirs = _pixel_directions(height, width)
    targets = dirs[edge]
    out = np.full((height, width), np.inf, dtype=np.float32)
    tile = _TILE
    for r0 in range(0, height, tile):
        for c0 in range(0, width, tile):
            block = near[r0 : r0 + tile, c0 : c0 + tile]
            if not block.any():
                continue
            queries = dirs[r0 : r0 + tile, c0 : c0 + tile][block]
            centre = queries.mean(axis=0)
            centre /= np.linalg.norm(centre)
            radius = float(np.degrees(np.arccos(np.clip((queries @ centre).min(), -1.0, 1.0))))
            reach = math.radians(min(180.0, limit + radius + 360.0 / width))
            local = targets[targets @ centre >= math.cos(reach)]
            if not len(local):
                continue
            found = np.maximum(_nearest_degrees(queries, local) - 90.0 / height, 0.0)
            view = out[r0 : r0 + tile, c0 : c0 + tile]
            view[block] = found
    return out


def _edge(cells: np.ndarray) -> np.ndarray:
    """Marked cells with an unmarked 4-neighbour (columns wrap; the pole rows have none beyond)."""
    up, down = np.roll(cells, 1, axis=0), np.roll(cells, -1, axis=0)
    up[0], down[-1] = cells[0], cells[-1]
    return cells & ~(up & down & np.roll(cells, 1, axis=1) & np.roll(cells, -1, axis=1))


def _pixel_directions(rows: int, cols: int) -> np.ndarray:
    u = (np.arange(cols) + 0.5) / cols
    v = 1.0 - (np.arange(rows) + 0.5) / rows
    return direction_from_uv(u[None, :], v[:, None])


def _nearest_degrees(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Angle in degrees from each query direction (n, 3) to its nearest target (m, 3), float32."""
    best = np.empty(queries.shape[0], dtype=np.float64)
    chunk = max(1, (1 << 24) // max(1, targets.shape[0]))
    for start in range(0, queries.shape[0], chunk):
        best[start : start + chunk] = (queries[start : start + chunk] @ targets.T).max(axis=1)
    return np.degrees(np.arccos(np.clip(best, -1.0, 1.0))).astype(np.float32)


def _distance_grid(marked: np.ndarray, rows: int, cols: int) -> np.ndarray | None:
    """Degrees from each cell of a rows x cols grid to the marked area (0 inside), or None when the
    area's edge has too many cells for this grid (the caller takes a coarser one)."""
    # a cell is marked when any pixel of it is: its distances are never too large by more than a cell
    cell = np.asarray(area_resize(marked.astype(np.float32), rows, cols, wrap_columns=True)) > 0
    edge = _edge(cell)
    if edge.sum() > _MAX_EDGE_CELLS and rows > 16:
        return None
    dirs = _pixel_directions(rows, cols)
    degrees = _nearest_degrees(dirs.reshape(-1, 3), dirs[edge]).reshape(rows, cols)
    half_cell = 90.0 / rows  # the edge lies somewhere inside its cell: half a cell nearer
    return np.where(cell, 0.0, np.maximum(degrees - half_cell, 0.0)).astype(np.float32)


def seam_band_mask(width: int, height: int, band_deg: float, feather_deg: float | None = None) -> np.ndarray:
    """(height, width) float32 band of `band_deg` degrees centred on the middle of the image (u = 0.5,
    between columns width/2 - 1 and width/2: the old 0°/360° seam of a panorama `roll_half` turned),
    all rows. Its edges are feathered INSIDE the band (over `feather_deg`, default a quarter of the
    band): 1 at its centre, exactly 0 at and beyond `band_deg` / 2 from the centre line, so nothing
    outside the band changes. Feather it no further."""
    band = float(band_deg)
    if not (0 < band <= 360) or not math.isfinite(band):
        raise GeometryError(f"a seam band of {band_deg!r} degrees", "give a width between 0 and 360 degrees")
    feather = band / 4.0 if feather_deg is None else float(feather_deg)
    if not (0 <= feather <= band / 2) or not math.isfinite(feather):
        raise GeometryError(
            f"a feather of {feather_deg!r}° does not fit a {band:g}° band", f"give 0 to {band / 2:g} degrees"
        )
    offset = np.abs(((np.arange(width) + 0.5) / width - 0.5) * 360.0)  # degrees from the centre line
    inside = band / 2.0 - offset
    column = (inside > 0).astype(np.float32) if feather == 0 else smooth_ramp(inside / feather)
    if not column.any():
        raise GeometryError(
            f"a {band:g}° band is narrower than a pixel of a {width}-pixel-wide panorama",
            f"give at least {720.0 / width:.2g} degrees",
        )
    return np.broadcast_to(column[None, :], (height, width)).copy()


def roll_half(image: np.ndarray) -> np.ndarray:
    """The panorama turned by half a turn (columns rolled by width / 2): its 0°/360° seam goes to
    the middle, where `seam_band_mask` lies. `unroll_half` turns it back, pixel for pixel."""
    width = np.asarray(image).shape[1]
    if width % 2:
        raise GeometryError(
            f"a panorama {width} px wide can't be turned by exactly half", "use an even width"
        )
    return np.roll(image, width // 2, axis=1)


def unroll_half(image: np.ndarray) -> np.ndarray:
    return np.roll(image, -(np.asarray(image).shape[1] // 2), axis=1)
