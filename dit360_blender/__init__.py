"""DiT360 panorama worlds for Blender.

This package is both the Blender extension and the home of the worker's torch pipeline. Importing
it imports neither bpy nor torch: the CLI and the worker import `pipeline` directly, and Blender
imports the Blender-side modules only when it registers the add-on.
"""

from ._version import __version__ as __version__


def register() -> None:
    """Blender calls this when the add-on is enabled. The Blender-side modules (and bpy with them) are
    imported only here, so the worker and the CLI can import this package outside Blender."""
    from .blender import register as _register

    _register()


def unregister() -> None:
    from .blender import unregister as _unregister

    _unregister()
