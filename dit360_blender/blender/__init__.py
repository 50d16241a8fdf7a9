"""Everything that touches bpy: properties, preferences, operators, panels, the World, the timer.

Nothing here imports torch (the worker does, in its own process); numpy and the standard library
are all Blender needs to ship.
"""

from __future__ import annotations

import bpy
from bpy.app.handlers import persistent

from . import operators, panels, prefs, props
from .pump import PUMP
from .thumbnails import THUMBNAILS

_CLASSES = (*prefs.CLASSES, *operators.CLASSES, *panels.CLASSES)


@persistent
def _on_load_pre(*_args: object) -> None:
    # A job's scene and Worlds belong to the file being closed.
    PUMP.forget_job()


def register() -> None:
    props.register()
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    THUMBNAILS.open()
    if _on_load_pre not in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.append(_on_load_pre)


def unregister() -> None:
    PUMP.shutdown()  # timer, tasks and worker stop before the classes they use go away
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
    THUMBNAILS.close()
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
    props.unregister()
