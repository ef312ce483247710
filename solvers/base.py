"""One interface for every solver.

* **Reference backends** solve a :class:`~optprune.formulations.programs.Program` (cvxpy, Gurobi, SCIP,
  enumeration, networkx flow). Each is one file of :mod:`optprune.solvers.backends` subclassing
  :class:`Backend`, declares :class:`Capabilities` and returns a :class:`SolveResult` carrying status,
  objective, bound/gap where the solver proves one, the tolerances its proof holds to, and time. A result that
  was not proven optimal says so (``proven_optimal=False``). A backend over a solver's own model follows
  cvxpy's shape — :meth:`Backend.build` the model, :meth:`Backend.optimize` it, :meth:`Backend.read_back` the
  result through the backend's status map (:attr:`Backend.statuses`); one without such a model (enumeration,
  flow) overrides :meth:`Backend.solve` itself.
* **Production methods** (magnitude, Wanda, SparseGPT, RIA, FISTA, SPAP, EGGS, ...) share one signature
  (Wanda's lesson)::

      method(problem: LayerProblem, pattern: Pattern, **options) -> LayerResult

  and are registered in :mod:`optprune.solvers.registry`.
"""
from __future__ import annotations

import importlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["torch_threads", "Capabilities", "SolveResult", "LayerResult", "Backend", "SolverUnavailable", "LicenseLimitError",
           "Timer"]


class SolverUnavailable(RuntimeError):
    """The backend's package is not installed or cannot take this program."""


class LicenseLimitError(SolverUnavailable):
    """A size-limited licence cannot take the model; the message names the limit and the fallback."""


@dataclass
class Capabilities:
    """What a reference backend can take — the cross-check (:mod:`.verify`) selects backends by these, never by
    name: every registered, available backend whose :meth:`Backend.supports` accepts a program solves it.

    ``kinds``: program kinds it takes (subset of ``{'QP', 'L1', 'LP', 'MIQP', 'MILP'}``); ``convex``: solves convex
    programs (QP, ℓ1, LP) to proven optimality; ``integer``: solves integer programs (MIQP, MILP) exactly — branch
    and bound or enumeration — rather than as a relaxation; ``network_flow``: solves mask programs as network
    flows; ``patterns``: pattern kinds it takes (``None``: any; kinds as in the method registry: ``unstructured``,
    ``row``, ``nm``, ``expander``, ``groups``); size limits ``max_variables`` / ``max_integer`` (``None``: none);
    ``variants``: further configurations worth cross-checking in a full verification, as ``(label, options,
    kinds)`` triples (e.g. other convex solvers behind one modelling layer); ``objective_atol``: see the field.
    """
    kinds: frozenset  # subset of {'QP', 'L1', 'MIQP', 'LP', 'MILP'}
    proves_optimality: bool = True
    max_variables: Optional[int] = None
    max_integer: Optional[int] = None
    note: str = ""
    convex: bool = False
    integer: bool = False
    network_flow: bool = False
    patterns: Optional[frozenset] = None
    variants: tuple = ()
    #: absolute objective accuracy of a proven optimum, per output row of the program (solvers whose quadratic
    #: objective sits in epigraph rows satisfied to a feasibility tolerance); the cross-check adds it
    objective_atol: float = 0.0

    def describe(self) -> dict:
        return {"kinds": sorted(self.kinds), "convex": self.convex, "integer": self.integer,
                "network_flow": self.network_flow, "patterns": None if self.patterns is None else sorted(self.patterns),
                "max_variables": self.max_variables, "max_integer": self.max_integer,
                "proves_optimality": self.proves_optimality, "note": self.note}


@dataclass
class SolveResult:
    solver: str
    status: str  # 'optimal' | 'feasible' | 'time_limit' | 'infeasible' | 'error' | 'heuristic'
    objective: float = float("nan")
    bound: Optional[float] = None
    gap: Optional[float] = None
    time: float = 0.0
    values: dict = field(default_factory=dict)
    proven_optimal: bool = False
    info: dict = field(default_factory=dict)
    #: the tolerances a proof of optimality holds to, as the backend ran: ``gap_tol`` — the relative optimality
    #: gap it stops at (Gurobi's ``MIPGap``, SCIP's ``limits/gap``, an interior-point method's relative duality
    #: gap; 0 for enumeration), ``abs_tol`` — an absolute objective tolerance (Gurobi's ``MIPGapAbs``, the flow
    #: backend's cost-rounding bound), ``feas_tol`` — the relative constraint feasibility tolerance of its
    #: model. A proven optimum f claims: no feasible point is below f − (gap_tol + feas_tol)·|f| − abs_tol;
    #: the cross-check holds every other solver to exactly that claim.
    gap_tol: float = 0.0
    abs_tol: float = 0.0
    feas_tol: float = 0.0

    @property
    def W(self):
        return self.values.get("W")

    @property
    def mask(self):
        if "z" in self.values:
            return self.values["z"] > 0.5
        W = self.values.get("W")
        return None if W is None else W != 0

    def row(self) -> dict:
        return {"solver": self.solver, "status": self.status, "objective": self.objective, "bound": self.bound,
                "gap": self.gap, "time_s": round(self.time, 4), "proven_optimal": self.proven_optimal,
                "gap_tol": self.gap_tol, "abs_tol": self.abs_tol, "feas_tol": self.feas_tol}


@dataclass
class LayerResult:
    """What a production method returns for one layer: new weights (zeros where pruned) and the mask."""
    W: torch.Tensor
    mask: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.float().mean())


class Backend:
    name = "backend"
    capabilities = Capabilities(frozenset())
    #: the module (and pip package) the backend needs; None: nothing beyond optprune's own dependencies
    requires: Optional[str] = None
    #: the solver's own status → ours: ``optimal`` (proven), ``feasible`` (a solution, not proven),
    #: ``time_limit`` / ``node_limit`` (stopped, with a bound), ``infeasible``, ``unbounded``, ``numeric``
    statuses: dict = {}
    #: how a solver status missing from :attr:`statuses` is reported (``{raw}``: the solver's own word)
    unknown_status = "{raw}"

    @classmethod
    def available(cls) -> bool:
        if cls.requires is None:
            return True
        try:
            importlib.import_module(cls.requires)
        except ImportError:
            return False
        return True

    def supports(self, program) -> tuple[bool, str]:
        if not self.available():
            return False, f"{self.requires} is not installed (pip install {self.requires})"
        c = self.capabilities
        if program.kind not in c.kinds:
            return False, f"{self.name} does not solve {program.kind} models"
        if c.max_variables is not None and program.n_variables > c.max_variables:
            return False, f"{program.n_variables} variables > {self.name}'s limit {c.max_variables}"
        if c.max_integer is not None and program.n_integer > c.max_integer:
            return False, f"{program.n_integer} integer variables > {self.name}'s limit {c.max_integer}"
        kind = getattr(program.pattern, "kind", None)
        if c.patterns is not None and kind is not None and kind not in c.patterns:
            return False, f"{self.name} does not take {kind} patterns"
        return True, ""

    def check(self, program) -> None:
        """Raise :class:`SolverUnavailable`, saying why, for a program this backend cannot take."""
        ok, why = self.supports(program)
        if not ok:
            raise SolverUnavailable(why)

    def status(self, raw) -> str:
        """Our status for the solver's own ``raw`` status (:attr:`statuses`)."""
        return self.statuses.get(raw, self.unknown_status.format(raw=raw))

    def solve(self, program, **options) -> SolveResult:
        """Check the program, build the solver's model, solve it and read the result back."""
        self.check(program)
        t0 = time.perf_counter()
        model = self.build(program, **options)
        self.optimize(model)
        return self.read_back(model, t0)

    def build(self, program, **options):  # pragma: no cover - interface
        """The solver's model of ``program`` (anything :meth:`optimize` and :meth:`read_back` take)."""
        raise NotImplementedError

    def optimize(self, model) -> None:  # pragma: no cover - interface
        """Run the solver on the built model."""
        raise NotImplementedError

    def read_back(self, model, t0: float) -> SolveResult:  # pragma: no cover - interface
        """The :class:`SolveResult` of the solved model (``t0``: when building began, for the time)."""
        raise NotImplementedError


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t0


@contextmanager
def torch_threads(n: Optional[int]):
    """Run the block with ``n`` torch CPU threads and restore the previous count afterwards; ``None`` (or the
    current count) changes nothing. The solvers use it for small dense kernels, where OpenMP barrier waits on a
    shared 2-core machine made two threads several times slower than one (measurements in each caller)."""
    prev = torch.get_num_threads()
    change = n is not None and int(n) != prev
    if change:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(prev)
