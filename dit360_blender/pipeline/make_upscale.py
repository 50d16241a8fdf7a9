"""One "upscale a panorama" step, shared by the CLI and the worker: read the source, run the learned
super-resolution without a seam (upscale.py, the model from sr_models.py), optionally refine it
(refine.py), and write it as every job writes a panorama (make_panorama.write_panorama: the PNG with
its metadata, seam score and lighting analysis, the HDR and EXR environments, cube maps; all or none).

Sizes: "4k", "8k", "16k" are final widths 4096, 8192, 16384 (height half of it; params.SIZE_WIDTHS);
"native" keeps the source's width. A width the model's scale cannot reach exactly with whole passes
and a whole box-filter factor (a ×3 model from 2048 to 4096) is refused before anything is loaded
onto the device or written, with the widths it can reach.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..panorama.seam import SEAM_MIN_PERIODS
from ..params import SIZE_WIDTHS
from .dit360 import Generation, pick_device
from .errors import BadParametersError
from .image_io import read_png_metadata
from .make_panorama import Panorama, write_panorama
from .model_files.sr_catalogue import resolve_sr_model
from .sampling import Cancelled
from .sr_models import LoadedSR, load_sr_model, tile_for_budget
from .upscale import plan_passes, upscale

MAX_SOURCE_PIXELS = 16384 * 8192
READABLE = (".png", ".jpg", ".jpeg")

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
Refiner = Callable[[torch.Tensor, ProgressFn | None, Callable[[], bool] | None], torch.Tensor]


@dataclass
class UpscaleSettings:
    """What an upscale job asks for (besides what write_panorama takes)."""

    size: str = "4k"
    tile: int | None = None  # input pixels per tile side; None: from the device's memory
    vram_budget_gib: float | None = None
    metadata: dict = field(default_factory=dict)  # extra fields for metadata["upscale"]


def target_width(size: str, source_width: int) -> int:
    """The final width of `size` ("native" = the source's own)."""
    if size == "native":
        return source_width
    if size not in SIZE_WIDTHS:
        raise BadParametersError(f"Unknown size {size!r}.", f"Use one of native, {', '.join(SIZE_WIDTHS)}.")
    return SIZE_WIDTHS[size]


def source_size(path: Path | str) -> tuple[int, int]:
    """(width, height) of the panorama to upscale, from its header; the errors of `read_source`."""
    with _open_source(Path(path)) as im:
        return im.width, im.height


def read_source(path: Path | str) -> tuple[torch.Tensor, dict]:
    """(image (3, H, W) float32 in [0, 1], the PNG's dit360 metadata) of an 8-bit 2:1 panorama."""
    path = Path(path)
    with _open_source(path) as im:
        try:
            rgb = np.array(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise _unreadable(path, exc) from None
    metadata = read_png_metadata(path) if path.suffix.lower() == ".png" else {}
    image = torch.from_numpy(rgb).permute(2, 0, 1).to(torch.float32).div_(255.0)
    return image, metadata


def _open_source(path: Path) -> Image.Image:
    """The opened image, checked: a PNG/JPEG that exists, 2:1, at most 16384x8192."""
    if path.suffix.lower() not in READABLE:
        raise BadParametersError(
            f"Cannot upscale {path.name}: only 8-bit PNG or JPEG panoramas are read "
            f"({path.suffix or 'no extension'} is not).",
            "Upscale the PNG the generation wrote; its .hdr/.exr files are made again from the result.",
        )
    if not path.is_file():
        raise BadParametersError(
            f"The panorama to upscale, {path}, does not exist.", "Pick an existing PNG or JPEG."
        )
    try:
        im = Image.open(path)
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    width, height = im.size
    problem = None
    if width * height > MAX_SOURCE_PIXELS:
        problem = (f"{path.name} is {width}x{height}: larger than 16384x8192.", "Upscale a smaller panorama.")
    elif width != 2 * height or width % 2:
        problem = (
            f"{path.name} is {width}x{height}, not an equirectangular panorama (twice as wide as high).",
            "Upscale a 2:1 panorama (e.g. 2048x1024).",
        )
    if problem is not None:
        im.close()
        raise BadParametersError(*problem)
    return im


def _unreadable(path: Path, exc: Exception) -> BadParametersError:
    return BadParametersError(
        f"Cannot read {path} as an image: {exc}.",
        "Pick a PNG or JPEG panorama that opens in an image viewer.",
    )


def check_size(model: LoadedSR, source_width: int, size: str) -> tuple[int, int, int]:
    """(target width, passes, box factor), or the error for a width the model cannot reach."""
    width = target_width(size, source_width)
    passes, factor = plan_passes(source_width, width, model.scale)
    return width, passes, factor


def make_upscale(
    source: Path | str,
    model: LoadedSR,
    out: Path,
    settings: UpscaleSettings,
    *,
    refiner: Refiner | None = None,
    hdr: bool = True,
    exr: bool = True,
    cubemap: str = "none",
    sun_share: float = 0.6,
    on_progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Panorama:
    """Upscale the panorama in `source` with `model` to `settings.size` (then `refiner` on the
    result, when given) and write it to `out` (a .png path) with its HDR/EXR/cube-map files.

    Raises BadParametersError (unreadable source, unreachable size, a tile the device cannot hold),
    Cancelled, or the write errors of write_panorama; nothing is written unless everything ran."""
    image, source_meta = read_source(source)
    source_width = image.shape[-1]
    width, passes, factor = check_size(model, source_width, settings.size)
    tile = settings.tile or tile_for_budget(
        model.sr,
        model.device,
        model.dtype,
        None if settings.vram_budget_gib is None else int(settings.vram_budget_gib * 2**30),
    )
    if on_stage is not None:
        on_stage("upscaling")
    t0 = time.perf_counter()
    done = [0]
    total = _tile_count(image.shape[1], image.shape[2], tile, model.scale, passes)

    def on_tile(_i: int, _n: int) -> None:
        done[0] += 1
        if on_progress is not None:
            on_progress("upscale", done[0], total)
        if should_cancel is not None and should_cancel():
            raise Cancelled()

    result = upscale(
        image, model.sr, width, tile=tile, device=model.device, dtype=model.dtype, on_tile=on_tile
    )
    del image
    timings = {"upscale_s": time.perf_counter() - t0}
    if refiner is not None:
        if on_stage is not None:
            on_stage("refining")
        t1 = time.perf_counter()
        result = refiner(result, on_progress, should_cancel)
        timings["refine_s"] = time.perf_counter() - t1
    info = {
        "source": str(Path(source).resolve()),
        **model.describe(),
        "passes": passes,
        "box_factor": factor,
        "tile": tile,
        "width": width,
        **settings.metadata,
    }
    metadata = {k: v for k, v in source_meta.items() if k not in ("seam", "lighting", "upscale")}
    metadata["upscale"] = info
    upscaled = UpscaledImage(image=result, request=None, metadata=metadata, timings=timings)
    del result
    period = seam_period(source_width, width)
    return write_panorama(
        upscaled, out, hdr=hdr, exr=exr, cubemap=cubemap, sun_share=sun_share, seam_period=period,
        on_stage=on_stage,
    )  # fmt: skip


def seam_period(source_width: int, width: int) -> int:
    """The period of an upscale's column grid, which the seam score compares the wrap within
    (panorama/seam.py): for a width ratio a/b in lowest terms the pattern of source-pixel boundaries
    repeats every a output columns (b source pixels), and the wrap is at the start of one. 1 when too
    few periods fit to compare with."""
    period = width // math.gcd(width, source_width)
    return period if width // period >= SEAM_MIN_PERIODS else 1


class UpscaledImage(Generation):
    """An upscaled panorama as write_panorama takes a generation; its 8-bit copy is made in bands of
    rows, so no second float copy of a 16K image is ever held, and the float image is released once
    the 8-bit copy exists (to_uint8 is called once)."""

    def to_uint8(self) -> torch.Tensor:
        _, height, width = self.image.shape
        rgb = torch.empty((height, width, 3), dtype=torch.uint8)
        band = max(1, (1 << 22) // width)
        for y in range(0, height, band):
            rows = self.image[:, y : y + band].permute(1, 2, 0)
            rgb[y : y + band] = (rows * 255).round_().to(torch.uint8)
        # write_panorama needs only the 8-bit copy from here on (analysis, files): let the float one
        # go, so an 8K job does not carry 384 MiB through the analysis
        self.image = torch.empty((3, 0, 0))
        return rgb


def _tile_count(height: int, width: int, tile: int, scale: int, passes: int) -> int:
    """How many tiles all passes run (each pass grows the image by `scale`)."""
    count = 0
    for p in range(passes):
        h, w = height * scale**p, width * scale**p
        count += -(-h // tile) * -(-w // tile)
    return max(count, 1)


def upscale_job(
    p: Mapping,
    out: Path,
    *,
    load_refiner: Callable[[Mapping], Refiner] | None = None,
    on_progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_download: Callable[[str, int, int], None] | None = None,
) -> Panorama:
    """An `upscale` job's checked parameters (params.check_params(..., "upscale")) run: the model
    file resolved (downloaded when allowed), loaded, the size checked against its scale before
    anything else loads, then `load_refiner(p)` (the diffusion model: only with refine on) and
    make_upscale. The CLI and the worker both run this."""
    model_file = find_upscale_model(p, on_download)
    if on_stage is not None:
        on_stage("loading")
    device = pick_device(str(p.get("device", "auto")).split(",", 1)[0])
    model = load_sr_model(model_file, device, p.get("dtype", "auto"))
    check_size(model, source_size(p["source"])[0], p["size"])  # a width the model cannot reach: refused now
    refine = bool(p.get("refine")) and float(p.get("refine_strength", 0.0)) > 0.0
    refiner = load_refiner(p) if refine and load_refiner is not None else None
    if refine and refiner is None:
        raise BadParametersError(
            "Refine needs the diffusion model, which this caller cannot load.", "Turn refine off."
        )
    settings = UpscaleSettings(
        size=p["size"],
        tile=p.get("upscale_tile"),
        vram_budget_gib=p.get("vram_budget_gib"),
        metadata={
            "refine": refine,
            "refine_strength": float(p.get("refine_strength", 0.0)) if refine else 0.0,
        },
    )
    return make_upscale(
        p["source"], model, out, settings, refiner=refiner, hdr=p.get("hdr", True), exr=p.get("exr", True),
        cubemap=p.get("cubemap", "none"), sun_share=p.get("sun_share", 0.6), on_progress=on_progress,
        should_cancel=should_cancel, on_stage=on_stage,
    )  # fmt: skip


def upscale_generated(
    p: Mapping,
    made: Panorama,
    pipe,
    *,
    on_progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_download: Callable[[str, int, int], None] | None = None,
) -> Panorama:
    """generate's `size` (and `refine`): the panorama `made` that the generate job `p` just wrote,
    upscaled beside it (<stem>_<size>.png) by upscale_job, refined with the already loaded `pipe`
    and the job's own prompt and seed. The native files stay; the returned Panorama is the upscale,
    with metadata["upscale"]["source"] naming the native PNG. Raises as upscale_job does (the native
    files are kept then: they are a finished generation)."""
    from .output_files import plan_output
    from .refine import Refiner as DetailPass

    out = plan_output(made.path.parent, "", 0, None, default_stem=f"{made.path.stem}_{p['size']}")
    return upscale_job(
        {**p, "source": str(made.path)}, out, load_refiner=lambda q: DetailPass.for_job(pipe, q, p["prompt"]),
        on_progress=on_progress, should_cancel=should_cancel, on_stage=on_stage, on_download=on_download,
    )  # fmt: skip


def find_upscale_model(p: Mapping, on_download: Callable[[str, int, int], None] | None = None) -> Path:
    """The super-resolution model file job `p` will use (downloaded when allowed), or the error of
    resolve_sr_model: a generate with a size checks this first, before minutes of sampling."""
    models = p.get("models") or {}
    return resolve_sr_model(
        p.get("upscale_model"), models.get("models_dir"),
        allow_download=bool(models.get("allow_download")), progress=on_download,
    )  # fmt: skip
