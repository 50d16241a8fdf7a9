"""The pipeline's import boundaries: it knows no Blender, no sockets, no child processes, no protocol;
its model-files package imports no torch (the worker's download child and `doctor` run it without).

Every module's imports are read with ``ast`` (relative ones resolved against the module's package),
so a forbidden import fails here even when it sits inside a function; a subprocess then imports
the model-files package for real, which also catches torch arriving through another module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "dit360_blender" / "pipeline"
MODEL_FILES = PIPELINE / "model_files"

PIPELINE_FORBIDDEN = ("bpy", "socket", "subprocess", "dit360_blender.protocol")
# model_files: the standard library, huggingface_hub (and the HTTP client it raises errors of),
# the pipeline's torch-free errors, the package's stdlib-only secret scrubber and its own modules;
# nothing else.
MODEL_FILES_ALLOWED = (
    "huggingface_hub",
    "httpx2",
    "dit360_blender.pipeline.errors",
    "dit360_blender.pipeline.model_files",
    "dit360_blender.redact",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _within(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


PIPELINE_FILES = sorted(PIPELINE.rglob("*.py"))
MODEL_FILES_FILES = sorted(MODEL_FILES.rglob("*.py"))


def test_the_boundary_check_sees_imports():
    # the checks below are only as good as the import reader: it must see relative, nested and
    # "from .. import x" imports, resolved to absolute names
    sample = PIPELINE / "dit360.py"
    assert "dit360_blender.pipeline.sampling" in imported_modules(sample)
    assert "torch" in imported_modules(sample)
    assert "dit360_blender.pipeline.errors" in imported_modules(MODEL_FILES / "local_search.py")
    assert len(MODEL_FILES_FILES) >= 5 and MODEL_FILES / "download.py" in PIPELINE_FILES


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: str(p.relative_to(PIPELINE)))
def test_pipeline_imports_no_blender_socket_process_or_protocol(path: Path):
    bad = sorted(m for m in imported_modules(path) if _within(m, PIPELINE_FORBIDDEN))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", MODEL_FILES_FILES, ids=lambda p: p.name)
def test_model_files_import_only_the_stdlib_the_hub_client_and_pipeline_errors(path: Path):
    bad = sorted(
        m
        for m in imported_modules(path)
        if m.split(".")[0] not in sys.stdlib_module_names
        and m != "__future__"
        and not m.startswith("__future__.")
        and not _within(m, MODEL_FILES_ALLOWED)
    )
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_importing_the_model_files_loads_no_torch():
    modules = [_module_name(p) for p in MODEL_FILES_FILES]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('torch', 'numpy', 'safetensors', 'einops', 'bpy') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
