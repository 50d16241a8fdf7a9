"""The package version. A leaf module (it imports nothing) so the client, the worker and the CLI can
read it without importing the add-on's `__init__`; tests/test_packaging.py keeps it equal to the
versions in blender_manifest.toml and pyproject.toml."""

__version__ = "0.1.0"
