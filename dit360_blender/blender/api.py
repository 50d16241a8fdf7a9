"""The scripting API (also reachable as `<add-on package>.api`).

    import bpy
    from bl_ext.user_default.dit360_blender import api   # the repository name may differ

    image = api.generate_world("This is a panorama image. A foggy pine forest at dawn", seed=7)

`generate_world(..., wait=True)` blocks and pumps the worker client itself, so it works in
`blender -b` where timers never run; it returns the Blender image that is now the World's
environment: the float HDR written beside the PNG (`image["dit360_png_file"]` is the PNG), with the
seam scores and the lighting analysis in its custom properties. With `wait=False` it returns at once
(a job handle) and the add-on's timer finishes the job in the UI. The settings not given come from
the scene's DiT360 panel; the model, device and worker settings from the add-on preferences.
"""

from __future__ import annotations

import bpy

from . import edit_ops, lighting, resolution_ops
from . import world as world_nodes
from .errors import GenerationError
from .generation import Generation
from .pump import PUMP

__all__ = [
    "GenerationError", "cancel", "edit_world", "generate_world", "is_busy", "set_world_image", "stop_worker",
]  # fmt: skip


def generate_world(
    prompt: str,
    *,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    lora_strength: float | None = None,
    width: int | None = None,
    height: int | None = None,
    sun_share: float | None = None,
    speed: str | None = None,
    output_dir: str | None = None,
    size: str | None = None,
    refine: bool | None = None,
    refine_strength: float | None = None,
    scene: bpy.types.Scene | None = None,
    wait: bool = True,
    timeout: float | None = None,
) -> bpy.types.Image | Generation:
    """Generate a 360° world for `scene` (default: the current one) and make it its World.

    `size` "4k"/"8k"/"16k" (None: the panel's Resolution) generates at 2K and then upscales it (with
    `refine` at `refine_strength`): the World shows the upscaled one, the History keeps both; with
    `wait` the image returned is the upscaled one.

    `sun_share` (0 to 0.95) is the share of the HDR environment's light a detected sun gets;
    `speed` is "faithful", "fast" or "fastest" (see the panel's Speed). The limits of every
    setting are those of the add-on's parameter table (`dit360_blender/params.py`).
    `seed=None` follows the panel (its seed, or a random one when Random Seed is on); the seed used
    is written back to the panel and into the image's custom properties. Raises GenerationError
    (`.code`, `.message`, `.hint`) when the job fails or is cancelled; the World is then unchanged.
    """
    scene = scene or bpy.context.scene
    overrides = {
        "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance,
        "lora_strength": lora_strength, "width": width, "height": height, "sun_share": sun_share,
        "speed": speed, "output_dir": bpy.path.abspath(output_dir) if output_dir else None,
        "size": size, "refine": refine, "refine_strength": refine_strength,
    }  # fmt: skip
    job = PUMP.start_generation(scene, **overrides)
    if not wait:
        return job
    job = resolution_ops.wait_chain(job, timeout=timeout)
    if job.error is not None:
        raise job.error
    image = bpy.data.images.get(job.image_name or "")
    if image is None:
        raise GenerationError("apply_failed", "The result image is missing from Blender.", "Generate again.")
    return image


def edit_world(
    kind: str,
    prompt: str | None = None,
    *,
    strength: float | None = None,
    feather: float | None = None,
    seed: int | None = None,
    steps: int | None = None,
    band: float | None = None,
    photo: str | None = None,
    hfov: float | None = None,
    yaw: float | None = None,
    pitch: float | None = None,
    mask: str | None = None,
    output_dir: str | None = None,
    scene: bpy.types.Scene | None = None,
    wait: bool = True,
    timeout: float | None = None,
) -> bpy.types.Image | Generation:
    """Edit the World of `scene` as the Edit panel does; `kind` is "view" (what the scene camera sees,
    through the World's Mapping), "mask" (the World's painted mask, or the mask image file `mask`),
    "photo" (extend `photo` into a new world; `hfov` None = from its EXIF) or "seam".

    Unset values come from the Edit panel (prompt: its prompt, else the main panel's). Blocks and
    returns the World's new image with `wait=True` (the History gets an entry that is a child of the
    source); raises GenerationError, the World unchanged, when the edit fails or is cancelled."""
    scene = scene or bpy.context.scene
    e = scene.dit360_edit
    panel = {"strength": strength, "feather": feather, "band": band, "yaw": yaw, "pitch": pitch}
    saved = {k: getattr(e, k) for k, v in panel.items() if v is not None}
    for k, v in panel.items():
        if v is not None:
            setattr(e, k, v)
    if photo is not None:
        saved["photo"], e.photo = e.photo, photo
    if hfov is not None and kind == "photo":
        saved["photo_hfov"], e.photo_hfov = e.photo_hfov, hfov
    try:
        values = edit_ops.edit_values(bpy.context, kind) if not (kind == "mask" and mask) else None
        if values is None:
            values = {"mask_kind": "mask", "strength": float(e.strength), "feather": float(e.feather),
                      "source": str(edit_ops.source_file(scene.world)), "mask": bpy.path.abspath(mask)}  # fmt: skip
        overrides = {"prompt": prompt, "seed": seed, "steps": steps,
                     "output_dir": bpy.path.abspath(output_dir) if output_dir else None}  # fmt: skip
        job = edit_ops.start_edit(scene, values, **overrides)
    finally:
        for k, v in saved.items():
            setattr(e, k, v)
    if not wait:
        return job
    PUMP.wait(job, timeout=timeout)
    if job.error is not None:
        raise job.error
    image = bpy.data.images.get(job.image_name or "")
    if image is None:
        raise GenerationError("apply_failed", "The result image is missing from Blender.", "Edit again.")
    return image


def set_world_image(image: bpy.types.Image, world: bpy.types.World | None = None) -> bpy.types.World:
    """Show any equirectangular image through the DiT360 World chain (created if absent).

    One of our HDRs brings its exposure and its Sun lamp along; any other image is shown at exposure 1
    and our Sun, if the scene had one, is removed (it belonged to the previous environment)."""
    scene = bpy.context.scene
    if world is None:
        world = scene.world or bpy.data.worlds.new("World")
        scene.world = world
    world_nodes.set_image(world, image)
    world.dit360.other_hdr = None  # it belonged to the previous environment
    lighting.sync_suns(world)
    return world


def cancel() -> bool:
    """Cancel the running generation (the World stays as it was)."""
    return PUMP.cancel()


def is_busy() -> bool:
    return PUMP.busy


def stop_worker() -> None:
    """Stop the worker process, freeing its (GPU) memory."""
    PUMP.link.stop()
