"""The optional detail pass over an upscaled panorama ("Refine"): FLUX.1-dev + the DiT360 LoRA
img2img at the upscaled size, in overlapping tiles whose latents are averaged every step
(MultiDiffusion, Bar-Tal et al. 2023), circular in the horizontal direction.

* The picture is VAE-encoded tile by tile (pixel tiles 8x the latent tiles), the tiles' latents
  averaged where they overlap; sampling starts from it noised to the level `strength` selects
  (img2img.strength_sigmas / noise_to: diffusers' img2img semantics) with noise drawn at full size
  from the seed on the CPU generator (deterministic on any device).
* Every step, the transformer predicts each tile's velocity (the tile's own position ids, 0..tile:
  what FLUX sees at 1024 px); the velocities are averaged over the tiles covering each latent pixel
  and one Euler step is taken on the whole latent image. Columns are taken modulo the width, so the
  tiles wrap around the 0°/360° seam like any other place: the wrap column is refined like an
  interior one (rolling the input by the tile stride rolls the output).
* The result is decoded tile by tile, the tiles blended with weights ramping over the overlap.

One tile covering the whole picture is exactly plain img2img (encode, noise, Euler steps, decode).
Progress and cancel are per tile-step: `on_progress("refine", done, total)` after each tile of each
step, `should_cancel()` before each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .dit360 import T5_MAX_LENGTH, DiT360Pipeline
from .errors import BadParametersError
from .image_io import read_png_metadata
from .img2img import encode_image, noise_to, strength_sigmas
from .sampling import PATCH, VAE_DOWNSCALE, Cancelled, get_noise, image_ids, pack, unpack

__all__ = ["DEFAULT_OVERLAP", "DEFAULT_TILE", "Refiner", "refine", "tile_starts"]

DEFAULT_TILE = 1024  # pixels: FLUX's own resolution
DEFAULT_OVERLAP = 128  # pixels shared by neighbouring tiles
DEFAULT_PROMPT = "This is a panorama image."
ProgressFn = Callable[[str, int, int], None]


def tile_starts(size: int, tile: int, overlap: int, circular: bool) -> list[int]:
    """Tile origins (in latent pixels, even: whole 2x2 patches) covering [0, size): circular ones
    wrap (n tiles spaced size/n apart, n the fewest with at least `overlap` shared); others keep
    inside (the last one ends at the edge)."""
    if tile >= size:
        return [0]
    step = max(tile - overlap, PATCH)
    if circular:
        n = -(-size // step)
        return [(k * size // n) // PATCH * PATCH for k in range(n)]
    n = -(-(size - tile) // step) + 1
    return [(k * (size - tile) // (n - 1)) // PATCH * PATCH for k in range(n)]


@dataclass(frozen=True)
class _Layout:
    """The tiles of a latent image (h, w): origins and the tile's size, in latent pixels."""

    rows: list[int]
    cols: list[int]
    th: int
    tw: int
    width: int

    @classmethod
    def of(cls, h: int, w: int, tile: int, overlap: int) -> _Layout:
        th, tw = min(tile, h), min(tile, w)
        return cls(tile_starts(h, th, overlap, False), tile_starts(w, tw, overlap, True), th, tw, w)

    def tiles(self) -> list[tuple[int, Tensor]]:
        """(first row, column indices (modulo the width)) of every tile."""
        return [(y, (x + torch.arange(self.tw)) % self.width) for y in self.rows for x in self.cols]


def _ramp(size: int, overlap: int, full: bool) -> Tensor:
    """1-D blend weights of a tile side: rising over `overlap` from 1/(overlap+1), 1 inside (all 1
    where the tile spans the whole side)."""
    w = torch.ones(size)
    if full or overlap <= 0:
        return w
    r = torch.arange(1, min(overlap, size // 2) + 1, dtype=torch.float32) / (overlap + 1)
    w[: len(r)] = r
    w[size - len(r) :] = r.flip(0)
    return w


def refine(
    pipe: DiT360Pipeline,
    image: Tensor,
    *,
    prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    strength: float,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    noise: Tensor | None = None,
    on_progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Tensor:
    """`image` (3, H, W) in [0, 1] refined at `strength` (0 < strength <= 1) in tiles of `tile`
    pixels overlapping by `overlap`; returns (3, H, W) float32 in [0, 1] on the CPU. `noise` (1, 16,
    H/8, W/8) overrides the seed's. Raises Cancelled between tile-steps."""
    _, height, width = image.shape
    if height % (VAE_DOWNSCALE * PATCH) or width % (VAE_DOWNSCALE * PATCH):
        raise BadParametersError(
            f"Refine needs a size that is a multiple of 16 pixels, got {width}x{height}.",
            "Upscale to 4K, 8K or 16K (all multiples of 16).",
        )
    lat = VAE_DOWNSCALE
    layout = _Layout.of(height // lat, width // lat, tile // lat, overlap // lat)
    tiles = layout.tiles()
    sigmas = strength_sigmas(steps, strength, (layout.th // PATCH) * (layout.tw // PATCH))
    total = len(tiles) * (len(sigmas) - 1)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress("refine", done, total)

    def check() -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled()

    txt, vec = pipe.text_encoders.encode(prompt, max_length=T5_MAX_LENGTH)
    txt, vec = txt.to(pipe.device), vec.to(pipe.device)
    clean = _encode_tiled(pipe, image, layout, tiles, check)
    noise = get_noise(seed, height, width) if noise is None else noise.float().cpu()
    x = noise_to(clean, noise, sigmas[0].item())
    ids = image_ids(layout.th // PATCH, layout.tw // PATCH)[None].to(pipe.device)
    txt_ids = torch.zeros(1, txt.shape[1], 3, device=pipe.device)
    guidance_vec = torch.full((1,), guidance, device=pipe.device, dtype=torch.float32)
    count = _coverage(layout, tiles)
    for i in range(len(sigmas) - 1):
        t_curr, t_next = sigmas[i].item(), sigmas[i + 1].item()
        t_vec = torch.full((1,), t_curr, device=pipe.device, dtype=torch.float32)
        velocity = torch.zeros_like(x)
        for y, cols in tiles:
            check()
            crop = x[:, :, y : y + layout.th][..., cols]
            with torch.inference_mode():
                pred = pipe.transformer(
                    img=pack(crop).to(pipe.device, pipe.dtype), img_ids=ids, txt=txt.to(pipe.dtype),
                    txt_ids=txt_ids, timesteps=t_vec, y=vec.to(pipe.dtype), guidance=guidance_vec,
                )  # fmt: skip
            v = unpack(pred.float().cpu(), layout.th // PATCH, layout.tw // PATCH)
            velocity[:, :, y : y + layout.th].index_add_(3, cols, v)
            tick()
        x = x + (t_next - t_curr) * (velocity / count)
    return _decode_tiled(pipe, x, layout, tiles, overlap // lat, check)


def _coverage(layout: _Layout, tiles: list[tuple[int, Tensor]]) -> Tensor:
    """(1, 1, h, w): how many tiles cover each latent pixel."""
    count = torch.zeros((1, 1, max(layout.rows) + layout.th, layout.width))
    for y, cols in tiles:
        count[:, :, y : y + layout.th].index_add_(3, cols, torch.ones((1, 1, layout.th, layout.tw)))
    return count


def _encode_tiled(
    pipe: DiT360Pipeline, image: Tensor, layout: _Layout, tiles: list[tuple[int, Tensor]], check
) -> Tensor:
    """The latents (1, 16, H/8, W/8) of `image`: each pixel tile encoded, overlaps averaged."""
    lat = VAE_DOWNSCALE
    out, count = None, _coverage(layout, tiles)
    for y, cols in tiles:
        check()
        pixel_cols = (cols[:, None] * lat + torch.arange(lat)).reshape(-1)
        crop = image[:, y * lat : (y + layout.th) * lat][..., pixel_cols]
        z = encode_image(pipe.vae, crop, pipe.device, pipe.dtype).cpu()
        if out is None:
            out = torch.zeros((1, z.shape[1], count.shape[2], count.shape[3]))
        out[:, :, y : y + layout.th].index_add_(3, cols, z)
    return out / count


def _decode_tiled(
    pipe: DiT360Pipeline, x: Tensor, layout: _Layout, tiles: list[tuple[int, Tensor]], overlap: int, check
) -> Tensor:
    """The image (3, H, W) of latents `x`: each tile decoded, blended with ramps over the overlap
    (the VAE wraps around only when one tile spans the whole width)."""
    lat = VAE_DOWNSCALE
    _, _, h, w = x.shape
    full_w, full_h = layout.tw == w, layout.th == h
    weight = _ramp(layout.th * lat, overlap * lat, full_h)[:, None] * _ramp(
        layout.tw * lat, overlap * lat, full_w
    )
    out, total = torch.zeros((3, h * lat, w * lat)), torch.zeros((1, h * lat, w * lat))
    for y, cols in tiles:
        check()
        z = x[:, :, y : y + layout.th][..., cols].to(pipe.device, pipe.dtype)
        with torch.inference_mode():
            decoded = pipe.vae.decode(z, wrap=full_w and pipe.vae_wrap)
        tile_rgb = (decoded[0].float() / 2 + 0.5).clamp(0, 1).cpu()
        pixel_cols = (cols[:, None] * lat + torch.arange(lat)).reshape(-1)
        rows = slice(y * lat, (y + layout.th) * lat)
        out[:, rows].index_add_(2, pixel_cols, tile_rgb * weight)
        total[:, rows].index_add_(2, pixel_cols, weight[None])
    return (out / total).clamp_(0.0, 1.0)


class Refiner:
    """make_upscale's refiner: the pipeline and the pass's settings, called on the upscaled image.
    The prompt is the given one, else the source PNG's own (its metadata), else DiT360's prefix."""

    def __init__(
        self,
        pipe: DiT360Pipeline,
        *,
        prompt: str | None,
        seed: int,
        steps: int,
        guidance: float,
        strength: float,
        source: str | None = None,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
    ) -> None:
        if prompt is None and source is not None and str(source).lower().endswith(".png"):
            prompt = read_png_metadata(source).get("prompt")
        self.pipe = pipe
        self.prompt = prompt if isinstance(prompt, str) and prompt.strip() else DEFAULT_PROMPT
        self.seed, self.steps, self.guidance, self.strength = seed, steps, guidance, strength
        self.tile, self.overlap = tile, overlap

    @classmethod
    def for_job(cls, pipe: DiT360Pipeline, p: Mapping, prompt: str | None = None) -> Refiner:
        """The detail pass an upscale job's checked parameters ask for (seed, steps, guidance,
        refine_strength; the prompt given, else the `source` PNG's own)."""
        return cls(
            pipe, prompt=prompt, seed=int(p["seed"]), steps=int(p["steps"]), guidance=float(p["guidance"]),
            strength=float(p["refine_strength"]), source=str(p["source"]),
        )  # fmt: skip

    def __call__(
        self,
        image: Tensor,
        on_progress: ProgressFn | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Tensor:
        return refine(
            self.pipe, image, prompt=self.prompt, seed=self.seed, steps=self.steps, guidance=self.guidance,
            strength=self.strength, tile=self.tile, overlap=self.overlap, on_progress=on_progress,
            should_cancel=should_cancel,
        )  # fmt: skip
