"""Reference backends: exact (or provably bounded) solvers of a declarative
:class:`~optprune.formulations.programs.Program` — cvxpy, Gurobi, SCIP, enumeration, network flow — one module
each, a :class:`~optprune.solvers.base.Backend` subclass under ``@register_backend``, plus :mod:`.common`, the
translation of a program into a solver's numbers that they share.

The registry imports every module of this package on first use: adding a backend is adding a module here.
"""
