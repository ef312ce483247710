"""Production solver of the depth knapsack (docs/methods.md §13): an exact dynamic programme over the units.

The program (:func:`~optprune.formulations.depth.depth_program`)::

    min Σ c_i z_i + Σ_{i<j} q_ij z_i z_j   s.t.  Σ w_i z_i ≥ b,  Σ z_i ≤ n − 1,  z ∈ {0,1}^n

**Chain interactions** (``q_ij = 0`` unless ``j = i+1``): walk the units in order keeping, for each state
(``z`` of the last unit, whether some unit is kept yet), the Pareto front of partial selections over
(saving reached, capped at ``b``; cost). A partial selection is dropped only when another one of the same
state saves at least as much at no higher cost — every completion is then at least as good for the other,
since the remaining terms depend on the state alone. The front holds at most one entry per distinct capped
saving, so uniform savings (equal blocks) give at most ``n`` entries and ``O(n²)`` work; the answer is the
proven optimum (up to float round-off in the savings' sum, tolerance ``1e-9·b``).

**General interactions**: the chain programme is no longer exact; :func:`solve_depth` then starts from the
chain programme on the neighbour terms and improves by single flips and swaps on the full objective (a
heuristic, reported as such: ``exact=False``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ...formulations.depth import is_chain

__all__ = ["DepthSolution", "solve_depth"]

_TOL = 1e-9


@dataclass
class DepthSolution:
    z: torch.Tensor          # bool (n,): True = removed
    objective: float
    exact: bool
    time_s: float
    info: dict = field(default_factory=dict)

    @property
    def removed(self) -> list:
        return [int(i) for i in torch.nonzero(self.z).reshape(-1)]


def _chain_dp(c: list, q: list, w: list, b: float) -> tuple:
    """Exact optimum of the chain program; returns (objective, list of removed indices) or (inf, None)."""
    n = len(c)
    tol = _TOL * max(1.0, b)
    # state (last z, any kept) -> list of (saving, cost, removed-bitmask)
    fronts = {(0, True): [(0.0, 0.0, 0)], (1, False): [(min(w[0], b), c[0], 1)]}
    for i in range(1, n):
        new: dict = {}
        for (last, kept), entries in fronts.items():
            for s, cost, bits in entries:
                new.setdefault((0, True), []).append((s, cost, bits))
                new.setdefault((1, kept), []).append(
                    (min(s + w[i], b), cost + c[i] + (q[i - 1] if last else 0.0), bits | (1 << i)))
        fronts = {}
        for key, entries in new.items():
            entries.sort(key=lambda e: (-e[0], e[1]))
            kept_, best = [], float("inf")
            for e in entries:
                if e[1] < best:
                    kept_.append(e)
                    best = e[1]
            fronts[key] = kept_
    best_obj, best_bits = float("inf"), None
    for (last, kept), entries in fronts.items():
        if not kept:
            continue
        for s, cost, bits in entries:
            if s >= b - tol and cost < best_obj:
                best_obj, best_bits = cost, bits
    if best_bits is None:
        return float("inf"), None
    return best_obj, [i for i in range(n) if best_bits >> i & 1]


def _objective(c: torch.Tensor, Q: torch.Tensor, z: torch.Tensor) -> float:
    zf = z.to(torch.float64)
    return float(c @ zf + zf @ Q @ zf)


def _feasible(z: torch.Tensor, w: torch.Tensor, b: float) -> bool:
    return bool(z.sum() <= z.numel() - 1) and float(w @ z.to(torch.float64)) >= b - _TOL * max(1.0, b)


def _local_search(c, Q, w, b, z):
    """Best-improvement flips and swaps on the full objective, keeping feasibility."""
    n = z.numel()
    f = _objective(c, Q, z)
    improved = True
    while improved:
        improved = False
        moves = [[i] for i in range(n)] + [[i, j] for i in range(n) for j in range(n) if z[i] and not z[j]]
        for mv in moves:
            y = z.clone()
            for k in mv:
                y[k] = ~y[k]
            if not _feasible(y, w, b):
                continue
            fy = _objective(c, Q, y)
            if fy < f - 1e-12 * max(1.0, abs(f)):
                z, f, improved = y, fy, True
                break
    return z, f


def solve_depth(program) -> DepthSolution:
    """The depth program's production solve (exact for chain interactions)."""
    t0 = time.perf_counter()
    m = program.meta
    c, w, b, Q = m["costs"], m["savings"], float(m["budget"]), m["Q"]
    n = c.numel()
    q = [float(Q[i, i + 1]) for i in range(n - 1)]
    obj, removed = _chain_dp(c.tolist(), q, w.tolist(), b)
    if removed is None:
        raise ValueError(f"no selection of the {n} units reaches the saving {b:g} with one unit kept")
    z = torch.zeros(n, dtype=torch.bool)
    z[removed] = True
    chain = is_chain(Q)
    info = {"chain": chain}
    if not chain:
        z, obj = _local_search(c, Q, w, b, z)
    return DepthSolution(z, _objective(c, Q, z) if not chain else obj, chain, time.perf_counter() - t0, info)
