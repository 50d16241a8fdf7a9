"""What ships: one version everywhere; the leaf modules every layer shares (version, secret
redaction, a child Python's environment); the extension zip holds the add-on and its installer but
nothing that only develops or tests it."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from dit360_blender._version import __version__
from dit360_blender.launch import worker_env
from dit360_blender.redact import env_secrets, redact

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_the_manifest_and_pyproject():
    manifest = tomllib.loads((ROOT / "blender_manifest.toml").read_text(encoding="utf-8"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert manifest["version"] == pyproject["project"]["version"] == __version__


def test_version_module_imports_nothing():
    source = (ROOT / "dit360_blender" / "_version.py").read_text(encoding="utf-8")
    assert not any(line.startswith(("import ", "from ")) for line in source.splitlines())


@pytest.mark.parametrize("module", ["redact.py", "launch.py"])
def test_shared_leaf_modules_import_only_the_standard_library(module):
    """Every layer imports these (the pipeline included), so they may import nothing of the package."""
    tree = ast.parse((ROOT / "dit360_blender" / module).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not node.level, node.module
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        assert all(n.split(".")[0] in sys.stdlib_module_names or n == "__future__" for n in names), names


def test_redact_blanks_every_secret_and_skips_blank_ones():
    text = "token hf_abc123 and tok-XYZ-0123456789 and hf_abc123 again"
    assert redact(text, [None, "", "  ", " hf_abc123 ", "tok-XYZ-0123456789"]) == (
        "token *** and *** and *** again"
    )
    env = {"HF_TOKEN": " hf_1 ", "HUGGING_FACE_HUB_TOKEN": "  "}
    assert env_secrets(env) == ["hf_1"]


def test_worker_env_puts_the_vendor_folder_and_the_package_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = worker_env(tmp_path / "vendor", "  hf_abc  ", {"HF_HUB_OFFLINE": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "vendor"), str(ROOT), "/elsewhere"]
    assert env["HF_TOKEN"] == "hf_abc" and env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONSAFEPATH"] == "1" and env["HF_HUB_DISABLE_TELEMETRY"] == "1"


def test_worker_env_asks_for_expandable_cuda_segments_on_linux_only_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert worker_env(None)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # the user's own
    assert worker_env(None)["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr(sys, "platform", "win32")  # PyTorch has them on Linux only
    assert "PYTORCH_CUDA_ALLOC_CONF" not in worker_env(None)


# -- the extension zip ------------------------------------------------------------------------------


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[;@ ]", req, maxsplit=1)[0].lower()


def _requirement_lines(name: str) -> list[str]:
    text = (ROOT / "requirements" / name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def zip_path(tmp_path_factory) -> Path:
    if importlib.util.find_spec("bpy") is None:
        pytest.skip("building the zip needs the bpy module (Blender's own builder)")
    out = tmp_path_factory.mktemp("zip")
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(out / "bpy-user"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build_extension.py"), "--output-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return next(out.glob("dit360_blender-*.zip"))


def test_zip_ships_the_installer_with_its_runtime_requirements_and_nothing_for_developers(zip_path):
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        code = {n: zf.read(n) for n in names if n.endswith((".py", ".txt", ".toml"))}
    assert {"vendor_setup.py", "requirements/runtime.txt"} <= names
    assert code["requirements/runtime.txt"] == (ROOT / "requirements" / "runtime.txt").read_bytes()
    assert not any(n.startswith(("bench/", "tests/")) for n in names), sorted(names)
    assert "requirements/dev.txt" not in names
    runtime = {_name(r) for r in _requirement_lines("runtime.txt")}
    test_only = [r for r in _requirement_lines("dev.txt") if _name(r) not in runtime]
    assert {"pytest", "ruff", "bpy", "diffusers", "peft"} <= {_name(r) for r in test_only}
    for name, data in code.items():  # no test-only pin is written down anywhere in what ships
        assert not any(pin.encode() in data for pin in test_only), name


def test_the_zipped_installer_reads_its_runtime_requirements(zip_path, tmp_path):
    addon = tmp_path / "addon"
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(addon)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIT360_TORCH_SPEC")}
    cmd = [sys.executable, str(addon / "vendor_setup.py"), "--target", str(tmp_path / "vendor")]
    proc = subprocess.run([*cmd, "--torch", "local", "--dry-run"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pip = next(line for line in proc.stdout.splitlines() if " -m pip install " in line)
    for req in _requirement_lines("runtime.txt"):
        assert req in pip
