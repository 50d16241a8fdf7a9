"""The spandrel checks (tests/sr_venv/check_*.py), run in the super-resolution venv .venv-sr.

spandrel imports torchvision, which cannot import beside the dev venv's torch 2.13.0 CPU build, so
these checks run in .venv-sr (torch 2.14.1 + torchvision 0.29.1, made once by .ci/sr_venv.py, which
the README's test command runs): one pytest subprocess for all of them, whose own report is shown
when it fails. In CI a missing venv fails instead of skipping.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SR_VENV = ROOT / ".venv-sr"


def sr_python() -> Path:
    python = SR_VENV / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    if not python.is_file():
        why = f"{SR_VENV} is missing: run `python3 .ci/sr_venv.py` (the README's test command does)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return python


def build_sr_model(path: Path, name: str = "compact_x4", seed: int = 0) -> Path:
    """A tiny random spandrel network (tests/sr_venv/sr_nets.py) saved at `path` (.pth or
    .safetensors), built in .venv-sr: the dev venv has no spandrel."""
    build = (
        "import sys; sys.path.insert(0, 'tests/sr_venv'); from pathlib import Path; from sr_nets import "
        "build, save; save(build(sys.argv[2], seed=int(sys.argv[3])), Path(sys.argv[1]))"
    )
    subprocess.run([str(sr_python()), "-c", build, str(path), name, str(seed)], cwd=ROOT, check=True)
    return path


def run_checks(*names: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [str(sr_python()), "-m", "pytest", "-q", "-c", "tests/sr_venv/pytest.ini"]
    cmd += [f"tests/sr_venv/{n}" for n in names]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed[1]) > 0 and " failed" not in proc.stdout, report


def test_spandrel_models_load_and_tile_without_a_seam():
    run_checks("check_sr_models.py")


def test_upscale_command_2k_to_8k_hdri_and_its_bad_inputs():
    run_checks("check_upscale_cli.py")
