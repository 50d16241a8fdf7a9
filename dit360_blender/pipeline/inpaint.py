"""Edit a panorama inside a mask: FLUX.1-dev + the DiT360 LoRA with masked latent blending.

The semantics are diffusers' `FluxInpaintPipeline` with DiT360's wrap padding:

* the source is VAE-encoded (`img2img.encode_image`); sampling starts from it noised to the level
  `strength` selects (`img2img.strength_sigmas`; strength 1 = pure noise);
* after every Euler step the source noised to the NEXT level is put back where the mask keeps it
  (after the last step: the clean source latents), so outside the mask the state stays on the
  source's own path and the model only invents inside it, in context;
* the latents, their position ids and the mask all get DiT360's wrap columns (`sampling.wrap_pad`),
  so a mask across the 0°/360° seam acts on both sides alike;
* the decoded image is composited with the (feathered) pixel mask: pixels where the mask is 0 are
  exactly the source's, not a VAE round trip of it.

The latent mask is the pixel mask binarised at 0.5 (as diffusers' mask processor does) and reduced
to the latent grid by a max over each 8x8 block (diffusers takes the block's top-left pixel, which
can miss a thin stroke; a block with any marked pixel is regenerated here, and the pixel composite
keeps everything outside the mask anyway). A mask that marks nothing returns the source untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..params import ParamError, check_values
from .dit360 import T5_MAX_LENGTH, TOKEN_SIZE, DiT360Pipeline, Generation, _sync
from .errors import BadParametersError
from .img2img import encode_image, noise_to, strength_sigmas
from .sampling import (
    LATENT_CHANNELS,
    VAE_DOWNSCALE,
    StepCallback,
    crop_pad,
    denoise,
    get_noise,
    image_ids,
    pack,
    unpack,
    wrap_pad,
    wrap_pad_ids,
)
from .step_cache import StepCache

__all__ = ["EditRequest", "inpaint", "latent_mask"]


@dataclass
class EditRequest:
    """One edit's sampling settings (the size is the source's). Defaults are DiT360's."""

    prompt: str
    seed: int = 0
    steps: int = 28
    guidance: float = 2.8
    strength: float = 1.0
    step_cache: float = 0.0

    def __post_init__(self) -> None:
        try:
            check_values(asdict(self))  # the parameter table's limits
        except ParamError as exc:
            raise BadParametersError(exc.message, exc.hint) from None


def latent_mask(mask: Tensor) -> Tensor:
    """A pixel mask (H, W) in [0, 1] as the latent grid's (1, 1, H/8, W/8) 0/1 mask: binarised at
    0.5, then 1 where any pixel of the 8x8 block is marked."""
    hard = (mask.float() >= 0.5).float()[None, None]
    return F.max_pool2d(hard, VAE_DOWNSCALE)


def check_inputs(source: Tensor, mask: Tensor) -> None:
    """Refuse a source or mask the loop can't use (the job layer reads files and says more)."""
    if source.ndim != 3 or source.shape[0] != 3:
        raise BadParametersError(f"The source must be an RGB image (3, H, W), got {tuple(source.shape)}.", "")
    height, width = source.shape[1:]
    if width != 2 * height or height % TOKEN_SIZE:
        raise BadParametersError(
            f"The source is {width}x{height}; an edit needs a 2:1 panorama whose height is a multiple "
            f"of {TOKEN_SIZE}.",
            f"Resize it to e.g. {2 * max(TOKEN_SIZE, height // TOKEN_SIZE * TOKEN_SIZE)}x"
            f"{max(TOKEN_SIZE, height // TOKEN_SIZE * TOKEN_SIZE)} (2048x1024 is DiT360's size).",
        )
    if tuple(mask.shape) != (height, width):
        raise BadParametersError(
            f"The mask is {tuple(mask.shape)}, the source {height}x{width}.", "Resize the mask to the source."
        )


def inpaint(
    pipe: DiT360Pipeline,
    request: EditRequest,
    source: Tensor,
    mask: Tensor,
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    noise: Tensor | None = None,
    composite: bool = True,
) -> Generation:
    """Regenerate `source` (3, H, W) in [0, 1] where `mask` (H, W) in [0, 1] says (1 = regenerate).

    `noise` overrides the seeded noise (1, 16, H/8, W/8); `composite=False` returns the decoded
    image before the pixel composite (for comparisons with references). Raises `Cancelled` between
    steps when `should_cancel()` says so."""
    stage = on_stage or (lambda name: None)
    check_inputs(source, mask)
    source, mask = source.float().cpu(), mask.float().cpu().clamp(0, 1)
    height, width = source.shape[1:]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    metadata = {
        **asdict(request),
        "width": width,
        "height": height,
        **pipe.model_info,
        "sampler": "euler flow-matching, DiT360 wrap padding (1 column per side), masked latent blending",
        "noise": "torch CPU generator, float32",
    }
    if not bool((mask > 0).any()):  # nothing to regenerate: the source, bit for bit
        metadata.update(steps_run=0, transformer_evaluations=0)
        return Generation(image=source.clone(), request=request, metadata=metadata, timings={"total_s": 0.0})

    stage("encoding")
    txt, vec = pipe.text_encoders.encode(request.prompt, max_length=T5_MAX_LENGTH)
    txt, vec = txt.to(pipe.device), vec.to(pipe.device)
    clean = encode_image(pipe.vae, source, pipe.device, pipe.dtype)
    timings["encode_s"] = time.perf_counter() - start

    stage("sampling")
    t0 = time.perf_counter()
    grid_h, grid_w = height // TOKEN_SIZE, width // TOKEN_SIZE

    def tokens(latents: Tensor) -> Tensor:  # (1, c, h, w) → padded tokens on the device
        return wrap_pad(pack(latents.to(pipe.device, torch.float32)), grid_h, grid_w)

    noise = get_noise(request.seed, height, width) if noise is None else noise.float().cpu()
    noise_t, clean_t = tokens(noise), tokens(clean)
    keep_t = 1.0 - tokens(latent_mask(mask).repeat(1, LATENT_CHANNELS, 1, 1))  # 1 = the source's
    img_ids = wrap_pad_ids(image_ids(grid_h, grid_w), grid_h, grid_w)[None].to(pipe.device)
    txt_ids = torch.zeros(1, txt.shape[1], 3, device=pipe.device)
    sigmas = strength_sigmas(request.steps, request.strength, noise_t.shape[1])

    def put_back_source(i: int, x: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor | None]:
        proper = noise_to(clean_t, noise_t, sigmas[i + 1].item()) if i + 2 < len(sigmas) else clean_t
        x = keep_t * proper + (1.0 - keep_t) * x
        if x0 is not None:  # the preview shows the source outside the mask too
            x0 = keep_t * clean_t + (1.0 - keep_t) * x0
        return x, x0

    cache = StepCache(request.step_cache) if request.step_cache > 0 else None
    x = denoise(
        pipe.transformer, noise_to(clean_t, noise_t, sigmas[0].item()), img_ids, txt, txt_ids, vec, sigmas,
        request.guidance, dtype=pipe.dtype, on_step=on_step, should_cancel=should_cancel, cache=cache,
        after_step=put_back_source,
    )  # fmt: skip
    _sync(pipe.device)
    timings["sample_s"] = time.perf_counter() - t0

    stage("decoding")
    t0 = time.perf_counter()
    decoded = pipe.decode(unpack(crop_pad(x, grid_h, grid_w), grid_h, grid_w))
    timings["decode_s"] = time.perf_counter() - t0
    image = source * (1.0 - mask) + decoded * mask if composite else decoded
    timings["total_s"] = time.perf_counter() - start
    steps_run = len(sigmas) - 1
    metadata.update(
        steps_run=steps_run,
        transformer_evaluations=cache.full_evaluations if cache is not None else steps_run,
    )
    return Generation(image=image, request=request, metadata=metadata, timings=timings)
