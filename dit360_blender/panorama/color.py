"""sRGB <-> linear Rec.709 and luminance (numpy only).

Images come in as uint8 (0..255), uint16 (0..65535) or floats already scaled to 0..1; all of them are
sRGB-encoded display values (what a PNG holds). `srgb_to_linear` is the exact piecewise sRGB EOTF
(IEC 61966-2-1), the same one Blender applies to an sRGB image, so our linear values match what
Blender lights the scene with.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "LUMA_709",
    "linear_image",
    "linear_image64",
    "linear_to_srgb",
    "luminance",
    "srgb_to_linear",
    "to_unit_float",
]

# Rec.709 / sRGB primaries, D65: relative luminance of linear RGB
LUMA_709 = np.array([0.2126, 0.7152, 0.0722])


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) image as float32 in 0..1 (sRGB-encoded values, unchanged apart from scaling).

    Extra channels (alpha) are dropped; a grey (H, W) image is repeated to 3 channels.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if image.dtype == np.uint16:
        return image.astype(np.float32) / np.float32(65535.0)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"unsupported image dtype {image.dtype}: use uint8, uint16 or float in 0..1")


def srgb_to_linear(image: np.ndarray) -> np.ndarray:
    """Exact sRGB EOTF, element-wise on any shape. uint8 is decoded through a table (exact and fast),
    uint16 is scaled by 1/65535, floats must be 0..1 and are clipped there. Returns float32."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return _SRGB8_TABLE[image]
    if image.dtype == np.uint16:
        x = image.astype(np.float64) / 65535.0
    else:
        x = np.clip(image.astype(np.float64), 0.0, 1.0)
    return _eotf(x).astype(np.float32)


def linear_image(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) image of any accepted kind (see `to_unit_float`) as linear Rec.709 float32."""
    raw = np.asarray(image)
    if raw.dtype == np.uint8 and raw.ndim == 3 and raw.shape[2] >= 3:
        return _SRGB8_TABLE[raw[..., :3]]
    return srgb_to_linear(to_unit_float(raw))


def linear_image64(image: np.ndarray) -> np.ndarray:
    """`linear_image(image)` as a new float64 array (the same values); an 8-bit image goes through a
    float64 table, which is faster than decoding to float32 and converting."""
    raw = np.asarray(image)
    if raw.dtype == np.uint8 and raw.ndim == 3 and raw.shape[2] >= 3:
        return _SRGB8_TABLE64[raw[..., :3]]
    return linear_image(raw).astype(np.float64)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """Inverse of `srgb_to_linear` (float in, float out, clipped to 0..1)."""
    x = np.clip(np.asarray(linear, dtype=np.float64), 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055).astype(np.float32)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec.709 relative luminance of linear RGB (..., 3) -> (...)."""
    rgb = np.asarray(rgb)
    return rgb[..., 0] * LUMA_709[0] + rgb[..., 1] * LUMA_709[1] + rgb[..., 2] * LUMA_709[2]


def _eotf(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, np.power((x + 0.055) / 1.055, 2.4))


_SRGB8_TABLE = _eotf(np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
_SRGB8_TABLE64 = _SRGB8_TABLE.astype(np.float64)  # the float32 values: float64 math gives the same results
