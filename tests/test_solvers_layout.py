"""The shape of ``solvers/``: folders by role, discovery by package, and reference backends in cvxpy's
build / optimize / read-back shape (the package-wide rules — short functions, no private names taken from other
modules — are tests/test_package_structure.py's).

* every module of ``solvers/methods/`` and ``solvers/backends/`` is imported by the registry's discovery, and a
  module that registers something lives in the folder of its role;
* a backend over a solver's own model implements the three steps and maps the solver's statuses through its
  table (checked on the Gurobi / SCIP / cvxpy backends with a model whose solver stops at a limit).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_module_of_the_methods_and_backends_packages_is_discovered():
    from optprune.solvers import list_backends, list_methods
    list_methods()
    list_backends()
    for role in ("methods", "backends"):
        for path in sorted((REPO / "solvers" / role).glob("*.py")):
            if path.name != "__init__.py":
                assert f"optprune.solvers.{role}.{path.stem}" in sys.modules, path


def test_registrations_live_in_the_folder_of_their_role():
    from optprune.solvers.registry import backend_classes, method_specs
    for spec in method_specs():
        if spec.fn.__module__.startswith("optprune."):
            assert spec.fn.__module__.startswith("optprune.solvers.methods."), (spec.name, spec.fn.__module__)
    for cls in backend_classes():
        if cls.__module__.startswith("optprune."):
            assert cls.__module__.startswith("optprune.solvers.backends."), (cls.name, cls.__module__)


@pytest.mark.parametrize("name", ["gurobi", "scip", "cvxpy", "bqp-gurobi", "sdp"])
def test_backends_over_a_solver_model_have_the_three_steps(name):
    from optprune.solvers import get_backend
    from optprune.solvers.base import Backend
    cls = type(get_backend(name))
    for step in ("build", "optimize", "read_back"):
        assert getattr(cls, step) is not getattr(Backend, step), f"{name} does not implement {step}"
    assert cls.solve is Backend.solve  # the one template: check, build, optimize, read back


@pytest.mark.parametrize("name", ["gurobi", "scip", "cvxpy"])
def test_backends_build_optimize_and_read_back_through_their_status_map(name):
    from optprune.formulations import LayerProblem, l0_program, refit_program
    from optprune.formulations.patterns import Unstructured
    from optprune.solvers import get_backend
    b = get_backend(name)
    if not b.available():
        pytest.skip(f"{b.requires} is not installed")
    p = LayerProblem.random(2, 8, seed=1, dtype=__import__("torch").float64)
    if name == "cvxpy":
        prog = refit_program(p, p.W0 != 0)
        res = b.solve(prog)
        assert res.status == "optimal" and res.proven_optimal
        assert b.status("optimal_inaccurate") == "inaccurate"
        return
    prog = l0_program(p, Unstructured(0.5))
    stopped = b.solve(prog, time_limit=1e-9 if name == "gurobi" else 1e-3, warm_start=False)
    assert stopped.status != "optimal" and not stopped.proven_optimal  # a limit is never reported as a proof
    solved = b.solve(prog)
    assert solved.status == "optimal" and solved.proven_optimal
    assert solved.info["indicator_mode"] in ("bigm", "indicator")
