"""Everything that touches bpy: properties, preferences, operators, panels, the World, the timer.

Nothing here imports torch (the worker does, in its own process); numpy and the standard library
are all Blender needs to ship.
"""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.app.handlers import persistent

from . import edit_ops, edit_panel, history, operators, output, panels, prefs, props
from .pump import PUMP
from .thumbnails import THUMBNAILS

_CLASSES = (*prefs.CLASSES, *operators.CLASSES, *panels.CLASSES, *edit_ops.CLASSES, *edit_panel.CLASSES)


@persistent
def _on_load_pre(*_args: object) -> None:
    # A job's scene and Worlds belong to the file being closed.
    PUMP.forget_job()


@persistent
def _on_save_pre(filepath: str = "", *_args: object) -> None:
    # Blender remaps its own relative paths when the file goes to another folder: ours follow.
    _rebase(bpy.data.filepath, filepath)
    PUMP.before_save()


@persistent
def _on_save_post(filepath: str = "", *_args: object) -> None:
    PUMP.after_save()
    if filepath and not (bpy.data.filepath and Path(bpy.data.filepath).resolve() == Path(filepath).resolve()):
        _rebase(filepath, bpy.data.filepath)  # a saved copy: the open file stays where it was


def _rebase(old_blend: str, new_blend: str) -> None:
    if old_blend and new_blend and Path(old_blend).resolve().parent == Path(new_blend).resolve().parent:
        return
    output.rebase_paths(old_blend, new_blend)
    history.rebase_paths(old_blend, new_blend)


_HANDLERS = (("load_pre", _on_load_pre), ("save_pre", _on_save_pre), ("save_post", _on_save_post))


def register() -> None:
    props.register()
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    THUMBNAILS.open()
    for name, handler in _HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if handler not in handlers:
            handlers.append(handler)


def unregister() -> None:
    PUMP.shutdown()  # timer, tasks and worker stop before the classes they use go away
    for name, handler in _HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if handler in handlers:
            handlers.remove(handler)
    THUMBNAILS.close()
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
    props.unregister()
