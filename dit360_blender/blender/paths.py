"""How the add-on keeps file paths in a .blend: relative to the .blend's folder ("//dit360/x.hdr") when
the file lies under it, as Blender does with Relative Paths on, so a project folder can be moved or
sent; absolute for folders outside it (a user's renders folder stays where it is).

Blender remaps its own paths (an image's filepath) when a file is saved under another folder; the
strings we keep (history entries, the sibling files of an image) are remapped by their owners with
`rebased`, the same way.
"""

from __future__ import annotations

from pathlib import Path

import bpy


def stored(path: str | Path, blend: str | None = None) -> str:
    """The form of `path` to keep in the .blend saved at `blend` (default: the current file)."""
    blend = bpy.data.filepath if blend is None else blend
    if not str(path):
        return ""
    absolute = Path(resolve(str(path), blend))
    if not blend:
        return str(absolute)
    folder = Path(blend).resolve().parent
    try:
        inside = absolute.resolve().relative_to(folder)
    except ValueError:
        return str(absolute)
    return "//" + inside.as_posix()


def resolve(text: str, blend: str | None = None) -> str:
    """The absolute path of a kept path ('//' relative to the folder of `blend`, default the current
    file); '' stays ''."""
    blend = bpy.data.filepath if blend is None else blend
    if text.startswith("//") and blend:
        return str(Path(blend).resolve().parent / text[2:])
    return text


def rebased(text: str, old_blend: str, new_blend: str) -> str:
    """A kept path of a file saved at `old_blend`, as a file saved at `new_blend` keeps it."""
    return stored(resolve(text, old_blend), new_blend) if text else text
