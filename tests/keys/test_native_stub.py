"""The `.pyi` stub of the compiled module names exactly what the module exports, with the same parameters."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from cloakbeam import _native

STUB = Path(__file__).resolve().parents[2] / "_native.pyi"


def _stub() -> tuple[dict[str, list[str]], set[str]]:
    tree = ast.parse(STUB.read_text())
    funcs: dict[str, list[str]] = {}
    others: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            funcs[node.name] = [a.arg for a in node.args.args]
        elif isinstance(node, ast.ClassDef):
            others.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            others.add(node.target.id)
    return funcs, others


def test_stub_names_match_the_compiled_module():
    funcs, others = _stub()
    exported = {n for n in dir(_native) if not n.startswith("_")}
    assert exported == set(funcs) | others


def test_stub_signatures_match_the_compiled_functions():
    funcs, _ = _stub()
    for name, params in funcs.items():
        sig = inspect.signature(getattr(_native, name))
        assert list(sig.parameters) == params, name


def test_cell_error_is_an_exception_class():
    assert issubclass(_native.CellError, Exception)
    assert isinstance(_native.PARALLEL_MIN_CELLS, int) and isinstance(_native.PARALLEL_MIN_BYTES, int)
