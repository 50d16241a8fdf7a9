"""Writing panoramas: PNG with the generation settings in text chunks, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import OutputWriteError

PNG_COMPRESS_LEVEL = 1


def save_png(path: Path, rgb: np.ndarray, metadata: dict) -> Path:
    """Write an (H, W, 3) uint8 image; each metadata item becomes a `dit360:<key>` text chunk.

    The file appears complete or not at all: it is written next to the target and renamed.
    """
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(f"dit360:{key}", value if isinstance(value, str) else json.dumps(value))
    info.add_text("Software", "dit360_blender")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            # level 1: about 40 % faster than the default 6 for a few % more bytes (measured on a
            # 2048x1024 natural texture: 0.11 vs 0.19 s, 1.32 vs 1.28 MB) — this is on every job's tail
            image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
            image.save(f, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, exc) from exc
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
