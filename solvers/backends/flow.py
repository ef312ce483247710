"""Reference backend: min-cost flow (networkx network simplex) for N:M and expander N:M mask programs.

``mask_program(scores, ExpanderNM(N, M, B))`` decouples into tiles of M rows × M columns, each a
transportation problem. Per tile the network is::

    row i   : demand −N            (supplies exactly N units: the row keeps exactly N)
    column j: demand +B            (absorbs B units: the lower bound "column keeps ≥ B", written as a demand)
    sink T  : demand M·N − M·B     (absorbs what columns pass on beyond their B)
    arcs    : row i → column j   capacity 1, cost −S_ij      (x_ij = flow)
              column j → T       capacity M − B, cost 0      (the column's degree above B)

so column j's inflow is B + (flow to T) ≥ B and at most M: the lower bound is modelled exactly by the demand
(no big-M bonus). For a plain N:M program (rows keep *at most* N, no column bound) every row is its own
"tile" with B = 0 and an extra arc row → T (capacity N, cost 0) that lets a row keep fewer.

networkx's network simplex is exact on integer data only, so costs are scaled to integers:
``c_ij = −round(S_ij · 10¹⁵ / max|S|)`` (Python ints, no overflow). The returned mask is optimal for the
scaled costs, hence within ``rounding_bound`` = (kept entries per tile) · max|S| · 10⁻¹⁵ of the true optimum
per tile (reported in ``info``); ``proven_optimal`` is True in that sense.
"""
from __future__ import annotations

import torch

from ...formulations.patterns import NM, ExpanderNM
from ...formulations.programs import LinearScore
from ..base import Backend, Capabilities, SolveResult, Timer
from ..registry import register_backend

__all__ = ["FlowBackend", "flow_tile"]

_SCALE = 10 ** 15


def flow_tile(S, N: int, B: int, *, at_most: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Optimal 0/1 mask of one tile S (r × c, a list of lists or tensor) by min-cost flow.

    Each row keeps exactly N (``at_most=True``: at most N), each column at least B. ``scale`` turns scores into
    integer costs: ``cost = −round(S·scale)``.
    """
    import networkx as nx  # a core dependency, imported when a flow is solved
    S = torch.as_tensor(S, dtype=torch.float64)
    r, c = S.shape
    G = nx.DiGraph()
    tot = r * N
    G.add_node("T", demand=tot - c * B)
    for i in range(r):
        G.add_node(("r", i), demand=-N)
        if at_most:
            G.add_edge(("r", i), "T", capacity=N, weight=0)
    for j in range(c):
        G.add_node(("c", j), demand=B)
        G.add_edge(("c", j), "T", capacity=max(r - B, 0), weight=0)
    vals = S.tolist()
    for i in range(r):
        for j in range(c):
            G.add_edge(("r", i), ("c", j), capacity=1, weight=-int(round(vals[i][j] * scale)))
    try:
        flow = nx.min_cost_flow(G)
    except nx.NetworkXUnfeasible as e:
        raise ValueError(f"tile {r}×{c} with N={N}, B={B} is infeasible") from e
    z = torch.zeros(r, c, dtype=torch.bool)
    for i in range(r):
        f = flow[("r", i)]
        for j in range(c):
            if f.get(("c", j), 0) > 0:
                z[i, j] = True
    return z


@register_backend
class FlowBackend(Backend):
    name = "flow"
    capabilities = Capabilities(kinds=frozenset({"MILP", "LP"}), proves_optimality=True, integer=True,
                                network_flow=True, patterns=frozenset({"nm", "expander"}),
                                note="N:M and expander N:M mask programs only (per-tile min-cost flow, networkx)")

    def supports(self, program):
        ok, why = super().supports(program)
        if not ok:
            return ok, why
        if not isinstance(program.pattern, NM):
            return False, "flow solves N:M / expander N:M mask programs only"
        if len(program.objective) != 1 or not isinstance(program.objective[0], LinearScore):
            return False, "flow needs a single linear score objective (mask_program)"
        if set(program.variables) != {"z"}:
            return False, "flow handles the mask variable z only"
        return True, ""

    def solve(self, program, **options) -> SolveResult:
        self.check(program)
        pat = program.pattern
        S = program.objective[0].scores.to(torch.float64)
        m, n = S.shape
        M, N = pat.M, pat.N
        expander = isinstance(pat, ExpanderNM)
        B = pat.B if expander else 0
        smax = float(S.abs().max()) if S.numel() else 0.0
        scale = _SCALE / smax if smax > 0 else 1.0
        rows_per_tile = M if expander else 1
        z = torch.zeros(m, n, dtype=torch.bool)
        with Timer() as t:
            for r0 in range(0, m, rows_per_tile):
                for c0 in range(0, n, M):
                    tile = S[r0:r0 + rows_per_tile, c0:c0 + M]
                    z[r0:r0 + rows_per_tile, c0:c0 + M] = flow_tile(tile, N, B, at_most=not expander,
                                                                    scale=scale)
        values = {"z": z.to(torch.float64)}
        obj = program.evaluate(values)
        chk = program.check(values)
        if not chk["feasible"]:
            raise RuntimeError(f"flow backend produced an infeasible mask: {chk['violations'][:3]}")
        tiles = (m // rows_per_tile) * (n // M)
        bound = tiles * rows_per_tile * N * smax / _SCALE
        return SolveResult(solver=self.name, status="optimal", objective=obj, bound=obj - bound, gap=None,
                           time=t.elapsed, values=values, proven_optimal=True, abs_tol=bound,
                           info={"tiles": tiles, "rounding_bound": bound,
                                 "note": "network simplex on integer-scaled costs (10^15 / max|S|)"})
