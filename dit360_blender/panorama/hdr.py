"""From the final 8-bit panorama to a linear HDR environment, a Sun lamp and an exposure (numpy only).

Non-learned, in four steps (see reference/panorama_peers.md §3.3):

1. **Linearise** with the exact sRGB EOTF, as Blender does for an sRGB PNG.
2. **Highlights.** An inverse tone curve on each pixel's luminance (hue kept): identity up to the knee
   (linear luminance 0.6, sRGB ~0.8), then Y' = Y + a (Y - knee)^2 with a chosen so that full white
   becomes `highlight_gain` (2.0, one stop). It is C1 at the knee and monotone, and it only touches
   near-clipped pixels (bright clouds, the glow around the sun), so the environment without the sun
   stays within [1, highlight_gain] times the linearised LDR image.
3. **Sun.** If `detect_sun` finds one, its core pixels get the sun's colour and are scaled by one
   factor so that the sun carries `sun_share` of the light of the whole environment, where

       share = sum over sun pixels of omega * Y  /  sum over all pixels of omega * Y

   with omega the pixel's solid angle and Y the linear Rec.709 luminance of the HDR image: the sun's
   part of the environment's total radiance integrated over the full sphere (4 pi times the mean
   radiance), not of the irradiance on any one surface. The factor is never below 1 (the sun is not
   made darker than step 2 left it), so a `sun_share` below the share it already has is not reached;
   `HdrResult.sun_share` always says what was.
4. **Exposure.** `exposure` is the Background (world) strength at which a grey card of albedo 0.18,
   horizontal and facing up, lit by the upper hemisphere of the environment (sun included), renders at
   `grey_target` (0.18): with E_up = sum over the upper hemisphere of omega * sin(elevation) * Y (the
   irradiance on the card at strength 1), a Lambertian card renders albedo * strength * E_up / pi, so

       exposure = grey_target * pi / (0.18 * E_up)

   i.e. by default the card receives the irradiance pi of a uniform white world of strength 1 and
   renders 0.18 whatever the prompt (noon desert or candle-lit room). Clamped to `exposure_limits` so
   a black image does not ask for an absurd strength. The HDR images themselves are NOT scaled: their
   sky matches the PNG, and the exposure goes into the Background node's strength.

Two HDR images come out: `hdr` (the sun in the map; use it alone) and `lighting` (the sun's core
pixels replaced by the sky level around it, the median colour of the ring `detect_sun` measured,
through the same highlight curve) for use WITH a Sun lamp, so the sun is not counted twice.

Sun lamp rule. Blender's Background shader emits radiance (strength x pixel value, W/m^2/sr) and a Sun
lamp's strength is its irradiance in W/m^2 on a surface facing it. What the lamp replaces is the light
removed from the map, so per channel:

    E_sun = sum over the sun's pixels of omega * (hdr - lighting)         (world strength 1)
    lamp color = E_sun / max(E_sun),   lamp strength = world_strength * max(E_sun)
    lamp angle = the sun's equivalent-disc diameter,  rotation = sphere.sun_lamp_rotation(direction)

(the sun is small, so the cosine factor is the same for all its pixels). `HdrResult.sun_lamp()` gives
these numbers; `tests/test_panorama_blender.py` checks in Cycles that the lamp + `lighting` world
light a card like the `hdr` world does.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .color import linear_image64, luminance
from .sphere import row_solid_angles, row_upward_cosine_weights, sun_lamp_rotation
from .sun import SunDetection, SunParams, detect_sun

__all__ = ["HdrResult", "expand_highlights", "expand_to_hdr", "exposure_for", "upward_irradiance"]


@dataclass(frozen=True)
class HdrResult:
    """The HDR environment of one panorama, and the numbers Blender needs to light with it."""

    hdr: np.ndarray = field(repr=False, compare=False)  # (H, W, 3) float32 linear Rec.709, sun included
    # the same with the sun's core at the sky level, for use with a Sun lamp
    lighting: np.ndarray = field(repr=False, compare=False)
    detection: SunDetection
    sun_share: float  # share of the environment's solid-angle-weighted luminance in the sun (hdr)
    sun_share_requested: float
    sun_gain: float  # factor applied to the sun's core pixels (1.0 without a sun)
    sun_irradiance_rgb: tuple[float, float, float]  # W/m^2 per unit world strength, what the lamp replaces
    exposure: float  # Background strength for the grey card rule (module docstring)
    upward_irradiance: float  # E_up of `hdr` at world strength 1 (luminance)
    settings: dict = field(default_factory=dict)

    @property
    def sun(self):
        return self.detection.sun

    def sun_lamp(self, world_strength: float | None = None) -> dict | None:
        """Blender Sun lamp settings for use with the `lighting` image at `world_strength`
        (default: `exposure`); None without a sun. Angles in radians, colour linear."""
        if self.sun is None:
            return None
        strength = self.exposure if world_strength is None else world_strength
        peak = max(self.sun_irradiance_rgb)
        if peak <= 0.0:
            return None
        return {
            "direction": list(self.sun.direction),
            "rotation_euler": list(sun_lamp_rotation(self.sun.direction)),
            "color": [c / peak for c in self.sun_irradiance_rgb],
            "strength": float(strength * peak),
            "angle": math.radians(self.sun.diameter_deg),
        }

    def to_dict(self) -> dict:
        """JSON-ready summary (no arrays): what the worker records and the panel shows."""
        return {
            "sun": self.detection.to_dict(),
            "sun_share": self.sun_share,
            "sun_share_requested": self.sun_share_requested,
            "sun_gain": self.sun_gain,
            "sun_irradiance_rgb": list(self.sun_irradiance_rgb),
            "sun_lamp": self.sun_lamp(),
            "exposure": self.exposure,
            "upward_irradiance": self.upward_irradiance,
            "settings": dict(self.settings),
        }


def expand_to_hdr(
    image: np.ndarray,
    sun_share: float = 0.6,
    *,
    params: SunParams | None = None,
    detection: SunDetection | None = None,
    knee: float = 0.6,
    highlight_gain: float = 2.0,
    grey_target: float = 0.18,
    exposure_limits: tuple[float, float] = (1.0 / 256.0, 256.0),
) -> HdrResult:
    """Build the HDR environment of an equirectangular panorama (H, W, 3), uint8 or float 0..1 sRGB.

    `sun_share` in [0, 1): the sun's target share of the environment's light (module docstring).
    Pass `detection` to reuse an earlier `detect_sun` result for the same image.
    """
    if not 0.0 <= sun_share < 1.0:
        raise ValueError(f"sun_share must be in [0, 1), got {sun_share}")
    # the sun is found while the highlights are expanded (independent passes; numpy releases the
    # GIL in its array work): this runs on every job's tail
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit360-sun") as pool:
        detecting = pool.submit(detect_sun, image, params) if detection is None else None
        hdr = linear_image64(image)
        height, width = hdr.shape[:2]
        y_hdr = _expand_highlights_in_place(hdr, knee=knee, gain=highlight_gain)  # its luminance
        omega = row_solid_angles(height, width)
        detection = detecting.result() if detecting is not None else detection

    sun_gain, share, irradiance = 1.0, 0.0, (0.0, 0.0, 0.0)
    sun = detection.sun
    if sun is not None:
        # only the sun's pixels change from here on: the sums over the image are updated there
        rows, cols = np.nonzero(sun.mask)
        omega_sun = omega[rows]
        e_all = float(omega @ y_hdr.sum(axis=1))
        e_sun = float(omega_sun @ y_hdr[rows, cols])
        e_rest = e_all - e_sun
        sun_gain = max(1.0, sun_share * e_rest / ((1.0 - sun_share) * e_sun)) if e_sun > 0 else 1.0
        # luminance scaled, colour set to the sun's: colour * Y / Y(colour) has luminance Y
        color = np.asarray(sun.color, dtype=np.float64)
        color_y1 = color / max(float(luminance(color)), 1e-12)
        # the sun goes in place (no 50 MB copy on every job's tail)
        hdr[rows, cols] = color_y1[None, :] * (sun_gain * y_hdr[rows, cols])[:, None]
        fill = expand_highlights(
            np.asarray(sun.sky_rgb, dtype=np.float64)[None, None, :], knee=knee, gain=highlight_gain
        )
        y_hdr[rows, cols] = luminance(hdr[rows, cols])
        e_sun_hdr = float(omega_sun @ y_hdr[rows, cols])
        share = e_sun_hdr / (e_rest + e_sun_hdr)
        removed = (hdr[rows, cols] - fill[0, 0]) * omega_sun[:, None]
        irradiance = tuple(float(x) for x in np.clip(removed.sum(axis=0), 0.0, None))

    e_up = float(row_upward_cosine_weights(height, width) @ y_hdr.sum(axis=1))  # upward_irradiance(hdr)
    exposure = exposure_for(e_up, grey_target=grey_target, limits=exposure_limits)
    hdr32 = hdr.astype(np.float32)
    lighting32 = hdr32
    if sun is not None:  # the lighting map is the HDR with the sun's pixels filled with its sky
        lighting32 = hdr32.copy()
        lighting32[rows, cols] = fill[0, 0]
    return HdrResult(
        hdr=hdr32,
        lighting=lighting32,
        detection=detection,
        sun_share=share,
        sun_share_requested=float(sun_share),
        sun_gain=float(sun_gain),
        sun_irradiance_rgb=irradiance,
        exposure=exposure,
        upward_irradiance=e_up,
        settings={
            "knee": knee,
            "highlight_gain": highlight_gain,
            "grey_target": grey_target,
            "exposure_limits": list(exposure_limits),
            "method": "srgb-eotf + quadratic highlight expansion + sun share",
        },
    )


def expand_highlights(linear: np.ndarray, *, knee: float = 0.6, gain: float = 2.0) -> np.ndarray:
    """The inverse tone curve of step 2 on linear RGB (..., 3): hue kept, luminance expanded above `knee`."""
    if not 0.0 < knee < 1.0 or gain < 1.0:
        raise ValueError("need 0 < knee < 1 and gain >= 1")
    linear = np.asarray(linear, dtype=np.float64)
    y = luminance(linear)
    a = (gain - 1.0) / (1.0 - knee) ** 2
    over = np.clip(y - knee, 0.0, None)
    factor = np.where(y > knee, (y + a * over**2) / np.maximum(y, 1e-12), 1.0)
    return linear * factor[..., None]


def _expand_highlights_in_place(linear: np.ndarray, *, knee: float, gain: float) -> np.ndarray:
    """`expand_highlights` of a float64 (H, W, 3) image, written into it; returns its luminance
    after. Only the pixels above the knee are touched (usually a few percent of a panorama)."""
    if not 0.0 < knee < 1.0 or gain < 1.0:
        raise ValueError("need 0 < knee < 1 and gain >= 1")
    y = luminance(linear)
    rows, cols = np.nonzero(y > knee)
    y_over = y[rows, cols]
    a = (gain - 1.0) / (1.0 - knee) ** 2
    factor = (y_over + a * (y_over - knee) ** 2) / np.maximum(y_over, 1e-12)
    linear[rows, cols] *= factor[:, None]
    y[rows, cols] = luminance(linear[rows, cols])
    return y


def upward_irradiance(image: np.ndarray) -> float:
    """Irradiance (luminance) on a horizontal surface facing up, from a linear equirectangular image at
    world strength 1: sum of omega * sin(elevation) * Y over the upper hemisphere."""
    image = np.asarray(image, dtype=np.float64)
    weights = row_upward_cosine_weights(image.shape[0], image.shape[1])
    return float(weights @ luminance(image).sum(axis=1))


def exposure_for(
    upward: float, *, grey_target: float = 0.18, limits: tuple[float, float] = (1.0 / 256.0, 256.0)
) -> float:
    """World strength at which an albedo-0.18 horizontal card renders `grey_target` (module docstring)."""
    if upward <= 0.0:
        return float(limits[1])
    return float(np.clip(grey_target * math.pi / (0.18 * upward), limits[0], limits[1]))
