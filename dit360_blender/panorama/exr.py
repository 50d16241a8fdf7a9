"""OpenEXR files of the HDR environments, through the ASWF `OpenEXR` bindings (the worker's package).

Half float (16 bit, ZIP compression) is what HDRI libraries ship and what Blender, game engines and
compositors read: about 1/2048 relative precision (eight times finer than RGBE's 1/256), at twice an
8-bit PNG's size after compression. Half float ends at 65504: a map whose peak is above that (a very
small, very bright sun) is written in 32-bit float instead, so the sun's energy is never clipped.
Orientation as in the PNG: the first scanline is the top row. Channels R, G, B, linear Rec.709.

The only module of `panorama` that needs a package beyond numpy (the Blender side never imports it).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import OpenEXR

__all__ = ["HALF_MAX", "write_exr"]

HALF_MAX = float(np.finfo(np.float16).max)  # 65504
# OpenEXR compresses one file's blocks of scanlines on its own thread pool, which is off (0) until
# set: ZIP is the slowest part of an EXR (0.15 s at 2K on one core), and it scales with the cores
_COMPRESSION_THREADS = min(os.cpu_count() or 1, 8)


_threads_lock = threading.Lock()
_threads_set = False


def _use_compression_threads() -> None:
    """Once per process, before its first write (OpenEXR's docs: set it at start, not between
    reads and writes); bindings older than 3.5 have no such call and compress on one thread."""
    global _threads_set
    with _threads_lock:
        if not _threads_set and hasattr(OpenEXR, "set_global_thread_count"):
            if OpenEXR.global_thread_count() < _COMPRESSION_THREADS:
                OpenEXR.set_global_thread_count(_COMPRESSION_THREADS)
        _threads_set = True


def write_exr(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a linear float image (H, W, 3) (or a `large.Environment`) as a ZIP-compressed OpenEXR
    file, atomically: half float, or float32 where a value exceeds half's range. Raises ValueError for a bad image, OSError when
    the file cannot be written (nothing is left behind)."""
    if hasattr(image, "to_array"):  # a large.Environment: filled band by band in the file's type
        dtype = np.float16 if image.upper_bound() <= HALF_MAX else np.float32
        pixels = image.to_array(dtype)  # never negative, always finite
    else:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected (H, W, 3), got {image.shape}")
        if not np.all(np.isfinite(image)):
            raise ValueError("the image has NaN or infinite values")
        dtype = np.float16 if float(image.max(initial=0.0)) <= HALF_MAX else np.float32
        if float(image.min(initial=0.0)) < 0.0:  # negative light does not exist (RGBE writes 0 too)
            image = np.maximum(image, 0.0)  # (clipped before the half conversion: numpy's half math is slow)
        pixels = np.array(image, dtype=dtype, order="C")  # one copy, in the file's type
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    _use_compression_threads()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".exr", dir=path.parent)
    os.close(fd)
    try:
        with OpenEXR.File(header, {"RGB": pixels}) as exr:
            exr.write(tmp)
        os.replace(tmp, path)
    except RuntimeError as exc:  # the bindings report I/O failures (disk full, ...) as RuntimeError
        Path(tmp).unlink(missing_ok=True)
        raise OSError(f"could not write {path}: {exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
