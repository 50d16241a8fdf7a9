"""Every error code the package can produce is declared in the protocol, and every declared code is
produced somewhere: the pipeline's DiT360Error codes, the worker's classification of failures and
refusals, the client's own failures and the Blender side's. Read from the source (ast), so a code
written into any module is seen without running it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dit360_blender import protocol as P
from dit360_blender.pipeline import errors

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dit360_blender"
# Callables whose first argument is an error code (the protocol's, the client's, the Blender side's).
CODE_FIRST = {"error", "ProtocolError", "WorkerError", "JobError", "GenerationError", "TransferError"}


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and func.attr != "error":  # logger.error(...) logs a text
        return func.attr
    return None


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def codes_in(tree: ast.AST) -> set[str]:
    """Codes written as literals: error(CODE, ...)-style calls, code=CODE keywords, `code = CODE`
    class attributes (DiT360Error subclasses) and the (CODE, message, ...) returns of `classify`."""
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if _name(node.func) in CODE_FIRST and node.args:
                found.add(_literal(node.args[0]))
            found.update(_literal(k.value) for k in node.keywords if k.arg == "code")
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "code" for t in stmt.targets
                ):
                    found.add(_literal(stmt.value))
        elif isinstance(node, ast.FunctionDef) and node.name == "classify":
            for ret in ast.walk(node):
                if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Tuple) and ret.value.elts:
                    found.add(_literal(ret.value.elts[0]))
    return {c for c in found if c is not None}


def produced_codes() -> dict[str, set[str]]:
    """Code -> the modules that produce it (bench/ is a developer tool, not part of the add-on)."""
    where: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("bench/"):
            continue
        for code in codes_in(ast.parse(path.read_text(encoding="utf-8"))):
            where.setdefault(code, set()).add(rel)
    return where


def test_the_scan_sees_each_kind_of_code():
    source = """
class E(Exception):
    code = "from_class"
def classify(exc):
    return "from_classify", "text", "", False
error("from_error", "text")
raise GenerationError("from_generation", "text")
logger.error("not a code %s", 1)
emit(event="error", code="from_keyword")
"""
    assert codes_in(ast.parse(source)) == {
        "from_class", "from_classify", "from_error", "from_generation", "from_keyword"
    }  # fmt: skip


def test_every_produced_code_is_declared():
    undeclared = {code: sorted(m) for code, m in produced_codes().items() if code not in P.ERROR_CODES}
    assert not undeclared, f"declare these in protocol.py's error lists: {undeclared}"


@pytest.mark.parametrize("declared", ["PROTOCOL_ERRORS", "JOB_ERRORS", "CLIENT_ERRORS"])
def test_every_declared_code_is_produced_somewhere(declared):
    produced = produced_codes()
    assert [code for code in getattr(P, declared) if code not in produced] == []


def test_every_pipeline_error_is_a_declared_job_error():
    def subclasses(cls: type) -> list[type]:
        return [cls] + [s for sub in cls.__subclasses__() for s in subclasses(sub)]

    assert {cls.code for cls in subclasses(errors.DiT360Error)} <= set(P.JOB_ERRORS)


def test_the_lists_do_not_overlap():
    assert len(P.ERROR_CODES) == len(set(P.ERROR_CODES))


def test_an_undeclared_code_is_refused_when_the_message_is_built():
    assert P.error("cancelled", "Stopped.")["code"] == "cancelled"
    with pytest.raises(ValueError, match="not_a_code"):
        P.error("not_a_code", "text")
