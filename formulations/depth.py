"""Depth selection as a declarative program (docs/methods.md §13): which units (whole blocks) to remove.

Units ``i = 0..n−1`` (the decoder blocks, in order) have a measured removal cost ``c_i`` (the increase of the
calibration loss when unit ``i`` alone is skipped), pairwise interaction terms ``q_ij`` (the loss of removing
``i`` and ``j`` together minus what the two single costs predict) and a saving ``w_i ≥ 0`` (the unit's measured
latency, or its FLOPs). The program is a binary quadratic knapsack::

    minimise    Σ_i c_i z_i + Σ_{i<j} q_ij z_i z_j
    subject to  Σ_i w_i z_i ≥ b            (remove at least the saving the budget asks for)
                Σ_i z_i ≤ n − 1           (at least one unit stays)
                z ∈ {0,1}^n

With interactions between *neighbouring* units only (``q_ij = 0`` unless ``j = i+1``, what
:mod:`optprune.llm_adapters.depth` measures), the quadratic terms form a chain and the program is solved
exactly by a dynamic programme over the units (:mod:`optprune.solvers.whole_model.depth`). Reference backends
(:mod:`optprune.solvers.backends.bqp`: enumeration, Gurobi) take any ``q``.

The program is data (:class:`~optprune.formulations.programs.Program` of kind ``'BQP'``, variable ``z`` of
shape ``(n,)``); :meth:`Program.evaluate` and :meth:`Program.check` judge every solver's answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .patterns import LinearRow
from .programs import Program, Variable

__all__ = ["PairwiseCost", "DepthError", "depth_program", "is_chain"]


class DepthError(ValueError):
    """Bad depth-program input (shapes, NaN, negative savings, a budget no selection meets)."""


@dataclass
class PairwiseCost:
    """``Σ_i c_i z_i + Σ_{i<j} Q_ij z_i z_j`` (``Q`` strictly upper triangular)."""
    c: torch.Tensor
    Q: torch.Tensor
    var: str = "z"

    def value(self, program, values) -> float:
        z = torch.as_tensor(values[self.var]).reshape(-1).to(torch.float64)
        return float(self.c @ z + z @ self.Q @ z)


def _vec(x, n: Optional[int], what: str) -> torch.Tensor:
    v = torch.as_tensor(x, dtype=torch.float64).reshape(-1).clone()
    if n is not None and v.numel() != n:
        raise DepthError(f"{what} has {v.numel()} entries, expected {n}")
    if not bool(torch.isfinite(v).all()):
        raise DepthError(f"{what} contains NaN/Inf")
    return v


def is_chain(Q: torch.Tensor) -> bool:
    """True when ``Q`` couples neighbouring units only (nonzero entries on the first superdiagonal)."""
    n = Q.shape[0]
    off = Q.clone()
    if n > 1:
        off[torch.arange(n - 1), torch.arange(1, n)] = 0
    return not bool((off != 0).any())


def depth_program(costs: Sequence[float], savings: Sequence[float], budget: float, *,
                  pairs: Optional[torch.Tensor] = None, neighbours: Optional[Sequence[float]] = None) -> Program:
    """The depth knapsack for ``n`` units. ``pairs``: an (n, n) matrix of interaction terms (its upper triangle
    is used, ``q_ij`` for ``i<j``); or ``neighbours``: the ``n−1`` terms ``q_{i,i+1}``. ``budget`` ``b``: the
    saving ``Σ w_i z_i`` the removal must reach."""
    c = _vec(costs, None, "costs")
    n = c.numel()
    if n < 2:
        raise DepthError(f"a depth program needs at least 2 units, got {n}")
    w = _vec(savings, n, "savings")
    if bool((w < 0).any()):
        raise DepthError("savings must be ≥ 0")
    Q = torch.zeros(n, n, dtype=torch.float64)
    if pairs is not None and neighbours is not None:
        raise DepthError("give pairs or neighbours, not both")
    if pairs is not None:
        P = torch.as_tensor(pairs, dtype=torch.float64)
        if tuple(P.shape) != (n, n) or not bool(torch.isfinite(P).all()):
            raise DepthError(f"pairs must be a finite ({n}, {n}) matrix")
        Q = torch.triu(P, diagonal=1).clone()
    elif neighbours is not None:
        q = _vec(neighbours, n - 1, "neighbour terms")
        Q[torch.arange(n - 1), torch.arange(1, n)] = q
    b = float(budget)
    if not (b == b) or b < 0:
        raise DepthError(f"budget must be ≥ 0, got {budget}")
    best = float(w.sum() - w.min())  # the most any feasible selection (one unit kept) can save
    if b > best * (1 + 1e-12) + 1e-300:
        raise DepthError(f"the budget {b:g} exceeds the largest saving with one unit kept ({best:g})")
    idx = torch.arange(n)
    rows = [LinearRow([("z", idx, w)], ">=", b),
            LinearRow([("z", idx, torch.ones(n, dtype=torch.float64))], "<=", float(n - 1))]
    return Program("depth knapsack BQP", "BQP", {"z": Variable("z", (n,), "binary")}, [PairwiseCost(c, Q)], rows,
                   None, None, meta={"costs": c, "savings": w, "budget": b, "Q": Q, "chain": is_chain(Q)})
