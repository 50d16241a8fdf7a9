"""Cheap previews while sampling: a linear latent → RGB projection, no VAE decode per preview.

What is shown: the model's current estimate of the final latents, x0 = x_t - t·v, which the
sampler hands over with every step (`pipeline.sampling.SamplerStep.x0`), so no extra model call is
made. Early previews therefore show the composition rather than noise.

The projection: 16×3 weights + an RGB bias, fixed per loaded model and fitted once (on the first
preview) by least squares on how *that* model's VAE decodes flat latent fields: 32 random
16-channel vectors (the N(0, 1) range the sampler works in), each filled into a 4×4 latent tile,
against the mean colour of the centre of each decoded 32×32 tile. We fit rather than ship a
published table so the numbers match whatever VAE is loaded (and come from our own measurement);
it costs one batched decode of 32 tiny tiles once per model. It is approximate: the decoder is
nonlinear and adds texture, so previews get colours and layout right, not detail.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..pipeline.sampling import LATENT_CHANNELS, crop_pad, unpack
from ..protocol import MAX_PREVIEW_HEIGHT, MAX_PREVIEW_WIDTH

FIT_SAMPLES, FIT_TILE, FIT_BATCH = 32, 4, 32
logger = logging.getLogger("dit360_blender.worker")


@torch.inference_mode()
def fit_latent_rgb(vae: torch.nn.Module, samples: int = FIT_SAMPLES, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(weights (16, 3), bias (3,)) mapping a sampler-space latent pixel to RGB in [-1, 1]."""
    values = torch.randn(samples, LATENT_CHANNELS, generator=torch.Generator().manual_seed(seed))
    colours = []
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    for chunk in values.split(FIT_BATCH):
        tiles = chunk[:, :, None, None].expand(-1, -1, FIT_TILE, FIT_TILE)
        rgb = vae.decode(tiles.to(device, dtype)).float().cpu()
        q = rgb.shape[-1] // 4  # the centre half: away from the convolutions' zero padding
        colours.append(rgb[:, :, q:-q, q:-q].mean(dim=(2, 3)))
    design = torch.cat([values, torch.ones(samples, 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, torch.cat(colours).double()).solution.float()
    return solution[:LATENT_CHANNELS], solution[LATENT_CHANNELS]


class PreviewRenderer:
    """Turns the sampler's x0 estimates (padded token layout) into small PNGs for one job.

    The sampling loop never waits for a preview: `submit` enqueues the projection on x0's device
    (a few tiny kernels after the step's own) and a copy into pinned memory, and a thread of the
    renderer's waits for that copy, encodes the PNG and hands it to `deliver`. (Copying x0 to the
    CPU in the loop made the CPU wait for every step to finish before it could queue the next
    one: ~10 ms a step on an H200.) Previews are delivered in order; `drain` waits for them all.
    """

    def __init__(self, projection: tuple[Tensor, Tensor], width: int, height: int):
        self.weights, self.bias = projection
        self.grid_h, self.grid_w = height // 16, width // 16
        self.unroll = False  # turn the picture back by half (a seam repair samples it turned)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def render(self, x0: Tensor) -> tuple[bytes, int, int]:
        """PNG bytes, width, height of the projected x0 estimate (1, tokens, 64), at once."""
        pixels = self._project(x0).cpu().numpy()
        return _png(pixels), pixels.shape[1], pixels.shape[0]

    def submit(self, x0: Tensor, deliver: Callable[[bytes, int, int], None]) -> None:
        """Render the x0 estimate in the background and call `deliver(png, width, height)` with it
        (on the renderer's thread). Failures are logged, never raised: a preview is not the job."""
        pixels = self._project(x0)
        done = None
        if pixels.device.type == "cuda":
            host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            host.copy_(pixels, non_blocking=True)  # queued on the current stream of x0's GPU
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(pixels.device))  # that GPU's, not device 0's
            pixels = host
        else:
            pixels = pixels.cpu()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit360-preview")
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._pool.submit(_encode_and_deliver, pixels, done, deliver))

    def drain(self) -> None:
        """Wait until every submitted preview has been delivered (before the job's next events)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # _encode_and_deliver never raises
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _project(self, x0: Tensor) -> Tensor:
        """(h, w, 3) uint8 on x0's device: the projection of x0, shrunk to the preview size."""
        x0 = x0.detach().float()
        weights, bias = self._projection_on(x0.device)
        latents = unpack(crop_pad(x0, self.grid_h, self.grid_w), self.grid_h, self.grid_w)[0]
        if self.unroll:
            latents = torch.roll(latents, -(latents.shape[-1] // 2), dims=-1)
        rgb = torch.einsum("chw,ck->khw", latents, weights) + bias[:, None, None]
        rgb = _fit_size(((rgb + 1) / 2).clamp(0, 1))
        return (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).contiguous()

    def _projection_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The projection on `device`, copied there once: a copy from the CPU waits for everything
        queued on the GPU, which is what the loop must not do at every step."""
        if device not in self._on_device:
            self._on_device[device] = (self.weights.to(device), self.bias.to(device))
        return self._on_device[device]


def _encode_and_deliver(pixels: Tensor, done, deliver: Callable[[bytes, int, int], None]) -> None:
    try:
        if done is not None:
            done.synchronize()  # the copy to pinned memory has landed
        array = pixels.numpy()
        deliver(_png(array), array.shape[1], array.shape[0])
    except Exception:
        logger.warning("a preview could not be rendered", exc_info=True)


def encode_preview(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _fit_size(rgb: Tensor) -> Tensor:
    """Shrink (area average) to fit MAX_PREVIEW_WIDTH x MAX_PREVIEW_HEIGHT; never enlarge."""
    _, h, w = rgb.shape
    scale = min(MAX_PREVIEW_WIDTH / w, MAX_PREVIEW_HEIGHT / h, 1.0)
    if scale >= 1.0:
        return rgb
    size = (max(1, int(h * scale)), max(1, int(w * scale)))
    return F.interpolate(rgb[None], size=size, mode="area")[0]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
