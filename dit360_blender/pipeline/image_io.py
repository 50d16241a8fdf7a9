"""Writing panoramas: PNG with the generation settings in text chunks, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..panorama.png_encode import write_png_rgb
from .errors import OutputWriteError


def save_png(path: Path, rgb: np.ndarray, metadata: dict) -> Path:
    """Write an (H, W, 3) uint8 image; each metadata item becomes a `dit360:<key>` text chunk.

    The file appears complete or not at all: it is written next to the target and renamed.
    """
    path = Path(path)
    text = {f"dit360:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    text["Software"] = "dit360_blender"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            # deflated on several threads: Pillow's one-thread encoder was most of a job's tail
            write_png_rgb(f, np.asarray(rgb), text)
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk or a bad image: no partial file stays behind
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise
    return path


def read_png_metadata(path: Path) -> dict:
    """The `dit360:*` text chunks of a PNG written by `save_png`, decoded."""
    with Image.open(path) as im:
        return image_metadata(im)


def image_metadata(image: Image.Image) -> dict:
    """The `dit360:*` text chunks of an open image, decoded ({} for one without them, a JPEG)."""
    out = {}
    for key, value in dict(getattr(image, "text", {}) or {}).items():
        if key.startswith("dit360:"):
            try:
                out[key[7:]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[7:]] = value
    return out


def _write_error(path: Path, exc: OSError) -> OutputWriteError:
    return OutputWriteError(
        f"Could not write {path}: {exc.strerror or exc}.",
        "Choose an output folder you can write to, with free disk space.",
    )
