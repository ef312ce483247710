"""The package reads as a set of modules with public interfaces.

* No module imports another module's private name (``from .x import _name``): what another module needs has a
  public name in its home module.
* No function is longer than 80 lines unless its docstring says why (a line starting ``Long because``).
* One JSON encoder (:mod:`optprune.solvers.serialization`) and one device helper
  (:mod:`optprune.llm_adapters.devices`): no module defines its own copy.

The allow-lists below name what is not yet clean; they may only shrink: an entry that no longer occurs fails the
test until it is removed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("formulations", "solvers", "llm_adapters", "optprune")
MAX_FUNCTION_LINES = 80
LONG_REASON = "Long because"

#: (file name, imported private name) still imported across modules
PRIVATE_IMPORTS_ALLOWED: set = set()

#: (file name, function qualname) still over the limit without a reason
LONG_FUNCTIONS_ALLOWED: set = set()


def _sources():
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path, path.read_text()


# ============================================================================================ checkers
def private_imports(source: str) -> list[tuple[str, str]]:
    """(line, name) of every ``from X import _name`` in ``source`` (dunder names are public)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found += [(f"line {node.lineno}", a.name) for a in node.names
                      if a.name.startswith("_") and not (a.name.startswith("__") and a.name.endswith("__"))]
    return found


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(qualname, lines) of every function over ``limit`` lines whose docstring has no line starting
    ``Long because``."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    doc = ast.get_docstring(child) or ""
                    if lines > limit and not any(ln.strip().startswith(LONG_REASON) for ln in doc.splitlines()):
                        found.append((name, lines))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


# ============================================================================================ the checkers work
def test_private_import_checker_finds_one():
    src = "from .report import HELDOUT_SEQLEN, _save\nfrom . import data as D\nfrom .x import __version__\n"
    assert private_imports(src) == [("line 1", "_save")]


def test_long_function_checker_finds_one_and_reads_the_reason():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    long_fn = f"def f():\n{body}\n"
    assert long_functions(long_fn) == [("f", MAX_FUNCTION_LINES + 1)]
    method = "class A:\n" + "\n".join("    " + ln for ln in long_fn.splitlines()) + "\n"
    assert long_functions(method) == [("A.f", MAX_FUNCTION_LINES + 1)]
    reasoned = f'def f():\n    """Sum.\n\n    Long because one table.\n    """\n{body}\n'
    assert long_functions(reasoned) == []
    at_limit = "\n".join(body.splitlines()[:-1])
    assert long_functions(f"def f():\n{at_limit}\n") == []


# ============================================================================================ the package
def _unlisted_and_stale(find, allowed: set) -> tuple[list, set]:
    """What ``find(source)`` reports over the package, less the allow-list (``(file name, item)`` pairs), as
    ``file: line-or-size item`` lines; and the allow-list entries that no longer occur."""
    found, seen = [], set()
    for path, src in _sources():
        for where, item in find(src):
            if (path.name, item) in allowed:
                seen.add((path.name, item))
            else:
                found.append(f"{path.relative_to(REPO)}: {item} ({where})")
    return found, allowed - seen


def test_no_module_imports_another_modules_private_names():
    bad, stale = _unlisted_and_stale(private_imports, PRIVATE_IMPORTS_ALLOWED)
    assert not bad, "give these a public name in their home module: " + "; ".join(bad)
    assert not stale, f"clean now, remove from PRIVATE_IMPORTS_ALLOWED: {sorted(stale)}"


def test_no_function_over_80_lines_without_a_reason():
    bad, stale = _unlisted_and_stale(lambda src: [(f"{n} lines", name) for name, n in long_functions(src)],
                                     LONG_FUNCTIONS_ALLOWED)
    assert not bad, f"split into named steps, or say why in a docstring line starting {LONG_REASON!r}: " + \
        "; ".join(bad)
    assert not stale, f"short now, remove from LONG_FUNCTIONS_ALLOWED: {sorted(stale)}"


@pytest.mark.parametrize("concept, home", [("jsonable", "solvers/serialization.py"),
                                           ("model_device", "llm_adapters/devices.py")])
def test_one_home_for_the_json_encoder_and_the_device_helper(concept, home):
    copies = [f"{path.relative_to(REPO)}: {node.name}" for path, src in _sources()
              for node in ast.walk(ast.parse(src))
              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and concept in node.name.lower()
              and str(path.relative_to(REPO)) != home]
    assert not copies, f"use the one in {home}: {copies}"
