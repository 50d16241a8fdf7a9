"""Build the installable extension zip with Blender's own builder, and validate it.

    .venv/bin/python build_extension.py                # bpy module (the dev venv)
    blender -b --factory-startup --python build_extension.py -- [--output-dir dist]

Blender wants `blender_manifest.toml` next to the add-on's `__init__.py` at the top of the zip,
while this repository keeps the manifest at its root and the add-on in `dit360_blender/`. So the
build stages a folder holding the manifest, the contents of `dit360_blender/`, `vendor_setup.py`
(the add-on's Install Dependencies button runs it) and the `requirements/runtime.txt` it installs,
then runs `extension build` and `extension validate` from Blender's extensions add-on (`bl_pkg`) on
it. What only develops or tests the add-on stays out: tests, caches and virtual environments are
never staged, nor `requirements/dev.txt`; the manifest's `paths_exclude_pattern` drops `bench/`.
Prints the zip's path; exit code 0 on success.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "dit360_blender"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", ".ruff_cache", "*.zip")


def stage(dest: Path) -> Path:
    """Copy what the zip holds into `dest` (which must not exist) and return it."""
    shutil.copytree(PACKAGE, dest, ignore=IGNORE)
    shutil.copy2(ROOT / "blender_manifest.toml", dest / "blender_manifest.toml")
    shutil.copy2(ROOT / "vendor_setup.py", dest / "vendor_setup.py")
    (dest / "requirements").mkdir()
    shutil.copy2(ROOT / "requirements" / "runtime.txt", dest / "requirements" / "runtime.txt")
    for extra in ("LICENSE", "LICENSE.txt", "README.md"):
        if (ROOT / extra).is_file():
            shutil.copy2(ROOT / extra, dest / extra)
    return dest


def _import_bpy() -> None:
    """Import bpy with Blender's user folders in a temporary place (the bpy module would otherwise
    write into ~/.config/blender); inside a real Blender bpy is already there."""
    if "bpy" not in sys.modules and "BLENDER_USER_RESOURCES" not in os.environ:
        os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="dit360-build-user-")
    import bpy  # noqa: F401


def build(output_dir: Path) -> Path:
    _import_bpy()
    from bl_pkg import bl_extension_cli  # Blender's extensions add-on; on sys.path once bpy is loaded

    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dit360-stage-") as tmp:
        staged = stage(Path(tmp) / "dit360_blender")
        if bl_extension_cli.cli_extension_handler(["validate", str(staged)]) != 0:
            raise SystemExit("the staged extension does not validate (see above)")
        rc = bl_extension_cli.cli_extension_handler(
            ["build", "--source-dir", str(staged), "--output-dir", str(output_dir)]
        )
        if rc != 0:
            raise SystemExit(f"extension build failed (exit {rc})")
    zips = sorted(output_dir.glob("dit360_blender-*.zip"), key=lambda p: p.stat().st_mtime)
    if not zips:
        raise SystemExit(f"the builder wrote no zip into {output_dir}")
    built = zips[-1]
    if bl_extension_cli.cli_extension_handler(["validate", str(built)]) != 0:
        raise SystemExit(f"{built} does not validate")
    return built


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "dist", help="where the zip goes (dist/)")
    args = parser.parse_args(argv)
    built = build(args.output_dir.resolve())
    print(f"built {built}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
