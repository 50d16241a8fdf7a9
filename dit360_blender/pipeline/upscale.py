"""Learned super-resolution of an equirectangular panorama, seamless across the 0°/360° wrap.

The model is any torch module that maps (N, 3, h, w) images in [0, 1] to (N, 3, s·h, s·w) — what
ESRGAN-class networks do — with `margin`, the input pixels on each side that can still change an
output pixel (its receptive-field radius). Each pass:

* extends the panorama by `margin` pixels on every side as the sphere continues it: horizontally with
  the opposite edge (the wrap), vertically across the pole (the rows past the top edge are the top
  rows mirrored, half a turn around: what lies beyond the pole), so the model never sees an edge
  that the sphere does not have;
* runs the model on square tiles of that extended image, each with the full margin around its core,
  and keeps the cores: every output pixel then sees exactly what it would see in one untiled pass,
  so tiling changes nothing (up to float rounding) and the wrap column is upscaled like any other;
* runs in the given dtype on the given device tile by tile (fp16/bf16 on a GPU), keeping the
  panorama itself in float32 on the CPU, so device memory is bounded by the tile size.

Passes are chained (a ×4 model twice for ×16) until the panorama is at least as wide as asked, then
box-filtered down by a whole factor (exact, and wrap-neutral); a width that no whole factor reaches
is refused, with the widths that can be had.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import BadParametersError

__all__ = ["SuperResolution", "extend_sphere", "plan_passes", "upscale", "upscale_pass"]

DEFAULT_TILE = 256  # input pixels per tile side, before the margin


@dataclass(frozen=True)
class SuperResolution:
    """A super-resolution model: `module` (N, 3, h, w) -> (N, 3, scale·h, scale·w), values in
    [0, 1]; `margin` input pixels on each side that can change an output pixel."""

    module: torch.nn.Module
    scale: int
    margin: int
    # Input sides must be a multiple of this (window-attention models: their window; pixel-unshuffle
    # models: the unshuffle factor). Tiles, margins and tile origins are kept on this grid, so every
    # tile sees the windows an untiled run would.
    multiple_of: int = 1


def extend_sphere(image: torch.Tensor, margin: int) -> torch.Tensor:
    """(C, H, W) -> (C, H + 2·margin, W + 2·margin): the wrap on the left and right, the other side of
    each pole above and below (row -1-r is row r seen half a turn around, so its column c is column
    c + W/2 of row r). Needs an even W and margin <= H."""
    _, height, width = image.shape
    if width % 2 or margin > height:
        raise ValueError(f"cannot extend a {width}x{height} panorama by {margin} pixels")
    columns = torch.arange(-margin, width + margin)
    wrapped = columns % width
    half_turn = (columns + width // 2) % width
    top = image[:, :margin].flip(-2)[..., half_turn]
    bottom = image[:, height - margin :].flip(-2)[..., half_turn]
    return torch.cat([top, image[..., wrapped], bottom], dim=-2)


def plan_passes(width: int, target_width: int, scale: int) -> tuple[int, int]:
    """(passes, box factor) that take `width` to exactly `target_width` with a ×`scale` model:
    the fewest passes reaching at least the target, then a whole box-filter factor down. Raises
    BadParametersError when no whole factor gets there."""
    if scale < 1 or target_width < width:
        raise BadParametersError(
            f"A ×{scale} model cannot take a {width} px wide panorama to {target_width} px.",
            "Ask for a width at least the panorama's own.",
        )
    passes, reached = 0, width
    while reached < target_width:
        passes, reached = passes + 1, reached * scale
    if reached % target_width:
        reachable = sorted({reached // k for k in range(1, reached // width + 1) if reached % k == 0})
        shown = ", ".join(str(w) for w in reachable[-4:] if w >= width)
        raise BadParametersError(
            f"{target_width} px is not reachable from {width} px with a ×{scale} model "
            f"({passes} pass(es) give {reached} px, which no whole factor takes to {target_width}).",
            f"Ask for one of {shown} px, or use a model whose scale divides the step.",
        )
    return passes, reached // target_width


def upscale(
    image: torch.Tensor,
    model: SuperResolution,
    target_width: int,
    *,
    tile: int = DEFAULT_TILE,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """(3, H, W) float in [0, 1] -> (3, target_width·H/W, target_width) float32 on the CPU, through
    as many passes of `model` as needed and a whole-factor box filter (see `plan_passes`)."""
    passes, factor = plan_passes(image.shape[-1], target_width, model.scale)
    for _ in range(passes):
        image = upscale_pass(image, model, tile=tile, device=device, dtype=dtype, on_tile=on_tile)
    if factor > 1:
        image = F.avg_pool2d(image[None], factor)[0]
    return image


def upscale_pass(
    image: torch.Tensor,
    model: SuperResolution,
    *,
    tile: int = DEFAULT_TILE,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """One ×scale pass over tiles of at most `tile`² input pixels (plus the margin); `on_tile(done,
    total)` after each tile. The module is moved to `device` and `dtype`. Returns (3, scale·H,
    scale·W) float32 on the CPU, clamped to [0, 1] (what the next pass and an 8-bit file take)."""
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    _, height, width = image.shape
    s, q = model.scale, max(1, model.multiple_of)
    m = _round_up(model.margin, q)
    th, tw = _round_up(min(tile, height), q), _round_up(min(tile, width), q)
    rows, cols = _starts(height, th, q), _starts(width, tw, q)
    # the last tiles may reach up to q - 1 pixels past the edge (origins stay on the grid): extend
    # the sphere that much further, and offset every window by it
    extra = max(rows[-1] + th - height, cols[-1] + tw - width, 0)
    extended = extend_sphere(image.to(torch.float32).cpu(), m + extra)
    out = torch.empty((3, height * s, width * s), dtype=torch.float32)
    module = model.module.to(device=device, dtype=dtype).eval()
    with torch.inference_mode():
        for i, (y, x) in enumerate((y, x) for y in rows for x in cols):
            window = extended[:, extra + y : extra + y + th + 2 * m, extra + x : extra + x + tw + 2 * m]
            result = module(window[None].to(device=device, dtype=dtype))[0]
            h, w = min(th, height - y), min(tw, width - x)
            core = result[:, m * s : (m + h) * s, m * s : (m + w) * s]
            out[:, y * s : (y + h) * s, x * s : (x + w) * s] = core.to(device="cpu", dtype=torch.float32)
            if on_tile is not None:
                on_tile(i + 1, len(rows) * len(cols))
    return out.clamp_(0.0, 1.0)


def _starts(size: int, tile: int, grid: int = 1) -> list[int]:
    """Tile origins covering [0, size): every tile is the same size (the last one overlaps the one
    before it instead of being smaller), so the model always sees one window shape; origins are
    multiples of `grid` (the last one rounded up, so it may reach past `size` by less than `grid`)."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile), _round_up(size - tile, grid)]


def _round_up(value: int, grid: int) -> int:
    return -(-value // grid) * grid
