"""Where generated images go, and how they become Blender images with their settings attached."""

from __future__ import annotations

import json
from pathlib import Path

import bpy

from .common import user_dir

META_PREFIX = "dit360_"


def output_dir(settings: bpy.types.PropertyGroup) -> Path:
    """The folder for the next image (absolute): the user's choice, else //dit360/ beside a saved
    .blend, else the add-on's user folder (an unsaved file has no "beside")."""
    chosen = settings.output_dir.strip()
    if chosen:
        if chosen.startswith("//") and not bpy.data.filepath:
            return user_dir("outputs")  # relative to a file that is not saved yet: nowhere
        return Path(bpy.path.abspath(chosen)).expanduser().resolve()
    if bpy.data.filepath:
        return Path(bpy.path.abspath("//dit360")).resolve()
    return user_dir("outputs")


def _prop_value(value: object) -> str | int | float:
    """ID properties hold str/int/float (no None, no nesting we want to read back): others as JSON."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and -(2**31) <= value < 2**31:
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        return value
    return json.dumps(value)


def load_result(path: str | Path, metadata: dict, pack: bool = False) -> bpy.types.Image:
    """Load the written image (reloading it if Blender already has that file) and attach the
    generation settings as custom properties, as the file's own text chunks hold them too."""
    path = Path(path)
    known = {i.name for i in bpy.data.images}
    image = bpy.data.images.load(str(path), check_existing=True)
    if image.name in known and image.packed_file is None:
        image.reload()  # the same file was written again (a fixed file name): show the new pixels
    for key, value in metadata.items():
        image[META_PREFIX + str(key)] = _prop_value(value)
    image[META_PREFIX + "file"] = str(path)
    if pack and image.packed_file is None:
        image.pack()
    return image
