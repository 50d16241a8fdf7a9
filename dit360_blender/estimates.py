"""What a Resolution / Refine choice will cost, shown before a job starts (standard library only: the
Blender panel and the CLI use it; nothing here is measured at run time).

Assumptions (each a constant below; the GPU numbers of docs/benchmarks.md replace them as they come):

* **Time** is given relative to the 2K generation it follows, so it holds on any device: the panel
  scales by the last 2K generation's own time (else `DEFAULT_GENERATION_S`, the H200 figure of the
  README: fp8 + compile, 28 steps). Per step a FLUX.1-dev pass costs about its token count (the
  linear layers dominate at these sizes): a 2048x1024 step is 8192 image tokens + 512 text tokens.
* **Upscale**: an ESRGAN-class x4 network (RRDBNet, 23 blocks: Real-ESRGAN x4plus) costs
  `SR_FLOP_PER_INPUT_PIXEL` (about 70 MFLOP; 2 x its 16.7 M weights applied at each input pixel, plus
  the upsampling convolutions) and runs at the same efficiency as the generation's transformer
  (about `GENERATION_FLOP` = 28 steps x 2 x 12 G weights x 8704 tokens); x4 passes are chained (16K
  = x4 twice, then a x2 box-down), so 16K costs the 8K pass plus one on the 8K image.
* **Refine**: FLUX.1-dev img2img in `REFINE_TILE`-pixel tiles overlapping by `REFINE_OVERLAP`,
  round the wrap (the columns' count is exact, the rows' the ceiling), `strength x steps` denoising
  steps per tile (the generation's step count).
* **Memory** (RAM of the worker beyond the models): the upscale's own share,
  `SR_RAM_BYTES_PER_PIXEL` (30 bytes per output pixel: float32 RGB x 2.5, the upscale engine's
  estimate), then the half-float EXR being written (6 bytes per pixel) and the fixed analysis share
  measured by tests/test_panorama_large.py (384 MiB). GPU memory: the upscale tiles
  are sized to the card (about 2 GB at most, pipeline/sr_models.tile_for_budget); Refine needs the
  generation's own model memory (the memory mode), plus a tile's activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .params import SIZE_WIDTHS

__all__ = ["Estimate", "estimate", "ASSUMPTIONS"]

DEFAULT_GENERATION_S = 7.3  # README / docs/benchmarks.md: 28 steps at 2048x1024, fp8 + compile, H200
STEPS = 28
TEXT_TOKENS = 512
FLUX_WEIGHTS = 12e9
SR_FLOP_PER_INPUT_PIXEL = 70e6
SR_SCALE = 4
REFINE_TILE = 1024
REFINE_OVERLAP = 128
SR_RAM_BYTES_PER_PIXEL = 30
ANALYSIS_FIXED_BYTES = 384 * 2**20
SR_VRAM_BYTES = 2 * 2**30

ASSUMPTIONS = (
    "Estimates: time scaled from your last 2K generation (or 7.3 s, an H200); "
    "x4 ESRGAN-class upscale (~70 MFLOP per input pixel); Refine in 1024 px tiles (128 px overlap), "
    "strength x 28 steps each; RAM beyond the models"
)


def _tokens(width: int, height: int) -> int:
    return (width // 16) * (height // 16) + TEXT_TOKENS


GENERATION_FLOP = STEPS * 2 * FLUX_WEIGHTS * _tokens(2048, 1024)


@dataclass(frozen=True)
class Estimate:
    width: int
    height: int
    upscale_s: float
    refine_s: float
    ram_bytes: int
    vram_note: str
    tiles: int  # Refine tiles (0 without Refine)

    @property
    def total_s(self) -> float:
        return self.upscale_s + self.refine_s

    def text(self) -> str:
        """One line for the panel: size, time and memory."""
        if self.total_s == 0:
            return f"{self.width}×{self.height}: no extra time"
        return (
            f"{self.width}×{self.height}: +{_duration(self.total_s)}, ~{self.ram_bytes / 2**30:.1f} GB RAM"
            + (f", {self.tiles} refine tiles" if self.tiles else "")
        )


def estimate(
    size: str,
    refine: bool = False,
    strength: float = 0.3,
    *,
    base_width: int = 2048,
    generation_s: float | None = None,
) -> Estimate:
    """What upscaling a `base_width` x base_width/2 panorama to `size` (a `params` size choice) costs,
    with the Refine pass at `strength` when `refine`; `generation_s`: how long the 2K generation took
    here (None: DEFAULT_GENERATION_S). See the module docstring for the assumptions."""
    scale_s = (generation_s if generation_s and generation_s > 0 else DEFAULT_GENERATION_S) / GENERATION_FLOP
    if size != "native" and size not in SIZE_WIDTHS:
        raise ValueError(f"unknown size {size!r}: use native or one of {', '.join(SIZE_WIDTHS)}")
    if size == "native" or SIZE_WIDTHS[size] <= base_width:
        return Estimate(base_width, base_width // 2, 0.0, 0.0, 0, "", 0)
    width = SIZE_WIDTHS[size]
    height = width // 2
    flop, current = 0.0, base_width
    while current < width:  # chained x4 passes (a final box-down is free)
        flop += SR_FLOP_PER_INPUT_PIXEL * current * (current // 2)
        current *= SR_SCALE
    upscale_s = flop * scale_s
    refine_s, tiles = 0.0, 0
    if refine:
        stride = REFINE_TILE - REFINE_OVERLAP
        tiles = math.ceil(width / stride) * max(1, math.ceil((height - REFINE_OVERLAP) / stride))
        steps = max(1, round(strength * STEPS))
        refine_s = tiles * steps * 2 * FLUX_WEIGHTS * _tokens(REFINE_TILE, REFINE_TILE) * scale_s
    out_pixels = width * height
    ram = SR_RAM_BYTES_PER_PIXEL * out_pixels + 6 * out_pixels + ANALYSIS_FIXED_BYTES
    vram = "upscale ≤ 2 GB VRAM" + (" + the model (memory mode)" if refine else "")
    return Estimate(width, height, upscale_s, refine_s, int(ram), vram, tiles)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "<1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"
