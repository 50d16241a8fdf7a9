"""One "edit a panorama" step, shared by the worker and the CLI: read the inputs, inpaint, write the
files exactly as a generation's (PNG with metadata and analysis, HDR, EXR, cube maps)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..panorama.masks import area_resize
from .dit360 import DiT360Pipeline
from .edit_inputs import EditInputs
from .inpaint import EditRequest, inpaint
from .make_panorama import Panorama, write_panorama
from .sampling import StepCallback

__all__ = ["edit_request", "make_edit"]


def edit_request(p: Mapping[str, Any]) -> EditRequest:
    """The sampling settings of an edit job's (checked) params."""
    return EditRequest(
        prompt=p["prompt"], seed=p["seed"], steps=p["steps"], guidance=float(p["guidance"]),
        strength=float(p["strength"]), step_cache=float(p["step_cache"]),
    )  # fmt: skip


def make_edit(
    pipe: DiT360Pipeline,
    p: Mapping[str, Any],
    inputs: EditInputs,
    out: Path,
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Panorama:
    """Edit `inputs` (from `edit_inputs.read_edit_inputs(p)`) with `pipe` as the params `p` say and
    write the result to `out` (a .png path) with its HDR files. Raises the pipeline's errors,
    `Cancelled` (nothing written), or OSError when the files cannot be written."""
    canvas = torch.from_numpy(inputs.canvas).permute(2, 0, 1).float() / 255.0
    mask = torch.from_numpy(inputs.mask)
    work_w, work_h = inputs.work_size
    if (work_w, work_h) == (inputs.width, inputs.height):
        edited = inpaint(
            pipe,
            edit_request(p),
            canvas,
            mask,
            on_step=on_step,
            should_cancel=should_cancel,
            on_stage=on_stage,
        )
    else:  # the model works at the nearest size of multiples of 16; the composite is at the canvas's
        small = inpaint(
            pipe, edit_request(p), _resized(canvas, work_w, work_h), _work_mask(inputs.mask, work_w, work_h),
            on_step=on_step, should_cancel=should_cancel, on_stage=on_stage, composite=False,
        )  # fmt: skip
        generated = _resized(small.image, inputs.width, inputs.height).clamp(0, 1)
        small.image = canvas * (1.0 - mask) + generated * mask
        small.metadata.update(width=inputs.width, height=inputs.height, work_size=[work_w, work_h])
        edited = small
    if inputs.unroll:  # a seam repair worked on the panorama turned by half: turn it back
        edited.image = torch.roll(edited.image, -(inputs.width // 2), dims=2)
    # the edit's own record (a history child reads it whole): its settings beside the source's path
    edited.metadata["edit"] = {
        **inputs.info,
        "prompt": p["prompt"],
        "seed": p["seed"],
        "steps_run": edited.metadata["steps_run"],
    }
    return write_panorama(
        edited, out, hdr=p["hdr"], exr=p["exr"], cubemap=p["cubemap"], sun_share=float(p["sun_share"]),
        on_stage=on_stage,
    )  # fmt: skip


def _resized(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(3, h, w) float resampled to (3, height, width): area means down, bilinear up, columns wrapping."""
    pixels = area_resize(image.permute(1, 2, 0).numpy(), height, width, wrap_columns=True)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _work_mask(mask: np.ndarray, width: int, height: int) -> torch.Tensor:
    """The mask at the working size: its area means, at least 0.5 (regenerated) wherever a pixel the
    full-size mask regenerates falls, so a thin stroke is not averaged away."""
    small = area_resize(mask, height, width, wrap_columns=True)
    marked = area_resize((mask >= 0.5).astype(np.float32), height, width, wrap_columns=True) > 0
    small[marked] = np.maximum(small[marked], 0.5)
    return torch.from_numpy(np.clip(small, 0.0, 1.0))
