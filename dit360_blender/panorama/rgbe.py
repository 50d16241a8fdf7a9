"""Radiance .hdr (RGBE) files with numpy: a flat writer and a reader (flat or run-length encoded).

RGBE stores each pixel as three 8-bit mantissas sharing one 8-bit exponent: value = (m + 0.5) / 256 *
2^(e - 128), as Radiance decodes it. The largest channel keeps about 1/256 relative precision (under
0.4 %); a channel much darker than the pixel's largest one is only exact to that same absolute step, so
compare errors against the pixel's largest channel. Values above ~1.7e38 cannot be stored; negative
values are written as 0.

Written files are flat (one RGBE quadruple per pixel, no run-length encoding): every reader accepts
that, because a normalised pixel can never look like the start of an RLE scanline (its largest
mantissa is >= 128). Orientation "-Y H +X W": the first scanline is the top row, as in the PNG.
Blender loads them as float, linear images (`bpy.data.images.load`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["decode_rgbe", "encode_rgbe", "hdr_paths", "read_hdr", "write_hdr", "write_hdr_files"]

_TINY = 1e-32  # below this a pixel is stored as black (exponent 0)


def write_hdr(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a linear float image (H, W, 3) as a flat RGBE Radiance file, atomically. `image` may
    also be a `large.Environment` (anything with `bands()` and `shape`): encoded band by band."""
    if hasattr(image, "bands"):
        height, width = image.shape[:2]
        chunks = (encode_rgbe(band) for _, _, band in image.bands())
    else:
        image = np.asarray(image)
        if image.dtype != np.float32:  # float32 is encoded as it is (encode_rgbe: the same bytes)
            image = image.astype(np.float64)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected (H, W, 3), got {image.shape}")
        if not np.all(np.isfinite(image)):
            raise ValueError("the image has NaN or infinite values")
        height, width = image.shape[:2]
        chunks = iter([encode_rgbe(image)])
    header = f"#?RADIANCE\nSOFTWARE=dit360_blender\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".hdr", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.encode("ascii"))
            for data in chunks:
                f.write(data.tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def encode_rgbe(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float -> (H, W, 4) uint8 RGBE (mantissas truncated; the reader adds half a step).

    float32 input is encoded in float32 (half the memory traffic of float64, on every job's tail):
    the same bytes, since frexp, scaling by a power of two and floor are exact in either type."""
    image = np.asarray(image)
    kind = np.float32 if image.dtype == np.float32 else np.float64
    image = np.clip(image, 0.0, None, dtype=kind)
    # max of the three channels element-wise: numpy's reduction over an axis of three is ~7x slower
    peak = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])
    _, exponent = np.frexp(peak)  # peak = mantissa * 2**exponent, mantissa in [0.5, 1)
    if np.any((exponent > 127) & (peak > _TINY)):
        raise ValueError("values too large for RGBE (> 1.7e38)")
    visible = (peak > _TINY) & (exponent >= -127)
    with np.errstate(over="ignore"):  # 256 / 2**exponent of an invisible pixel may overflow: zeroed
        scale = np.where(visible, np.ldexp(kind(256.0), -exponent), kind(0.0))
    out = np.empty(image.shape[:-1] + (4,), dtype=np.uint8)
    image *= scale[..., None]
    np.floor(image, out=image)
    out[..., :3] = np.clip(image, 0, 255)
    out[..., 3] = np.where(visible, exponent + 128, 0)
    return out


def decode_rgbe(rgbe: np.ndarray) -> np.ndarray:
    """(..., 4) uint8 RGBE -> (..., 3) float32, Radiance's decoding ((m + 0.5) / 256 * 2^(e - 128))."""
    rgbe = np.asarray(rgbe)
    exponent = rgbe[..., 3].astype(np.int64)
    scale = np.where(exponent > 0, np.ldexp(1.0, exponent - 136), 0.0)
    return ((rgbe[..., :3].astype(np.float64) + 0.5) * scale[..., None]).astype(np.float32)


def read_hdr(path: str | os.PathLike) -> np.ndarray:
    """Read a Radiance RGBE file (flat or new-style RLE, orientation -Y H +X W) as (H, W, 3) float32."""
    raw = Path(path).read_bytes()
    if not (raw.startswith(b"#?RADIANCE") or raw.startswith(b"#?RGBE")):
        raise ValueError(f"{path}: not a Radiance .hdr file")
    end = raw.find(b"\n\n")
    if end < 0:
        raise ValueError(f"{path}: header never ends")
    header = raw[:end].decode("ascii", "replace")
    if "FORMAT=" in header and "FORMAT=32-bit_rle_rgbe" not in header:
        raise ValueError(f"{path}: only 32-bit_rle_rgbe is supported")
    line_end = raw.find(b"\n", end + 2)
    match = re.fullmatch(r"-Y (\d+) \+X (\d+)", raw[end + 2 : line_end].decode("ascii").strip())
    if not match:
        raise ValueError(f"{path}: unsupported orientation {raw[end + 2 : line_end]!r}")
    height, width = int(match.group(1)), int(match.group(2))
    data = np.frombuffer(raw, dtype=np.uint8, offset=line_end + 1)
    is_rle = 8 <= width < 32768 and data.size >= 4 and data[0] == 2 and data[1] == 2 and data[2] < 128
    if not is_rle:
        if data.size < height * width * 4:
            raise ValueError(f"{path}: truncated pixel data")
        return decode_rgbe(data[: height * width * 4].reshape(height, width, 4))
    return decode_rgbe(_read_rle(data, height, width, path))


def hdr_paths(png_path: str | os.PathLike) -> dict[str, Path]:
    """Where a PNG's HDR environments go: {"hdr": <stem>.hdr (sun in the map), "lighting":
    <stem>_lighting.hdr (the sun clamped, for use with a Sun lamp)}; their EXRs take the same stems."""
    png_path = Path(png_path)
    return {
        "hdr": png_path.with_suffix(".hdr"),
        "lighting": png_path.with_name(png_path.stem + "_lighting.hdr"),
    }


def write_hdr_files(png_path: str | os.PathLike, result) -> dict[str, Path]:
    """Write a `hdr.HdrResult` next to its PNG (`hdr_paths`). Returns {"hdr": path, "lighting": path}."""
    paths = hdr_paths(png_path)
    return {name: write_hdr(path, getattr(result, name)) for name, path in paths.items()}


def _read_rle(data: np.ndarray, height: int, width: int, path) -> np.ndarray:
    out = np.empty((height, width, 4), dtype=np.uint8)
    buf = data.tobytes()
    pos = 0
    for row in range(height):
        if buf[pos] != 2 or buf[pos + 1] != 2 or (buf[pos + 2] << 8 | buf[pos + 3]) != width:
            raise ValueError(f"{path}: bad RLE scanline {row}")
        pos += 4
        for channel in range(4):
            x = 0
            line = out[row, :, channel]
            while x < width:
                count = buf[pos]
                if count == 0 or x + (count - 128 if count > 128 else count) > width:
                    raise ValueError(f"{path}: corrupt RLE data in scanline {row}")
                if count > 128:  # a run: one value repeated count - 128 times
                    count -= 128
                    line[x : x + count] = buf[pos + 1]
                    pos += 2
                else:  # a literal stretch of count values
                    line[x : x + count] = np.frombuffer(buf, np.uint8, count, pos + 1)
                    pos += 1 + count
                x += count
    return out
