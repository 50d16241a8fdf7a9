"""Scripting API for use inside Blender: `generate_world(prompt, ..., wait=True)` and friends.

Importing this module imports bpy: use it from Blender (or the bpy module) only. See
`blender/api.py` for the documentation.
"""

from .blender.api import GenerationError, cancel, generate_world, is_busy, set_world_image, stop_worker

__all__ = ["GenerationError", "cancel", "generate_world", "is_busy", "set_world_image", "stop_worker"]
