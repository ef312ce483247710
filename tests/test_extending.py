"""docs/extending.md is executable: every ```python block runs, in order, in one namespace; a block starting
with ``# file: path.py`` is written under a scratch directory on sys.path and imported as that module — or, for a
file in ``solvers/methods/`` or ``solvers/backends/``, written to a scratch folder that joins that package's
search path and left to the registry's discovery (nothing imports it by name). Then the method the tutorial adds
is run here through the registry on a random layer problem and compared with an independent computation of its
mask."""
import contextlib
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_FILE = re.compile(r"^#\s*file:\s*(\S+\.py)\s*$")
#: repository folders whose modules the registry discovers by package → the package
_DISCOVERED = {("solvers", "methods"): "optprune.solvers.methods", ("solvers", "backends"): "optprune.solvers.backends"}


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in _BLOCK.finditer(text)]


@contextlib.contextmanager
def isolated_registries():
    """Restore the method, backend, pattern and architecture registries and drop the scratch modules afterwards."""
    from optprune.llm_adapters import architectures, description
    from optprune.solvers.registry import isolated
    before = set(sys.modules)
    table = dict(architectures.ARCHITECTURES)
    paths = {pkg: list(importlib.import_module(pkg).__path__) for pkg in _DISCOVERED.values()}
    try:
        with isolated(), description.isolated():
            yield
    finally:
        architectures.ARCHITECTURES.clear()
        architectures.ARCHITECTURES.update(table)
        for pkg, path in paths.items():  # the scratch folders leave the discovered packages' search paths
            importlib.import_module(pkg).__path__[:] = path
        for name in set(sys.modules) - before:  # only the tutorial's scratch modules (no extension modules:
            mod = sys.modules.get(name)            # a C extension cannot be imported twice in one process)
            f = getattr(mod, "__file__", None) or ""
            if name.startswith("my_optprune_ext") or (f and "pytest-of" in f and "site-packages" not in f):
                sys.modules.pop(name, None)


def run_doc(text: str, root: Path) -> dict:
    ns = {"__name__": "extending_doc"}
    sys.path.insert(0, str(root))
    try:
        for i, code in enumerate(python_blocks(text)):
            first = code.splitlines()[0] if code.strip() else ""
            mt = _FILE.match(first)
            if mt is None:
                exec(compile(code, f"{DOC.name}[python block {i + 1}]", "exec"), ns)
                continue
            rel = Path(mt.group(1))
            assert not rel.is_absolute() and ".." not in rel.parts, f"block {i + 1}: file path must be relative"
            if rel.parent.parts in _DISCOVERED:
                _add_to_package(_DISCOVERED[rel.parent.parts], root, rel, code)
                continue
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            for d in rel.parents:
                if str(d) != ".":
                    (root / d / "__init__.py").touch(exist_ok=True)
            path.write_text(code)
            importlib.invalidate_caches()
            importlib.import_module(".".join(rel.with_suffix("").parts))
    finally:
        sys.path.remove(str(root))
    return ns


def _add_to_package(package: str, root: Path, rel: Path, code: str) -> None:
    """Save ``code`` as a new module of ``package`` (a scratch folder on its search path) and let the registry
    find it: the module must be imported by discovery, by nobody else."""
    from optprune.solvers.registry import discover
    folder = root / "_".join(rel.parent.parts)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / rel.name).write_text(code)
    pkg = importlib.import_module(package)
    if str(folder) not in pkg.__path__:
        pkg.__path__.append(str(folder))
    importlib.invalidate_caches()
    name = f"{package}.{rel.stem}"
    assert name not in sys.modules
    discover(force=True, backends=True)
    assert name in sys.modules, f"{name} was not discovered"


def test_doc_has_the_sections_and_blocks():
    text = DOC.read_text()
    assert "## Adding a method" in text and "## Adding a pattern kind" in text and "## Adding an architecture" in text
    assert "## Adding a reference backend" in text and "## Adding a run option" in text
    blocks = python_blocks(text)
    assert sum(bool(_FILE.match(b.splitlines()[0])) for b in blocks) >= 2  # one new file each
    assert len(blocks) >= 6


def test_every_python_block_runs_and_the_new_method_works(tmp_path, capsys):
    from optprune.formulations import LayerProblem, parse_pattern
    from optprune.solvers import get_method, list_methods
    with isolated_registries():
        run_doc(DOC.read_text(), tmp_path)
        out = capsys.readouterr()
        assert "has no option 'powr'" in out.out and "powr" in out.err  # the doc's error demonstrations ran
        spec = get_method("obd")
        problem = LayerProblem.random(12, 16, seed=3)
        for text, s in (("unstructured", 0.5), ("row", 0.25), ("2:4", None), ("column", 0.5)):
            pat = parse_pattern(text, s)
            res = spec(problem, pat, power=1.0)
            W = problem.W0.to(torch.float64)
            scores = W.abs() ** 2 * problem.Hh.diagonal().sqrt()  # w²·‖X_j‖ computed from the Gram here
            assert torch.equal(res.mask, pat.project(scores)), text
            assert torch.allclose(res.W.to(torch.float64), W * res.mask)
            assert pat.is_feasible(res.mask)
        assert "obd" in list_methods()
        assert "run_note recorded: try 1" in out.out  # the run option the doc adds reached the record
    # the scratch method, pattern and run option are gone afterwards: other tests see the stock registries
    assert "obd" not in list_methods()
    from optprune.llm_adapters.description import options
    assert "run_note" not in options()
    with pytest.raises(ValueError, match="unknown pattern"):
        parse_pattern("column", 0.5)
