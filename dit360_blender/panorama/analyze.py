"""What every generated panorama records and writes beside itself: seam scores and the lighting.

Used by the worker and the CLI right before the PNG is written, so the numbers land in the PNG's
metadata, and the HDR images (with the sun, and with the sun clamped for use with a Sun lamp)
are written next to it, as Radiance .hdr and (optionally) OpenEXR files.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .exr import write_exr
from .hdr import HdrResult, expand_to_hdr
from .large import ANALYSIS_WIDTH, analysis_copy, expand_large
from .rgbe import hdr_paths, write_hdr
from .seam import seam_score


def analyze(rgb: np.ndarray, sun_share: float = 0.6, seam_period: int = 1) -> tuple[dict, HdrResult]:
    """(metadata {"seam": …, "lighting": …}, the HDR result) for an (H, W, 3) uint8 panorama.

    The seam score and the HDR expansion are independent and numpy releases the GIL in their
    array work, so they run side by side (this is on the critical path of every job). A panorama
    wider than 2048 goes through panorama/large.py: the sun and the pole detail are measured on a
    2048-wide copy, the seam statistics in bands of rows, and the HDR images are computed band by
    band when written (`HdrResult.hdr`/`.lighting` are then `large.Environment`s), so a 16K
    panorama is never held as float. `seam_period`: an upscale's whole factor (seam.seam_score's
    `period`: the wrap is compared with the boundaries between source pixels)."""
    rgb = np.asarray(rgb)
    large = rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[1] > ANALYSIS_WIDTH
    small = analysis_copy(rgb) if large else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit360-seam") as pool:
        seam = pool.submit(seam_score, rgb, pole_image=small, period=seam_period)
        if large:
            hdr = expand_large(rgb, sun_share=sun_share, small=small)
        else:
            hdr = expand_to_hdr(rgb, sun_share=sun_share)
        return {"seam": seam.result().to_dict(), "lighting": hdr.to_dict()}, hdr


def write_lighting_files(png_path: Path, hdr: HdrResult, exr: bool = False) -> dict[str, str]:
    """<stem>.hdr and <stem>_lighting.hdr next to the PNG, and with `exr` <stem>.exr and
    <stem>_lighting.exr (panorama/exr.py; without it, EXRs of that name are removed: they belong to
    an earlier panorama written under the same name, and Blender would prefer them); returns
    {"hdr", "lighting"[, "hdr_exr", "lighting_exr"]} as path strings.

    A panorama held as arrays (2K: every job's tail) has its files written side by side, one thread
    each (numpy and the EXR compression release the GIL); a large one's (`large.Environment`,
    computed band by band on threads of its own) one after another, so only one whole-image EXR
    buffer exists at a time.

    Raises OSError (to be reported as a disk write failure) with nothing half-written: each file
    is written atomically, and the ones written are removed again if another one fails.
    """
    targets = {name: (write_hdr, path, getattr(hdr, name)) for name, path in hdr_paths(png_path).items()}
    for name in ("hdr", "lighting"):
        target = targets[name][1].with_suffix(".exr")
        if exr:
            targets[f"{name}_exr"] = (write_exr, target, targets[name][2])
        else:  # an EXR of an earlier panorama of this name would be shown instead of the new .hdr
            target.unlink(missing_ok=True)
    lanes = 1 if any(hasattr(image, "bands") for _, _, image in targets.values()) else len(targets)
    with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="dit360-files") as pool:
        pending = {name: pool.submit(write, path, image) for name, (write, path, image) in targets.items()}
    failures = [f.exception() for f in pending.values() if f.exception() is not None]
    if failures:
        for future in pending.values():
            if future.exception() is None:  # only what this call wrote: a failed one left nothing
                Path(future.result()).unlink(missing_ok=True)
        raise failures[0]
    return {name: str(future.result()) for name, future in pending.items()}
