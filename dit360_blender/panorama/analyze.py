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
from .rgbe import write_hdr_files
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

    Raises OSError (to be reported as a disk write failure) with nothing half-written: each file
    is written atomically, and the ones written are removed again if a later one fails.
    """
    png_path = Path(png_path)
    try:
        files = {name: str(path) for name, path in write_hdr_files(png_path, hdr).items()}
        for name, image in (("hdr", hdr.hdr), ("lighting", hdr.lighting)):
            target = Path(files[name]).with_suffix(".exr")
            if exr:
                files[f"{name}_exr"] = str(write_exr(target, image))
            else:  # an EXR of an earlier panorama of this name would be shown instead of the new .hdr
                target.unlink(missing_ok=True)
        return files
    except OSError:
        for suffix in (".hdr", "_lighting.hdr", ".exr", "_lighting.exr"):
            png_path.with_name(png_path.stem + suffix).unlink(missing_ok=True)
        raise
