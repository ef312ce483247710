"""Method and backend registry: a method is (program builder, production solver); one line registers it.

Production methods share one signature::

    fn(problem: LayerProblem, pattern: Pattern, **options) -> LayerResult

Adding a method = one file in ``solvers/`` that calls :func:`register_method`, plus its module name in
``_METHOD_MODULES``. Adding a reference backend = one file with a :class:`~.base.Backend` subclass and its
module name in ``_BACKEND_MODULES``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

__all__ = ["MethodSpec", "UnknownMethodError", "register_method", "get_method", "list_methods",
           "register_backend", "get_backend", "list_backends"]

_METHOD_MODULES = ["baselines", "fista", "spap", "eggs", "structured_baselines", "admm"]
_BACKEND_MODULES = ["ref_enumerate", "ref_cvxpy", "ref_gurobi", "ref_scip", "ref_flow"]


class UnknownMethodError(ValueError):
    pass


@dataclass
class MethodSpec:
    name: str
    fn: Callable
    #: statistics the pipeline must collect: 'none' (weights only), 'diag' (‖X_j‖), 'gram' (H, Ĥ, C)
    needs: str = "gram"
    #: pattern kinds it accepts: subset of {'unstructured', 'row', 'nm', 'expander', 'groups'}
    patterns: frozenset = frozenset({"unstructured", "row", "nm"})
    structured: bool = False
    program: Optional[Callable] = None  # (problem, pattern, **opts) -> Program it solves or approximates
    description: str = ""
    defaults: dict = field(default_factory=dict)

    def __call__(self, problem, pattern, **options):
        opts = dict(self.defaults)
        opts.update(options)
        return self.fn(problem, pattern, **opts)


_METHODS: dict[str, MethodSpec] = {}
_BACKENDS: dict[str, type] = {}
_loaded = {"methods": False, "backends": False}


def register_method(name: str, *, needs: str = "gram", patterns=("unstructured", "row", "nm"),
                    structured: bool = False, program=None, description: str = "", **defaults):
    def deco(fn):
        _METHODS[name] = MethodSpec(name, fn, needs, frozenset(patterns), structured, program, description,
                                    defaults)
        return fn
    return deco


def _load(kind: str, modules: list[str]) -> None:
    if _loaded[kind]:
        return
    _loaded[kind] = True
    for mod in modules:
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:  # a module not written yet, or an optional dependency missing
            if e.name and (e.name.endswith(mod) or e.name.startswith(__package__)):
                continue
            raise


def list_methods() -> list[str]:
    _load("methods", _METHOD_MODULES)
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    _load("methods", _METHOD_MODULES)
    key = (name or "").strip().lower()
    if key not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def register_backend(cls):
    _BACKENDS[cls.name] = cls
    return cls


def list_backends(available_only: bool = False) -> list[str]:
    _load("backends", _BACKEND_MODULES)
    return sorted(n for n, c in _BACKENDS.items() if not available_only or c.available())


def get_backend(name: str):
    _load("backends", _BACKEND_MODULES)
    if name not in _BACKENDS:
        raise UnknownMethodError(f"unknown solver backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()
