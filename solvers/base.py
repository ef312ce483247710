"""One interface for every solver.

* **Reference backends** solve a :class:`~optprune.formulations.programs.Program` (cvxpy, Gurobi, SCIP,
  enumeration, networkx flow). Each is one file subclassing :class:`Backend`, declares
  :class:`Capabilities` and returns a :class:`SolveResult` carrying status, objective, bound/gap where the
  solver proves one, and time. A result that was not proven optimal says so (``proven_optimal=False``).
* **Production methods** (magnitude, Wanda, SparseGPT, RIA, FISTA, SPAP, EGGS, ...) share one signature
  (Wanda's lesson)::

      method(problem: LayerProblem, pattern: Pattern, **options) -> LayerResult

  and are registered in :mod:`optprune.solvers.registry`.
"""
from __future__ import annotations

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
    kinds: frozenset  # subset of {'QP', 'L1', 'MIQP', 'LP', 'MILP'}
    proves_optimality: bool = True
    max_variables: Optional[int] = None
    max_integer: Optional[int] = None
    note: str = ""


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
                "gap": self.gap, "time_s": round(self.time, 4), "proven_optimal": self.proven_optimal}


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

    @classmethod
    def available(cls) -> bool:
        return True

    def supports(self, program) -> tuple[bool, str]:
        c = self.capabilities
        if program.kind not in c.kinds:
            return False, f"{self.name} does not solve {program.kind} models"
        if c.max_variables is not None and program.n_variables > c.max_variables:
            return False, f"{program.n_variables} variables > {self.name}'s limit {c.max_variables}"
        if c.max_integer is not None and program.n_integer > c.max_integer:
            return False, f"{program.n_integer} integer variables > {self.name}'s limit {c.max_integer}"
        return True, ""

    def solve(self, program, **options) -> SolveResult:  # pragma: no cover - interface
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
