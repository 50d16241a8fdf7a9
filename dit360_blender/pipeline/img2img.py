"""Image-to-image pieces shared by every job that starts from an existing picture (an edit, a refine
pass): the VAE encode of the picture, the part of the noise schedule a `strength` selects, and the
picture noised to a level of that schedule.

The semantics are diffusers' Flux img2img/inpaint pipelines (`get_timesteps`, the flow-matching
scheduler's `scale_noise`): of the `steps` levels of the full schedule the last ``steps * strength``
are run, so strength 1 starts from pure noise and a small strength only refines; the picture at
level sigma is ``sigma * noise + (1 - sigma) * latents`` (the straight line the flow moves along).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampling import get_sigmas

__all__ = ["encode_image", "noise_to", "strength_sigmas", "strength_start"]


def strength_start(steps: int, strength: float) -> int:
    """The index of the first level run (diffusers' ``t_start``): of `steps` levels the last
    ``min(steps * strength, steps)`` are run (rounded down at the start, as diffusers does)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    run = min(steps * strength, steps)
    return int(max(steps - run, 0))


def strength_sigmas(steps: int, strength: float, image_seq_len: int) -> Tensor:
    """The noise levels an img2img run of `steps` at `strength` walks: the full schedule
    (`sampling.get_sigmas`, time-shifted for `image_seq_len` tokens) from `strength_start` on,
    ending at 0. Its length minus one is the number of steps that run (at least one)."""
    return get_sigmas(steps, image_seq_len)[strength_start(steps, strength) :]


def noise_to(clean: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """`clean` latents noised to level `sigma`: ``sigma * noise + (1 - sigma) * clean``."""
    return sigma * noise + (1.0 - sigma) * clean


def encode_image(vae: torch.nn.Module, image: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """An RGB image (3, H, W) in [0, 1] as the transformer's latents (1, 16, H/8, W/8), float32 on
    `device`: the VAE posterior's mean, scaled and shifted (deterministic; diffusers samples the
    posterior, whose spread is tiny for the FLUX VAE)."""
    x = (image.to(device=device, dtype=torch.float32) * 2.0 - 1.0)[None]
    with torch.inference_mode():
        return vae.encode(x.to(dtype)).float()
