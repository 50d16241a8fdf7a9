"""What every generated panorama records and writes beside itself: seam scores and the lighting.

Used by the worker and the CLI right before the PNG is written, so the numbers land in the PNG's
metadata, and the HDR images (with the sun, and with the sun clamped for use with a Sun lamp)
are written next to it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .hdr import HdrResult, expand_to_hdr
from .rgbe import write_hdr_files
from .seam import seam_score


def analyze(rgb: np.ndarray, sun_share: float = 0.6) -> tuple[dict, HdrResult]:
    """(metadata {"seam": …, "lighting": …}, the HDR result) for an (H, W, 3) uint8 panorama.

    The seam score and the HDR expansion are independent and numpy releases the GIL in their
    array work, so they run side by side (this is on the critical path of every job)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit360-seam") as pool:
        seam = pool.submit(seam_score, rgb)
        hdr = expand_to_hdr(rgb, sun_share=sun_share)
        return {"seam": seam.result().to_dict(), "lighting": hdr.to_dict()}, hdr


def write_lighting_files(png_path: Path, hdr: HdrResult) -> dict[str, str]:
    """<stem>.hdr and <stem>_lighting.hdr next to the PNG; returns their paths as strings.

    Raises OSError (to be reported as a disk write failure) with nothing half-written: each file
    is written atomically, and a first file is removed again if the second fails.
    """
    png_path = Path(png_path)
    try:
        return {name: str(path) for name, path in write_hdr_files(png_path, hdr).items()}
    except OSError:
        for suffix in (".hdr", "_lighting.hdr"):
            png_path.with_name(png_path.stem + suffix).unlink(missing_ok=True)
        raise
