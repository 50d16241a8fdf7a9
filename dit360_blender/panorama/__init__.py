"""Panorama analysis for the equirectangular images DiT360 makes: seam/pole scores, the sun, HDR.

numpy and the standard library only: the Blender side (which ships numpy but never torch) imports it.

* `seam.seam_score(image)` -> `SeamReport` (wrap-seam z-score/percentile, pole detail); `.to_dict()`
  is JSON-ready for the image's metadata.
* `sun.detect_sun(image)` -> `SunDetection` (the sun's direction, colour, size, or why there is none).
* `hdr.expand_to_hdr(image, sun_share=0.6)` -> `HdrResult` (linear HDR with the sun, the same with the
  sun clamped for use with a Sun lamp, the lamp's strength/colour/angle/rotation, the world exposure).
* `rgbe.write_hdr` / `read_hdr` / `write_hdr_files`: Radiance .hdr files Blender loads as float.
* `sphere`: the image <-> direction conventions (Blender world space, +Z up, row 0 = top of the image,
  u left -> right, v bottom -> top, image centre = +X); read its docstring before using angles.
"""

from .color import linear_image, linear_to_srgb, luminance, srgb_to_linear, to_unit_float
from .hdr import HdrResult, expand_highlights, expand_to_hdr, exposure_for, upward_irradiance
from .rgbe import read_hdr, write_hdr, write_hdr_files
from .seam import SeamReport, column_offsets, column_steps, pole_detail, seam_score
from .sphere import (
    angles_from_direction,
    direction_from_angles,
    direction_from_uv,
    pixel_from_uv,
    row_solid_angles,
    sun_lamp_rotation,
    uv_from_direction,
    uv_from_pixel,
)
from .sun import SunDetection, SunEstimate, SunParams, detect_sun

__all__ = [
    "HdrResult",
    "SeamReport",
    "SunDetection",
    "SunEstimate",
    "SunParams",
    "angles_from_direction",
    "column_offsets",
    "column_steps",
    "detect_sun",
    "direction_from_angles",
    "direction_from_uv",
    "expand_highlights",
    "expand_to_hdr",
    "exposure_for",
    "linear_image",
    "linear_to_srgb",
    "luminance",
    "pixel_from_uv",
    "pole_detail",
    "read_hdr",
    "row_solid_angles",
    "seam_score",
    "srgb_to_linear",
    "sun_lamp_rotation",
    "to_unit_float",
    "upward_irradiance",
    "uv_from_direction",
    "uv_from_pixel",
    "write_hdr",
    "write_hdr_files",
]
