"""DiT360 panorama worlds for Blender.

This package is both the Blender extension and the home of the worker's torch pipeline. Importing
it imports neither bpy nor torch: the CLI and the worker import `pipeline` directly, and Blender
imports the Blender-side modules only when it registers the add-on.
"""

__version__ = "0.1.0"
