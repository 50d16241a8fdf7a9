"""What ships: one version everywhere; the leaf modules every layer shares (version, secret
redaction, a child Python's environment); the extension zip holds the add-on and its installer but
nothing that only develops or tests it."""

from __future__ import annotations

import ast
import os
import sys
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
