"""Every size of one history entry (issue 15): the 2K panorama a job generated and the 4K/8K/16K
upscales made from it, each with its PNG and HDR files. The World shows the largest one.

An entry's `sizes` collection holds one item per width. A generate result adds its own size and,
when it was upscaled in the same job, the native one it started from (`event["native"]`: path,
width, height, files); an upscale result (metadata["upscale"]["source"] = the PNG it was made from)
joins the entry that holds its source instead of starting a new one. Entries from before sizes
existed have none: their own filepath/hdr fields are then the one size.
"""

from __future__ import annotations

from pathlib import Path

import bpy

from . import paths

SIZE_FIELDS = ("filepath", "hdr_path", "lighting_path")


def add_size(entry: bpy.types.PropertyGroup, path: str, width: int, height: int, files: dict) -> None:
    """Record one size of `entry` (replacing an earlier one of the same width); the largest size's
    files become the entry's own (what Apply Environment shows)."""
    for index, item in enumerate(entry.sizes):
        if item.width == width:
            entry.sizes.remove(index)
            break
    item = entry.sizes.add()
    item.width, item.height = int(width), int(height)
    item.filepath = paths.stored(path)
    item.hdr_path = paths.stored(files.get("hdr") or "")
    item.lighting_path = paths.stored(files.get("lighting") or "")
    # widest first, so the list reads 16K, 8K, ... 2K
    for i in range(len(entry.sizes)):
        for j in range(len(entry.sizes) - 1 - i):
            if entry.sizes[j].width < entry.sizes[j + 1].width:
                entry.sizes.move(j + 1, j)
    top = entry.sizes[0]  # (entry.width/height stay the generation's: Copy Settings gives them back)
    entry.filepath, entry.hdr_path, entry.lighting_path = top.filepath, top.hdr_path, top.lighting_path


def record_sizes(entry: bpy.types.PropertyGroup, event: dict) -> None:
    """The sizes of a generate result: the native one it carries (if upscaled) and its own."""
    entry.sizes.clear()
    native = event.get("native")
    if isinstance(native, dict) and native.get("path"):
        add_size(
            entry, native["path"], native.get("width", 0), native.get("height", 0), native.get("files") or {}
        )
    add_size(
        entry, event["path"], _int(event.get("width")), _int(event.get("height")), event.get("files") or {}
    )


def upscale_source(event: dict) -> str | None:
    """The PNG an upscale result was made from (absolute), or None for any other result."""
    upscale = (event.get("metadata") or {}).get("upscale")
    source = upscale.get("source") if isinstance(upscale, dict) else None
    return str(source) if source else None


def entry_of(scene: bpy.types.Scene, png: str) -> bpy.types.PropertyGroup | None:
    """The history entry one of whose sizes is the file `png`."""
    target = _same(png)
    for entry in scene.dit360.history:
        files = [item.filepath for item in entry.sizes] or [entry.filepath]
        if any(_same(paths.resolve(f)) == target for f in files if f):
            return entry
    return None


def merge_upscale(scene: bpy.types.Scene, event: dict) -> bpy.types.PropertyGroup | None:
    """Add an upscale result to the entry of its source; None when no entry holds the source (the
    caller then records it as an entry of its own)."""
    source = upscale_source(event)
    entry = entry_of(scene, source) if source else None
    if entry is None:
        return None
    if not len(entry.sizes):  # an entry from before sizes: its own file is its first size
        add_size(entry, paths.resolve(entry.filepath), entry.width, entry.height, _entry_files(entry))
    add_size(
        entry, event["path"], _int(event.get("width")), _int(event.get("height")), event.get("files") or {}
    )
    return entry


def smallest_file(entry: bpy.types.PropertyGroup) -> str:
    """The stored path of the entry's smallest size (its native panorama): what its thumbnail and an
    upscale start from; a 16K PNG would take seconds and a gigabyte to thumbnail."""
    return entry.sizes[len(entry.sizes) - 1].filepath if len(entry.sizes) else entry.filepath


def size_labels(entry: bpy.types.PropertyGroup) -> list[str]:
    """'16K', '4K', '2K' ... of the entry's sizes, widest first (the entry's own size without any)."""
    widths = [item.width for item in entry.sizes] or [entry.width]
    return [f"{round(w / 1024)}K" if w >= 1024 else f"{w}px" for w in widths]


def rebase(entry: bpy.types.PropertyGroup, old_blend: str, new_blend: str) -> None:
    for item in entry.sizes:
        for field in SIZE_FIELDS:
            setattr(item, field, paths.rebased(getattr(item, field), old_blend, new_blend))


def _entry_files(entry: bpy.types.PropertyGroup) -> dict:
    return {k: paths.resolve(v) for k, v in (("hdr", entry.hdr_path), ("lighting", entry.lighting_path)) if v}


def _same(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except OSError:
        return str(path)


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
