"""An edit job's inputs: the one place its files (source, mask, photo) are read, checked and turned
into what the edit loop takes: the canvas it starts from and the mask of where to regenerate.

Every problem is a `BadParametersError` naming the file and the fix, raised before any model is
loaded and before anything is written. The mask geometry is `panorama/masks.py` and
`panorama/projection.py` (numpy): a mask image resized to the source and feathered in degrees on the
sphere; what a camera sees; a photo projected onto the sphere; the band over the 0°/360° seam of a
panorama turned by half (the result is turned back).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..panorama import masks, projection
from ..params import SIZE_MULTIPLE, ParamError, check_values
from .errors import BadParametersError
from .output_files import slugify

__all__ = ["EditInputs", "read_edit_inputs", "read_image"]

MAX_INPUT_PIXELS = 16384 * 8192  # larger than any panorama we make or edit: refused before decoding
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


@dataclass
class EditInputs:
    """`canvas` (H, W, 3) uint8: the picture the edit starts from (the source; for a seam repair
    turned by half; for a photo the photo on the sphere); `mask` (H, W) float32 in [0, 1], 1 =
    regenerate, already feathered; `unroll`: turn the result back by half (seam); `stem`: the
    default output file stem; `info`: what the result's metadata records under "edit"."""

    canvas: np.ndarray
    mask: np.ndarray
    mask_kind: str
    unroll: bool
    stem: str
    info: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.canvas.shape[1])

    @property
    def height(self) -> int:
        return int(self.canvas.shape[0])

    @property
    def work_size(self) -> tuple[int, int]:
        """(width, height) the model works at: the canvas's own size when it is a multiple of 16,
        else the nearest 2:1 size that is (the result is resampled back and composited at the
        canvas's size, so pixels outside the mask stay exact at any size)."""
        return work_size(self.width, self.height)


def work_size(width: int, height: int) -> tuple[int, int]:
    """The nearest 2:1 size of multiples of 16 to a 2:1 `width` x `height` (itself when it is one)."""
    if height % SIZE_MULTIPLE == 0 and width == 2 * height:
        return width, height
    h = max(SIZE_MULTIPLE, int(round(height / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    return 2 * h, h


def read_edit_inputs(p: Mapping[str, Any]) -> EditInputs:
    """The inputs of an edit whose params `p` passed `params.check_params(..., "edit")`."""
    kind = p["mask_kind"]
    source = None if p["source"] is None else _read_source(p["source"])
    info: dict[str, Any] = {"mask_kind": kind, "source": p["source"], "strength": p["strength"]}
    name = Path(p["source"] or p["photo"] or "edit").stem
    stem = f"{slugify(name, 32)}-{kind}_{p['seed']}"
    try:
        if kind == "photo":
            return _photo(p, source, info, stem)
        height, width = source.shape[:2]
        if kind == "mask":
            mask = masks.feather_mask(_read_mask(p["mask"], width, height), p["feather"])
            info.update(mask=p["mask"], feather=p["feather"])
        elif kind == "view":
            view = {k: p[k] for k in ("yaw", "pitch", "hfov", "aspect", "roll")}
            mask = projection.view_mask(width, height, feather=p["feather"], **view)
            info.update(view, feather=p["feather"])
        else:  # seam: the band's edges are feathered inside it, so nothing outside it changes
            feather = min(p["feather"], p["band"] / 2.0)
            mask = masks.seam_band_mask(width, height, p["band"], feather_deg=feather)
            info.update(band=p["band"], feather=feather)
            return EditInputs(masks.roll_half(source), mask, kind, True, stem, info)
    except masks.GeometryError as exc:
        raise BadParametersError(_sentence(exc.message), _sentence(exc.hint)) from None
    _require_marked(mask, kind)
    return EditInputs(source, mask, kind, False, stem, info)


def _photo(p: Mapping[str, Any], source: np.ndarray | None, info: dict, stem: str) -> EditInputs:
    """The photo on the sphere (inverse mapping, bilinear), the rest to be outpainted (mask 1); on a
    source when one is given (its size), else on a width x height panorama of the photo's colour."""
    photo = read_image(p["photo"], "photo", transpose=True)
    hfov = p["hfov"] if p["hfov"] is not None else projection.exif_hfov(p["photo"])
    if hfov is None:
        raise BadParametersError(
            f"The photo {p['photo']} does not say its field of view (no focal length in its EXIF data).",
            "Give its horizontal field of view in degrees (--hfov, e.g. 65 for a phone's main camera).",
        )
    height, width = source.shape[:2] if source is not None else (p["height"], p["width"])
    if p["fit"]:
        photo = np.clip(np.rint(projection.fit_photo(photo, hfov, width)), 0, 255).astype(np.uint8)
    placed = projection.photo_to_equirect(photo, width, height, hfov, p["yaw"], p["pitch"], p["roll"])
    rgb = np.clip(np.rint(placed.rgb), 0, 255).astype(np.uint8)
    covered = placed.coverage[..., None] > 0
    canvas = np.where(covered, rgb, source if source is not None else rgb)
    info.update(
        photo=p["photo"],
        hfov=float(hfov),
        yaw=p["yaw"],
        pitch=p["pitch"],
        roll=p["roll"],
        fit=p["fit"],
        feather=0.0,
    )
    # no feather: the photo's pixels stay exactly as projected, the generated rest meets them
    return EditInputs(canvas, placed.mask.astype(np.float32), "photo", False, stem, info)


def read_image(path: str, what: str, transpose: bool = False) -> np.ndarray:
    """An 8-bit image file as (H, W, 3) uint8 RGB. `transpose`: apply its EXIF orientation (a photo)."""
    image = _open(path, what)
    try:
        if image.mode in _HIGH_DEPTH_MODES:
            raise BadParametersError(
                f"The {what} {path} has {image.mode} pixels (more than 8 bits per channel).",
                "Give an 8-bit PNG or JPEG (an edit keeps the source's pixels exactly, as 8-bit PNG).",
            )
        if transpose:
            image = ImageOps.exif_transpose(image)
        return np.asarray(image.convert("RGB"))
    except OSError as exc:  # truncated or corrupt data found while decoding
        raise _unreadable(path, what, exc) from None
    finally:
        image.close()


def _read_source(path: str) -> np.ndarray:
    rgb = read_image(path, "source")
    height, width = rgb.shape[:2]
    if width != 2 * height:
        raise BadParametersError(
            f"The source {path} is {width}x{height}, not 2:1: an equirectangular panorama is twice as "
            "wide as tall.",
            f"Give a 2:1 panorama (e.g. {2 * height}x{height}); crop or pad it to 2:1 first.",
        )
    try:  # the size the model works at must be within the table's limits
        check_values(dict(zip(("width", "height"), work_size(width, height), strict=True)))
    except ParamError as exc:
        raise BadParametersError(f"The source {path} is {width}x{height}: {exc.message}", exc.hint) from None
    return rgb


def _read_mask(path: str, width: int, height: int) -> np.ndarray:
    image = _open(path, "mask")
    try:
        if image.mode == "P":
            image = image.convert("RGBA")
        pixels = np.asarray(image)
    except OSError as exc:
        raise _unreadable(path, "mask", exc) from None
    finally:
        image.close()
    try:
        return masks.resize_mask(pixels, width, height)
    except masks.GeometryError as exc:
        raise BadParametersError(f"The mask {path}: {exc.message}.", _sentence(exc.hint)) from None


def _open(path: str, what: str) -> Image.Image:
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise BadParametersError(
            f"The {what} {path} does not exist.", f"Give the path of the {what} image file."
        ) from None
    except Image.DecompressionBombError:  # Pillow's own limit, far beyond ours: refuse it alike
        raise BadParametersError(
            f"The {what} {path} has more pixels than an edit takes.",
            "Give an image of at most 16384x8192 pixels.",
        ) from None
    except (OSError, ValueError) as exc:  # a folder, no permission, not an image (UnidentifiedImageError)
        raise _unreadable(path, what, exc) from None
    if image.width * image.height > MAX_INPUT_PIXELS:
        image.close()
        raise BadParametersError(
            f"The {what} {path} is {image.width}x{image.height} pixels, more than an edit takes.",
            "Give an image of at most 16384x8192 pixels.",
        )
    return image


def _unreadable(path: str, what: str, exc: Exception) -> BadParametersError:
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return BadParametersError(
        f"Could not read the {what} {path}: {reason}.",
        f"Give a readable image file (PNG or JPEG) as the {what}.",
    )


def _require_marked(mask: np.ndarray, kind: str) -> None:
    if not bool((mask >= 0.5).any()):
        what = {"mask": "The mask marks nothing", "view": "The camera sees no pixel of the panorama"}[kind]
        raise BadParametersError(
            f"{what} to regenerate (no pixel at 50 % or more).",
            "Paint white where the edit should regenerate." if kind == "mask" else "Widen the field of view.",
        )


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".") if text else text
