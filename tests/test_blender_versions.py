"""The other Blender versions users have: bpy 4.2 LTS (Python 3.11) and the newest 5.x (bpy 5.3,
Python 3.13), each in its own venv made by .ci/bpy_venvs.py. The smoke set of the 4.5 suite
(tests/test_blender_extension.py, whose assertions it reuses) runs on each: install the built zip,
register twice, generate through the operator with the driven timer, the World's chain, undo, and a
Cycles render lit by the generated World. The worker runs in the dev venv (Python 3.11), which is
what "Existing Environment" does with a Python other than Blender's.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import test_blender_extension as suite
from test_blender_extension import build_zip, run_scenario

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")

ROOT = Path(__file__).resolve().parents[1]
# version -> (venv made by .ci/bpy_venvs.py, the Python that bpy release is built for)
VERSIONS = {"4.2": (".venv-bpy42", [3, 11]), "5.3": (".venv-bpy53", [3, 13])}
SMOKE = ["generate", "undo", "render_cycles"]


@pytest.fixture(scope="module")
def zip_path(tmp_path_factory) -> str:
    return str(build_zip(tmp_path_factory.mktemp("blender-versions") / "dist"))


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def smoke(request, zip_path, tiny_models, tmp_path_factory) -> dict:
    version = request.param
    folder, _python = VERSIONS[version]
    python = ROOT / folder / "bin" / "python"
    if not python.is_file():
        why = f"{folder} is missing: `python3 .ci/bpy_venvs.py` makes it"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI must test every version, never skip one
        pytest.skip(why)
    work = tmp_path_factory.mktemp(f"blender-{version}")
    cfg = {"zip": zip_path, "models": str(tiny_models["root"]), "work": str(work),
           "worker_python": sys.executable, "only": SMOKE}  # fmt: skip
    results = run_scenario("scenario_main.py", cfg, f"smoke-{version}", python=str(python))
    results["_version"] = version
    return results


def test_it_is_the_blender_and_python_it_says(smoke):
    blender, python = suite.step(smoke, "install")["blender"]
    assert ".".join(map(str, blender[:2])) == smoke["_version"]
    assert python == VERSIONS[smoke["_version"]][1]


def test_install_validates_and_registers_twice(smoke):
    suite.test_zip_installs_validates_and_registers_twice(smoke)


def test_generate_reports_progress_in_order(smoke):
    suite.test_operator_returns_at_once_and_progress_reaches_the_window_manager_in_order(smoke)


def test_world_chain_and_the_users_nodes(smoke):
    suite.test_world_gets_the_chain_pointing_at_the_written_image(smoke)
    suite.test_user_nodes_survive_and_nothing_is_left_behind(smoke)


def test_undo(smoke):
    suite.test_undo_restores_the_previous_world(smoke)


def test_cycles_render_is_lit_by_the_world(smoke):
    suite.test_cycles_sphere_is_lit_by_the_generated_world(smoke)
