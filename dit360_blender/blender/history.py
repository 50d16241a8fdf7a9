"""The Scene's history of generated environments: record, re-apply, copy settings back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import bpy

from ..params import PARAMS
from . import lighting, paths, resolution
from .param_props import enum_identifier

MAX_ENTRIES = 100


# the panel's generation settings an entry keeps (the table's scene parameters; the folder is the file's)
_RECORDED = tuple(p for p in PARAMS if p.blender == "scene" and p.name != "output_dir")


def record(scene: bpy.types.Scene, params: dict, event: dict, image: bpy.types.Image, seconds: float) -> None:
    """Add a worker result (`event`: its path, files and metadata) shown as `image` to the history."""
    settings = scene.dit360
    path = event["path"]
    metadata = event.get("metadata") or {}
    files = event.get("files") or {}
    merged = resolution.merge_upscale(scene, event)
    if merged is not None:  # an upscale of an entry's panorama: one more size of that entry
        merged.image_name = image.name
        merged.seam_json = lighting.compact_json(metadata.get("seam"))
        merged.lighting_json = lighting.compact_json(metadata.get("lighting"))
        settings.history_index = list(settings.history).index(merged)
        return
    entry = settings.history.add()
    for p in _RECORDED:
        if p.name not in params:
            continue  # a parameter the job's kind does not take (an edit has no size of its own)
        value = params[p.name]
        setattr(entry, p.name, enum_identifier(value) if p.kind == "choice" else value)
    # relative to the .blend when under its folder: a moved or sent project keeps its history
    entry.filepath = paths.stored(path)
    entry.hdr_path = paths.stored(files.get("hdr") or "")
    entry.lighting_path = paths.stored(files.get("lighting") or "")
    entry.seam_json = lighting.compact_json(metadata.get("seam"))
    entry.lighting_json = lighting.compact_json(metadata.get("lighting"))
    entry.image_name = image.name
    entry.created = time.strftime("%Y-%m-%d %H:%M:%S")
    entry.seconds = seconds
    entry.name = Path(path).stem
    resolution.record_sizes(entry, event)  # the World shows the largest; the entry keeps each
    _record_edit(entry, event)
    # newest first: move the new entry to the top
    settings.history.move(len(settings.history) - 1, 0)
    while len(settings.history) > MAX_ENTRIES:
        settings.history.remove(len(settings.history) - 1)
    settings.history_index = 0


def _record_edit(entry: bpy.types.PropertyGroup, event: dict) -> None:
    """An edit's entry (issue 14) is a child of its source: the source's file, the mask kind and the
    edit's values; its size is the result's (the source's), not the panel's."""
    edit = (event.get("metadata") or {}).get("edit")
    if not isinstance(edit, dict):
        return
    entry.edit_kind = str(edit.get("mask_kind", ""))
    entry.parent = paths.stored(str(edit.get("source") or edit.get("photo") or ""))
    entry.edit_json = json.dumps(edit, separators=(",", ":"), default=str)
    if isinstance(event.get("width"), int) and isinstance(event.get("height"), int):
        entry.width, entry.height = event["width"], event["height"]


def _json(text: str) -> dict | None:
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def entry_event(entry: bpy.types.PropertyGroup) -> dict:
    """The entry as a worker result (path, files, metadata): what `lighting.apply_result` takes."""
    metadata: dict = {
        "prompt": entry.prompt, "seed": entry.seed, "steps": entry.steps, "guidance": entry.guidance,
        "lora_strength": entry.lora_strength, "width": entry.width, "height": entry.height,
    }  # fmt: skip
    for key, text in (("seam", entry.seam_json), ("lighting", entry.lighting_json)):
        data = _json(text)
        if data is not None:
            metadata[key] = data
    files = {
        k: paths.resolve(v) for k, v in (("hdr", entry.hdr_path), ("lighting", entry.lighting_path)) if v
    }
    return {"path": paths.resolve(entry.filepath), "files": files, "metadata": metadata}


def rebase_paths(old_blend: str, new_blend: str) -> None:
    """The file is saved at `new_blend`: every scene's history paths follow, as Blender's own do."""
    for scene in bpy.data.scenes:
        for entry in scene.dit360.history:
            for field in ("filepath", "hdr_path", "lighting_path", "parent"):
                setattr(entry, field, paths.rebased(getattr(entry, field), old_blend, new_blend))
            resolution.rebase(entry, old_blend, new_blend)


def entry_summary(entry: bpy.types.PropertyGroup) -> tuple[tuple[str, bool | None], tuple[str, bool | None]]:
    """(seam line, ok), (sun line, found) of an entry, as the panel shows them."""
    return lighting.seam_text(_json(entry.seam_json)), lighting.sun_text(_json(entry.lighting_json))


def apply(scene: bpy.types.Scene, entry: bpy.types.PropertyGroup) -> bpy.types.Image | None:
    """Show the entry's environment in the scene's World (created if there is none), with its Sun;
    None when its files are gone."""
    if scene.world is None:
        scene.world = bpy.data.worlds.new("World")
    try:
        image = lighting.apply_result(scene.world, entry_event(entry))
    except FileNotFoundError:
        return None
    lighting.sync_suns(scene.world)
    entry.image_name = image.name
    return image


def copy_to_panel(scene: bpy.types.Scene, entry: bpy.types.PropertyGroup) -> None:
    settings = scene.dit360
    settings.randomize_seed = False  # the point of copying a seed is to get the same world again
    for p in _RECORDED:
        setattr(settings, p.name, getattr(entry, p.name))
