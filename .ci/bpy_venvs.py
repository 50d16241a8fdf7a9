"""The extra Blender versions the tests run on: one venv per bpy release, each installed once.

    python3 .ci/bpy_venvs.py            # create or check .venv-bpy42 and .venv-bpy53, print their Pythons

The dev venv (.venv, vendor_setup.py --dev) has bpy 4.5 LTS and runs the whole Blender suite; these
venvs hold bpy (and the numpy it pins) alone, for the smoke set (tests/test_blender_versions.py):
4.2 LTS on Python 3.11 and the newest 5.x on Python 3.13 (bpy ships for one Python per release). The
worker those scenarios start stays the dev venv's Python. A venv that already has its bpy is left
as it is, so a machine that ran this once pays nothing the next time. Standard library only.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> (Python version bpy needs, pip requirement)
VERSIONS = {
    ".venv-bpy42": ("3.11", "bpy==4.2.*"),
    ".venv-bpy53": ("3.13", "bpy==5.3.*"),
}


def find_python(version: str) -> str:
    """An interpreter of `version`: pythonX.Y on PATH, else pyenv's newest X.Y.* (where CI has it)."""
    candidates = [shutil.which(f"python{version}")]
    pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    if shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "root"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            pyenv_root = out.stdout.strip()
    found = glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*", "bin", f"python{version}"))
    candidates += sorted(found, key=lambda p: _release(Path(p).parents[1].name), reverse=True)
    for python in candidates:
        if python and _version_of(python) == version:
            return python
    raise SystemExit(
        f"no Python {version} found (PATH or pyenv) for bpy: install one, e.g. `pyenv install {version}`"
    )


def _release(name: str) -> tuple[int, ...]:
    """(3, 13, 1) from pyenv's folder name "3.13.1"; names with letters (3.13.0rc1) sort first."""
    return tuple(int(x) if x.isdigit() else -1 for x in name.split("."))


def _version_of(python: str) -> str | None:
    out = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
    )
    return out.stdout.strip() if out.returncode == 0 else None


def installed_bpy(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('bpy'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def ensure(folder: str, version: str, requirement: str) -> Path:
    """The venv's python, with `requirement` installed (created and installed only when missing)."""
    venv = ROOT / folder
    prefix = requirement.split("==", 1)[1].rstrip("*")
    have = installed_bpy(venv)
    if have is not None and have.startswith(prefix):
        print(f"{folder}: bpy {have} (already installed)", flush=True)
        return venv / "bin" / "python"
    if venv.exists():
        shutil.rmtree(venv)
    python = find_python(version)
    print(f"{folder}: creating with {python}, installing {requirement}", flush=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, requirement], check=True, stdin=subprocess.DEVNULL)
    print(f"{folder}: bpy {installed_bpy(venv)}", flush=True)
    return venv / "bin" / "python"


def main() -> int:
    for folder, (version, requirement) in VERSIONS.items():
        ensure(folder, version, requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
