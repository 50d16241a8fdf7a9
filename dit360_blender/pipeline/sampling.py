"""DiT360 sampling: noise, packing, wrap padding, the shifted flow-matching schedule, Euler steps.

DiT360 (Insta360-Research-Team/DiT360, `src/pipeline.py`) adds one token column on each side of
the packed latent grid — the last column on the left, the first on the right — with the position
ids of the columns they copy (ids [W-1, 0, 1, …, W-1, 0]). The padding is applied once before the
loop, the pad columns then evolve as ordinary tokens, and they are cropped before decoding. The
time shift mu is computed from the padded sequence length (8320 tokens at 2048x1024 → 1.865).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from .step_cache import StepCache

LATENT_CHANNELS = 16
VAE_DOWNSCALE = 8
PATCH = 2


@dataclass(frozen=True)
class SamplerStep:
    """What `denoise` hands to `on_step` after step `index` (1-based) of `total`, in the padded token
    layout: `latents`, the state now, and `x0`, the model's estimate of the final latents
    (x0 = x_t - t * v for the velocity v the model predicted at noise level t): what a preview shows."""

    index: int
    total: int
    latents: Tensor
    x0: Tensor


StepCallback = Callable[[SamplerStep], None]
AfterStep = Callable[[int, Tensor, "Tensor | None"], "tuple[Tensor, Tensor | None]"]


class Cancelled(Exception):
    """Raised between sampling steps when the cancel check says so."""


def get_noise(seed: int, height: int, width: int) -> Tensor:
    """Initial noise (1, 16, H/8, W/8) in float32, drawn on the CPU generator.

    Drawing on the CPU makes a seed give the same panorama on CUDA, MPS and CPU (device RNGs
    differ). The DiT360 reference draws on a CUDA generator, so the same seed number gives a
    different image there; pass identical latents to compare with it.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = (1, LATENT_CHANNELS, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def pack(latents: Tensor) -> Tensor:
    """(b, c, H, W) latents → (b, H/2 * W/2, c*4) tokens of 2x2 patches."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpack(tokens: Tensor, grid_h: int, grid_w: int) -> Tensor:
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=grid_h, w=grid_w, ph=PATCH, pw=PATCH)


def image_ids(grid_h: int, grid_w: int) -> Tensor:
    """Position ids (grid_h * grid_w, 3) = (0, row, col), float32 as the reference uses."""
    ids = torch.zeros(grid_h, grid_w, 3)
    ids[..., 1] = torch.arange(grid_h)[:, None]
    ids[..., 2] = torch.arange(grid_w)[None, :]
    return rearrange(ids, "h w c -> (h w) c")


def _wrap_columns(x: Tensor, grid_h: int, grid_w: int, pad: int) -> Tensor:
    """Pad the token grid (…, h*w, d) with `pad` wrapped columns on each side."""
    grid = rearrange(x, "... (h w) d -> ... h w d", h=grid_h, w=grid_w)
    grid = torch.cat([grid[..., grid_w - pad :, :], grid, grid[..., :pad, :]], dim=-2)
    return rearrange(grid, "... h w d -> ... (h w) d")


def wrap_pad(tokens: Tensor, grid_h: int, grid_w: int, pad: int = 1) -> Tensor:
    """(b, h*w, d) → (b, h*(w+2*pad), d): left = last columns, right = first columns."""
    return _wrap_columns(tokens, grid_h, grid_w, pad)


def wrap_pad_ids(ids: Tensor, grid_h: int, grid_w: int, pad: int = 1) -> Tensor:
    """The pad columns take the ids of the columns they copy: [W-1, 0, …, W-1, 0]."""
    return _wrap_columns(ids, grid_h, grid_w, pad)


def crop_pad(tokens: Tensor, grid_h: int, grid_w: int, pad: int = 1) -> Tensor:
    """Drop the pad columns again: (b, h*(w+2*pad), d) → (b, h*w, d)."""
    grid = rearrange(tokens, "b (h w) d -> b h w d", h=grid_h, w=grid_w + 2 * pad)
    return rearrange(grid[:, :, pad : pad + grid_w], "b h w d -> b (h w) d")


def time_shift_mu(image_seq_len: int, base_len: int = 256, max_len: int = 4096) -> float:
    """FLUX's resolution-dependent shift: a line through (256, 0.5) and (4096, 1.15), unclamped."""
    base_shift, max_shift = 0.5, 1.15
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def get_sigmas(num_steps: int, image_seq_len: int) -> Tensor:
    """num_steps + 1 noise levels from 1 to 0: linspace(1, 1/n, n) time-shifted, then a final 0.

    Computed in float32 like the reference scheduler.
    """
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    mu = time_shift_mu(image_seq_len)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return torch.cat([torch.from_numpy(np.asarray(shifted, dtype=np.float32)), torch.zeros(1)])


def denoise(
    model: torch.nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    sigmas: Tensor,
    guidance: float,
    dtype: torch.dtype = torch.float32,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    cache: StepCache | None = None,
    after_step: AfterStep | None = None,
) -> Tensor:
    """Euler steps of the flow ODE; the model runs in `dtype`, the state stays float32.

    (The diffusers reference keeps the state in the model dtype between steps; in fp32 the two
    are identical, in half precision ours accumulates less rounding.)

    `should_cancel()` is checked before every step (raising `Cancelled`); `on_step` gets a
    `SamplerStep` after every step. With `cache` (pipeline/step_cache.py) the model may reuse its
    last full step's work; the first and the last step are always computed in full.
    `after_step(i, x, x0) -> (x, x0)` may replace the state after step i (0-based) and the preview's
    estimate, before `on_step` sees them: an edit puts the source back outside its mask there.
    """
    x = img.float()
    guidance_vec = torch.full((x.shape[0],), guidance, device=x.device, dtype=torch.float32)
    total = len(sigmas) - 1
    for i in range(total):
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        t_curr, t_next = sigmas[i].item(), sigmas[i + 1].item()
        t_vec = torch.full((x.shape[0],), t_curr, device=x.device, dtype=torch.float32)
        extra = {}
        if cache is not None:
            cache.force_full = i in (0, total - 1)
            extra["cache"] = cache
        with torch.inference_mode():
            pred = model(
                img=x.to(dtype),
                img_ids=img_ids,
                txt=txt.to(dtype),
                txt_ids=txt_ids,
                timesteps=t_vec,
                y=vec.to(dtype),
                guidance=guidance_vec,
                **extra,
            )
        velocity = pred.float()
        if on_step is not None:
            x0 = x - t_curr * velocity
        x = x + (t_next - t_curr) * velocity
        if after_step is not None:
            x, x0 = after_step(i, x, x0 if on_step is not None else None)
        if on_step is not None:
            on_step(SamplerStep(i + 1, total, x, x0))
    return x
