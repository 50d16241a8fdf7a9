"""The super-resolution test venv: .venv-sr with spandrel and a torchvision that imports, made once.

    python3 .ci/sr_venv.py          # create or check .venv-sr (requirements/sr_test.txt), print its Python

spandrel imports torchvision, and the dev venv's torch 2.13.0 CPU wheel has no torchvision that
imports beside it; so the tests of the spandrel loader, the tiled upscale of real spandrel
architectures and the upscale command run in this venv, started as a subprocess by the main suite
(tests/test_upscale_models.py). A venv whose packages already match the pins is left as it is, so a
machine that ran this once pays nothing the next time (~90 s and 5.5 GB the first time, with torch
and torchvision from the machine's local disk). Standard library only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-sr"
REQUIREMENTS = ROOT / "requirements" / "sr_test.txt"
PYTHON_VERSION = "3.11"  # the dev venv's: the same pure-Python project code runs in both

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bpy_venvs import find_python  # noqa: E402  (the same interpreter search as the bpy venvs)


def pins() -> dict[str, str]:
    """name -> version of each `name==version` line of requirements/sr_test.txt."""
    out = {}
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==", 1)
            out[name.lower()] = version
    return out


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def installed(python: Path, names: list[str]) -> dict[str, str | None]:
    """The installed version of each distribution (None when missing), and whether spandrel imports."""
    script = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "try:\n"
        "    import spandrel  # imports torchvision: the check that matters\n"
        "    out['__imports__'] = True\n"
        "except Exception as exc:\n"
        "    out['__imports__'] = repr(exc)\n"
        "print(json.dumps(out))\n"
    )
    if not python.is_file():
        return {}
    proc = subprocess.run([str(python), "-c", script, *names], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def up_to_date(python: Path, wanted: dict[str, str]) -> bool:
    have = installed(python, list(wanted))
    if have.get("__imports__") is not True:
        return False
    # local version labels (torch 2.14.1+cu130) satisfy a plain pin, as pip reads them
    return all((have.get(n) or "").split("+", 1)[0] == v for n, v in wanted.items())


def ensure() -> Path:
    wanted = pins()
    python = venv_python()
    if up_to_date(python, wanted):
        print(f".venv-sr: up to date ({', '.join(f'{n} {v}' for n, v in wanted.items())})", flush=True)
        return python
    if not python.is_file():
        base = find_python(PYTHON_VERSION)
        print(f".venv-sr: creating with {base}", flush=True)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    print(f".venv-sr: installing {REQUIREMENTS.name}", flush=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True, stdin=subprocess.DEVNULL)
    if not up_to_date(python, wanted):
        have = installed(python, list(wanted))
        raise SystemExit(f".venv-sr: after the install the packages still do not match the pins: {have}")
    print(f".venv-sr: ready ({python})", flush=True)
    return python


if __name__ == "__main__":
    ensure()
