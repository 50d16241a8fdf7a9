"""One "make a panorama" step, shared by the worker and the CLI: generate, analyse, write the files.

Every panorama is written the same way, whoever asked for it: the PNG with the generation
settings, the seam scores and the lighting analysis in its metadata, and (with `hdr`) the HDR
environments `<stem>.hdr` and `<stem>_lighting.hdr` beside it, with `exr` also as half-float OpenEXR
(`<stem>.exr`, `<stem>_lighting.exr`), and with `cubemap` ("faces" or "cross") the cube map of the
PNG (`<stem>_cube_px.png` ... or `<stem>_cube_cross.png`) and, with the EXRs, of the HDR environment
(`<stem>_cube_px.exr` ...; panorama/cubemap.py). Nothing half-written is left behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .._version import __version__
from ..panorama.analyze import analyze, write_lighting_files
from ..panorama.cubemap import write_cubemap
from .dit360 import DiT360Pipeline, GenerateRequest, Generation
from .image_io import save_png
from .output_files import CUBE_INFIX
from .sampling import StepCallback


@dataclass
class Panorama:
    """What one job wrote: the PNG, the HDR files beside it ({"hdr": …, "lighting": …, with EXR
    "hdr_exr": …, "lighting_exr": …}; empty without HDR), the metadata stored in the PNG, and the time each stage took (seconds)."""

    path: Path
    files: dict[str, str]
    metadata: dict
    timings: dict[str, float]
    memory: dict = field(default_factory=dict)  # GPU memory per stage (Generation.memory)


def make_panorama(
    pipe: DiT360Pipeline,
    request: GenerateRequest,
    out: Path,
    *,
    hdr: bool = True,
    exr: bool = True,
    cubemap: str = "none",
    sun_share: float = 0.6,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Panorama:
    """Generate `request` with `pipe` and write it to `out` (a .png path) with its HDR files (and,
    with `exr` and `hdr`, their OpenEXR copies).

    Raises the pipeline's errors, `Cancelled`, or OSError when the files cannot be written."""
    generation = pipe.generate(request, on_step=on_step, should_cancel=should_cancel, on_stage=on_stage)
    return write_panorama(
        generation, out, hdr=hdr, exr=exr, cubemap=cubemap, sun_share=sun_share, on_stage=on_stage
    )


def write_panorama(
    generation: Generation,
    out: Path,
    *,
    hdr: bool = True,
    exr: bool = True,
    cubemap: str = "none",
    sun_share: float = 0.6,
    seam_period: int = 1,
    on_stage: Callable[[str], None] | None = None,
) -> Panorama:
    """Write a finished `generation` (a generated, edited or upscaled panorama) as every job writes
    it: the PNG with its metadata and analysis, the HDR files, EXRs and cube maps asked for; all or
    none. `seam_period`: an upscale's whole factor (the seam score compares the wrap with the
    boundaries between source pixels, panorama/seam.py)."""
    if on_stage is not None:
        on_stage("saving")
    t0 = time.perf_counter()
    rgb = generation.to_uint8().numpy()
    metadata = {**generation.metadata, "package_version": __version__}
    hdr_result = None
    if hdr:
        analysis, hdr_result = analyze(rgb, sun_share=sun_share, seam_period=seam_period)
        metadata.update(analysis)
    path, files = _write_files(out, rgb, metadata, hdr_result, exr=exr, cubemap=cubemap)
    timings = {k: v for k, v in generation.timings.items() if k != "total_s"}
    timings["save_s"] = time.perf_counter() - t0
    return Panorama(path=path, files=files, metadata=metadata, timings=timings, memory=generation.memory)


def _write_files(
    out: Path, rgb, metadata: dict, hdr_result, *, exr: bool = False, cubemap: str = "none"
) -> tuple[Path, dict[str, str]]:
    """The PNG and the two HDRs (and their EXRs) written side by side (zlib and file I/O release the GIL),
    then the cube maps; if any fails, the others are removed again, so a job leaves all its files or none."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit360-hdr") as pool:
        lighting = pool.submit(write_lighting_files, out, hdr_result, exr) if hdr_result is not None else None
        try:
            path = save_png(out, rgb, metadata)
        except BaseException:
            if lighting is not None and lighting.exception() is None:
                for leftover in lighting.result().values():
                    Path(leftover).unlink(missing_ok=True)
            raise
        try:
            files = lighting.result() if lighting is not None else {}
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    if cubemap != "none":
        try:
            files.update(_write_cubemaps(path, rgb, hdr_result if exr else None, cubemap))
        except BaseException:
            for leftover in (path, *files.values()):
                Path(leftover).unlink(missing_ok=True)
            raise
    return path, files


def _write_cubemaps(png: Path, rgb, hdr_result, layout: str) -> dict[str, str]:
    """{"cube_png_<face>": path, ...} (and "cube_exr_<face>" of the HDR environment), <face> being
    px ... nz or cross: the PNG's cube map, and the HDR's where EXRs are written."""
    stem = png.stem + CUBE_INFIX
    files = {}
    try:
        for fmt, image in (("png", rgb), ("exr", None if hdr_result is None else hdr_result.hdr)):
            if image is not None:
                for written in write_cubemap(image, png.parent, stem, fmt=fmt, layout=layout):
                    files[f"cube_{fmt}_{written.stem[len(stem) + 1 :]}"] = str(written)
    except BaseException:
        for leftover in files.values():
            Path(leftover).unlink(missing_ok=True)
        raise
    return files
