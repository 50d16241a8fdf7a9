"""Where generated images go, and how they become Blender images with their settings attached."""

from __future__ import annotations

import json
from pathlib import Path

import bpy

from . import paths
from .common import user_dir

META_PREFIX = "dit360_"
# What an environment image is: "hdr" (<stem>.hdr, the sun in the map), "lighting" (<stem>_lighting.hdr,
# the sun clamped, for use with our Sun lamp) or "png" (the 8-bit image, when no HDR was written).
KIND = META_PREFIX + "kind"
FILE_KEYS = {
    "png": META_PREFIX + "png_file",
    "hdr": META_PREFIX + "hdr_file",
    "lighting": META_PREFIX + "lighting_file",
}


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
    generation settings as custom properties, as the file's own text chunks hold them too. Its path
    is kept relative to the .blend when it lies under the .blend's folder (paths.py)."""
    path = Path(path)
    known = {i.name for i in bpy.data.images}
    image = bpy.data.images.load(str(path), check_existing=True)
    kept = paths.stored(path)
    if image.filepath != kept:
        image.filepath = kept
    if image.name in known and image.packed_file is None:
        image.reload()  # the same file was written again (a fixed file name): show the new pixels
    for key, value in metadata.items():
        image[META_PREFIX + str(key)] = _prop_value(value)
    image[META_PREFIX + "file"] = kept
    if pack and image.packed_file is None:
        image.pack()
    return image


def read_json(image: bpy.types.Image | None, key: str) -> dict | None:
    """A dict the metadata stored as JSON in `dit360_<key>` (e.g. "lighting", "seam"), or None."""
    if image is None:
        return None
    value = image.get(META_PREFIX + key)
    if not isinstance(value, str) or not value.startswith("{"):
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def environment_lighting(image: bpy.types.Image | None) -> dict | None:
    """The lighting analysis (exposure, sun, lamp) of an HDR environment we wrote, or None.

    Only the .hdr images carry it in this sense: the numbers were computed for them, not for the 8-bit
    PNG (which has no expanded highlights and no sun boost), nor for any image of the user's."""
    if image is None or image.get(KIND) not in ("hdr", "lighting"):
        return None
    return read_json(image, "lighting")


def exposure(image: bpy.types.Image | None) -> float:
    """The Background strength at which `image` lights a grey card right (1.0 for other images)."""
    lighting = environment_lighting(image)
    value = lighting.get("exposure") if lighting is not None else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else 1.0


def tag_environment(image: bpy.types.Image, kind: str, files: dict[str, str]) -> None:
    """Record what `image` is and where its sibling files are (to switch between them later)."""
    image[KIND] = kind
    for key, prop in FILE_KEYS.items():
        if files.get(key):
            image[prop] = paths.stored(files[key])


def sibling_file(image: bpy.types.Image, kind: str) -> str | None:
    """The absolute path of `image`'s sibling file of `kind` ("png", "hdr", "lighting"), or None."""
    value = image.get(FILE_KEYS[kind])
    return paths.resolve(value) if isinstance(value, str) and value else None


def rebase_paths(old_blend: str, new_blend: str) -> None:
    """The file is saved at `new_blend`: our images' kept paths follow, as Blender's own do."""
    for image in bpy.data.images:
        if image.get(KIND) is None:
            continue
        for prop in (META_PREFIX + "file", *FILE_KEYS.values()):
            value = image.get(prop)
            if isinstance(value, str) and value:
                image[prop] = paths.rebased(value, old_blend, new_blend)
