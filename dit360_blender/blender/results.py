"""Applying a generated panorama: the image into a World's DiT360 chain, the scene's Sun lamp, the
history entry (and its thumbnail), and the undo step. Every generated world takes this path; tests
and scripts that have a worker `result` of their own may call `apply_result` too.
"""

from __future__ import annotations

from collections.abc import Callable

import bpy

from . import history, lighting, paths, resolution
from .thumbnails import THUMBNAILS


def apply_result(
    scene: bpy.types.Scene,
    event: dict,
    params: dict,
    *,
    world: bpy.types.World | None = None,
    take_world: bool | None = None,
    pack: bool | None = None,
    seconds: float = 0.0,
    before_assign: Callable[[], None] | None = None,
) -> bpy.types.Image:
    """Apply a worker `result` event to `scene`: the HDR (or PNG) into the DiT360 chain of the World
    `world` (default: the scene's; a new one if there is none), the scene uses that World
    (unless `take_world` is False), its Sun lamp is set up, and the history gets an entry.

    `before_assign()` runs after the World is set up and before the scene takes it (a job uses it to
    drop its preview World). Returns the image the World shows. Raises on failure (nothing is
    recorded then)."""
    settings = scene.dit360
    target = world if world is not None else scene.world
    if target is None:
        target = bpy.data.worlds.new("World")
    if take_world is None:
        take_world = scene.world is None or scene.world == target
    image = lighting.apply_result(target, event, pack=settings.pack_image if pack is None else pack)
    # an upscale job takes no prompt: its picture's prompt is the source PNG's, in the metadata
    metadata = event.get("metadata") or {}
    target["dit360_prompt"] = str(params.get("prompt") or metadata.get("prompt") or "")
    target["dit360_seed"] = int(params.get("seed", metadata.get("seed", 0)) or 0)
    target["dit360_image"] = image.name
    if before_assign is not None:
        before_assign()
    if take_world:
        scene.world = target
    lighting.sync_suns(target)  # every scene that shares the World gets its Sun, not only this one
    history.record(scene, params, event, image, seconds)
    # the entry's thumbnail is its smallest size's (an upscale joins an entry: its 16K PNG is not loaded)
    thumb = paths.resolve(resolution.smallest_file(settings.history[settings.history_index]))
    THUMBNAILS.load(f"history:{thumb}", thumb)
    return image


def undo_push(message: str) -> None:
    """Make the applied World one undo step (Ctrl+Z gives back the World as it was). A timer runs
    without a window in its context, so one is lent for the push."""
    wm = bpy.context.window_manager
    try:
        if bpy.context.window is None and wm is not None and wm.windows:
            with bpy.context.temp_override(window=wm.windows[0]):
                bpy.ops.ed.undo_push(message=message)
        else:
            bpy.ops.ed.undo_push(message=message)
    except (RuntimeError, AttributeError):
        pass  # no undo system (some background sessions): the World change simply has no step
