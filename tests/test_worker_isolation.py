"""The worker runs isolated from the user's site-packages (`python -s`), as Blender's Python with
the vendor folder on PYTHONPATH does in the add-on.

The test plays that setup for real: the base interpreter of the dev venv (no venv, so its user
site is on by default) with the venv's site-packages as the vendor folder, and a user site
(PYTHONUSERBASE) holding a `usercustomize` and a `.pth` file that puts a broken `einops` first
on sys.path, each leaving a marker file when it runs.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dit360_blender.client import WorkerClient
from dit360_blender.launch import worker_env

BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
# the packages of the dev venv play the vendor folder; without a venv they are the interpreter's own
VENDOR = Path(sysconfig.get_paths()["purelib"]) if sys.prefix != sys.base_prefix else None


def _user_site(env: dict[str, str]) -> Path:
    code = "import site; print(site.ENABLE_USER_SITE, site.getusersitepackages())"
    enabled, path = subprocess.check_output([BASE_PYTHON, "-c", code], env=env, text=True).split()
    if enabled != "True":
        pytest.skip("this interpreter has user site-packages turned off anyway")
    return Path(path)


def _plant(root: Path) -> tuple[dict[str, str], Path]:
    """A user site with a usercustomize and a shadowing einops; returns the env and the marker folder."""
    env = worker_env(VENDOR, extra={"PYTHONUSERBASE": str(root / "userbase"), "HF_HUB_OFFLINE": "1"})
    site_dir = _user_site(env)
    site_dir.mkdir(parents=True)
    markers = root / "markers"
    markers.mkdir()
    (site_dir / "usercustomize.py").write_text(f"open({str(markers / 'usercustomize')!r}, 'w').close()\n")
    shadow = root / "shadow" / "einops"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        f"open({str(markers / 'einops')!r}, 'w').close()\n"
        "raise ImportError('the einops of the user site shadowed the vendored one')\n"
    )
    (site_dir / "shadow.pth").write_text(f"import sys; sys.path.insert(0, {str(root / 'shadow')!r})\n")
    return env, markers


def test_worker_does_not_import_the_user_site(tmp_path):
    env, markers = _plant(tmp_path)
    # the planted files do act on a plain start of this interpreter (what the worker used to be)
    probe = subprocess.run([BASE_PYTHON, "-c", "import einops"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "shadowed" in probe.stderr
    assert sorted(p.name for p in markers.iterdir()) == ["einops", "usercustomize"]
    for marker in markers.iterdir():
        marker.unlink()

    extra = {k: env[k] for k in ("PYTHONUSERBASE", "HF_HUB_OFFLINE")}
    client = WorkerClient(python=BASE_PYTHON, vendor_dir=VENDOR, log_dir=tmp_path / "logs", extra_env=extra)
    try:
        client.start(timeout=180)
        ready = client.wait_for_device(timeout=180)  # the real torch was imported
    finally:
        client.close()
    assert ready["torch_version"] and ready["pid"]
    assert list(markers.iterdir()) == []  # neither usercustomize nor the shadowing einops ran
