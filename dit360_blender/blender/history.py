"""The Scene's history of generated environments: record, re-apply, copy settings back."""

from __future__ import annotations

import time
from pathlib import Path

import bpy

from . import output, world

MAX_ENTRIES = 100


def record(scene: bpy.types.Scene, params: dict, path: str, image: bpy.types.Image, seconds: float) -> None:
    settings = scene.dit360
    entry = settings.history.add()
    entry.prompt = params["prompt"]
    entry.seed = params["seed"]
    entry.steps = params["steps"]
    entry.guidance = params["guidance"]
    entry.lora_strength = params["lora_strength"]
    entry.width = params["width"]
    entry.height = params["height"]
    entry.filepath = str(path)
    entry.image_name = image.name
    entry.created = time.strftime("%Y-%m-%d %H:%M:%S")
    entry.seconds = seconds
    entry.name = Path(path).stem
    # newest first: move the new entry to the top
    settings.history.move(len(settings.history) - 1, 0)
    while len(settings.history) > MAX_ENTRIES:
        settings.history.remove(len(settings.history) - 1)
    settings.history_index = 0


def entry_image(entry: bpy.types.PropertyGroup) -> bpy.types.Image | None:
    """The entry's image: the datablock if it is still there, else loaded again from its file."""
    image = bpy.data.images.get(entry.image_name)
    if image is not None and (image.packed_file is not None or _same_file(image, entry.filepath)):
        return image
    if entry.filepath and Path(entry.filepath).is_file():
        metadata = {
            "prompt": entry.prompt, "seed": entry.seed, "steps": entry.steps, "guidance": entry.guidance,
            "lora_strength": entry.lora_strength, "width": entry.width, "height": entry.height,
        }  # fmt: skip
        image = output.load_result(entry.filepath, metadata)
        entry.image_name = image.name
        return image
    return None


def _same_file(image: bpy.types.Image, filepath: str) -> bool:
    try:
        return Path(bpy.path.abspath(image.filepath)).resolve() == Path(filepath).resolve()
    except (OSError, ValueError):
        return False


def apply(scene: bpy.types.Scene, entry: bpy.types.PropertyGroup) -> bpy.types.Image | None:
    """Show the entry's image in the scene's World (the World is created if there is none)."""
    image = entry_image(entry)
    if image is None:
        return None
    if scene.world is None:
        scene.world = bpy.data.worlds.new("World")
    world.set_image(scene.world, image)
    return image


def copy_to_panel(scene: bpy.types.Scene, entry: bpy.types.PropertyGroup) -> None:
    settings = scene.dit360
    settings.prompt = entry.prompt
    settings.seed = entry.seed
    settings.randomize_seed = False  # the point of copying a seed is to get the same world again
    settings.steps = entry.steps
    settings.guidance = entry.guidance
    settings.lora_strength = entry.lora_strength
    settings.width = entry.width
    settings.height = entry.height
