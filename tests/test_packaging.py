"""What ships: one version everywhere, and the extension zip holds the add-on and its installer but
nothing that only develops or tests it."""

from __future__ import annotations

from pathlib import Path

import tomllib

from dit360_blender._version import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_the_manifest_and_pyproject():
    manifest = tomllib.loads((ROOT / "blender_manifest.toml").read_text(encoding="utf-8"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert manifest["version"] == pyproject["project"]["version"] == __version__


def test_version_module_imports_nothing():
    source = (ROOT / "dit360_blender" / "_version.py").read_text(encoding="utf-8")
    assert not any(line.startswith(("import ", "from ")) for line in source.splitlines())
