"""Reference backend: SCIP through PySCIPOpt (MIQP, MILP; also QP/LP on small instances).

SCIP takes a linear objective only, so the layer objective goes into epigraph variables, one per output row:
``t_i ≥ ½ d_Sᵀ Ĥ_SS d_S + linᵀ d_S`` (a convex quadratic constraint), minimise ``Σ t_i + const``. As in the
Gurobi backend the weights are expanded around the unconstrained optimum (``d = W − W*``,
:func:`.common.row_quadratics`), so the constraint carries no large cancelling terms.
``Indicator`` constraints become big-M rows with the bound of :mod:`.common` (or SCIP indicator
constraints, two per entry, when no useful bound exists); dead inputs' weights are fixed at 0 (exact).

Results: status from SCIP (``optimal`` only when SCIP proved it; ``timelimit`` → ``time_limit``); ``bound`` is
SCIP's dual bound, ``gap`` its gap; ``objective`` is ``Program.evaluate`` of the returned values (binaries
rounded, W zeroed off the support, and — ``polish=True``, L0 programs — refitted exactly on SCIP's support;
``info['objective_unpolished']`` keeps SCIP's own W's value). Options: ``time_limit`` (s), ``gap``
(relative gap limit, default 1e-6; a solve stopped at this limit counts as proven optimal within it, as
Gurobi's ``OPTIMAL`` does within ``MIPGap``), ``params`` (raw SCIP parameters), ``statistics`` (a path for
SCIP's statistics). SCIP is much slower than Gurobi on these MIQPs (big-M relaxations are weak): use it
on tiny instances (≤ ~32 binaries) or with a time limit — a time-limited result says so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..base import Backend, Capabilities, SolveResult
from ..registry import register_backend
from .common import Translation, bigm_ratio, finish_mask_solution, translate, warm_start_values

__all__ = ["ScipBackend"]


def _row_lower_bound(Q: np.ndarray, lin: np.ndarray):
    """A valid lower bound on ``½ dᵀQd + linᵀd`` (its unconstrained minimum ``−½ linᵀQ⁻¹lin``; 0 when
    ``lin = 0``), or None. Bounding the epigraph variable keeps SCIP's first LP relaxation bounded."""
    if not np.any(lin):
        return 0.0
    try:
        L = np.linalg.cholesky(Q)
    except np.linalg.LinAlgError:
        return None
    y = np.linalg.solve(L, lin)
    return float(-0.5 * y @ y) - 1e-9 * (1.0 + abs(float(y @ y)))


@register_backend
class ScipBackend(Backend):
    name = "scip"
    # ℓ1 models: |w| by two rows per entry; 4×8 ℓ1 models solve in < 0.1 s (the row epigraphs are expanded
    # around the unconstrained optimum only for programs without an ℓ1 term)
    capabilities = Capabilities(kinds=frozenset({"MIQP", "MILP", "QP", "LP", "L1"}), proves_optimality=True,
                                max_variables=20_000, convex=True, integer=True, objective_atol=1e-6,
                                note="PySCIPOpt; quadratic objective via row epigraphs")

    requires = "pyscipopt"

    statuses = {"optimal": "optimal", "timelimit": "time_limit", "infeasible": "infeasible", "gaplimit": "feasible",
                "unbounded": "unbounded"}

    def build(self, program, *, time_limit: float | None = None, gap: float = 1e-6, indicator: str = "auto",
              polish: bool = True, warm_start: bool = True, verbose: bool = False, params: dict | None = None,
              statistics: str | None = None, **_) -> _Model:
        from pyscipopt import Model, quicksum
        tr = translate(program, indicator)
        mdl = Model()
        _set_params(mdl, verbose, time_limit, gap, params)
        lo, hi = tr.lb - tr.shift, tr.ub - tr.shift
        x = [mdl.addVar(vtype="B" if tr.binary[j] else "I" if tr.integer[j] else "C",
                        lb=float(lo[j]) if np.isfinite(lo[j]) else None,
                        ub=float(hi[j]) if np.isfinite(hi[j]) else None) for j in range(tr.layout.size)]
        epigraphs = _add_objective(mdl, x, tr)
        A = tr.A.tocsr()
        for r in range(A.shape[0]):
            cols = A.indices[A.indptr[r]:A.indptr[r + 1]]
            vals = A.data[A.indptr[r]:A.indptr[r + 1]]
            e = quicksum(float(v) * x[int(c)] for c, v in zip(cols, vals))
            s_, b_ = tr.sense[r], float(tr.rhs[r])
            mdl.addCons(e <= b_ if s_ == "<=" else e >= b_ if s_ == ">=" else e == b_)
        _add_indicators(mdl, x, program, tr)
        start = warm_start_values(program, tr) if warm_start else None
        if start is not None:
            _add_start(mdl, x, epigraphs, tr, start)
        return _Model(program, tr, mdl, x, polish, gap, statistics)

    def optimize(self, model: _Model) -> None:
        model.mdl.optimize()
        if model.statistics:  # SCIP's own statistics (where the time went), for tuning
            model.mdl.writeStatistics(model.statistics)

    def read_back(self, model: _Model, t0: float) -> SolveResult:
        program, tr, mdl = model.program, model.tr, model.mdl
        st = mdl.getStatus()
        status = self.status(st)
        info = dict(tr.info, scip_status=st, solving_time_s=mdl.getSolvingTime(), n_nodes=mdl.getNNodes())
        if mdl.getNSols() == 0:
            return SolveResult("scip", status, time=time.perf_counter() - t0, info=info)
        best = mdl.getBestSol()
        xv = np.array([mdl.getSolVal(best, v) for v in model.x])
        values = tr.layout.unpack(xv + tr.shift)
        info["solver_objective"] = mdl.getObjVal()
        bound = float(mdl.getDualbound())
        gapv = float(mdl.getGap())
        if program.is_integer:
            values, pinfo = finish_mask_solution(program, values, polish=model.polish)
            info.update(pinfo)
        if tr.M is not None:
            info["bigm_max_ratio"] = bigm_ratio(tr.M, values)
        objective = program.evaluate(values)
        proven = st == "optimal" or (st == "gaplimit" and gapv <= model.gap)
        if proven:
            status = "optimal"
        return SolveResult("scip", status, objective, bound=bound, gap=gapv, time=time.perf_counter() - t0,
                           values=values, proven_optimal=proven, info=info,
                           gap_tol=float(mdl.getParam("limits/gap")), abs_tol=float(mdl.getParam("limits/absgap")),
                           feas_tol=float(mdl.getParam("numerics/feastol")))


@dataclass
class _Model:
    """A built SCIP model and what solving and reading it back need."""
    program: object
    tr: Translation
    mdl: object
    x: list
    polish: bool
    gap: float
    statistics: Optional[str]


def _set_params(mdl, verbose, time_limit, gap, params) -> None:
    if not verbose:
        mdl.hideOutput()
    if time_limit is not None:
        mdl.setParam("limits/time", float(time_limit))
    mdl.setParam("limits/gap", float(gap))
    # Measured on 2×8 / 4×4 L0 instances: SCIP's components presolver (which splits the independent rows
    # into sub-SCIPs) and unlimited root separation rounds cost 3–8× the time; switch them off.
    mdl.setParam("constraints/components/maxprerounds", 0)
    mdl.setParam("separating/maxroundsroot", 5)
    for k, v in (params or {}).items():
        mdl.setParam(k, v)


def _add_objective(mdl, x, tr: Translation) -> list:
    """Minimise ``Σ t_i + const`` with an epigraph ``t_i`` per output row, the ℓ1 terms and the linear scores;
    returns the row epigraph variables."""
    from pyscipopt import quicksum
    obj_terms, epigraphs, const, shift = [], [], 0.0, tr.shift
    for pos, S, Q, lin, c in tr.rows:
        const += c
        if not S.size:
            continue
        t = mdl.addVar(vtype="C", lb=_row_lower_bound(Q, lin), ub=None)
        xs = [x[int(p)] for p in pos]
        k = len(xs)
        expr = quicksum(0.5 * float(Q[a, a]) * xs[a] * xs[a] for a in range(k))
        expr += quicksum(float(Q[a, b]) * xs[a] * xs[b] for a in range(k) for b in range(a + 1, k) if Q[a, b] != 0)
        expr += quicksum(float(lin[a]) * xs[a] for a in range(k) if lin[a] != 0)
        mdl.addCons(expr <= t)
        obj_terms.append(t)
        epigraphs.append(t)
    for term in tr.l1s:
        pos = tr.layout.positions(term.var)
        for p in pos[pos >= 0]:
            tt = mdl.addVar(vtype="C", lb=0.0)
            mdl.addCons(tt >= x[int(p)] + float(shift[p]))
            mdl.addCons(tt >= -x[int(p)] - float(shift[p]))
            obj_terms.append(term.lam * tt)
    for term in tr.lins:
        pos = tr.layout.positions(term.var)
        sc = term.scores.reshape(-1).double().cpu().numpy()
        for j in np.nonzero(pos >= 0)[0]:
            if sc[j] != 0:
                obj_terms.append(-float(sc[j]) * x[int(pos[j])])
                const -= float(sc[j]) * float(shift[pos[j]])
    mdl.setObjective(quicksum(obj_terms) + const, "minimize")
    return epigraphs


def _add_indicators(mdl, x, program, tr: Translation) -> None:
    """``W = 0`` where the binary is 0: big-M rows ``−M b ≤ W = d + s ≤ M b``, or two SCIP indicator
    constraints per entry."""
    lay, shift = tr.layout, tr.shift
    for ind in program.indicators():
        wpos = lay.positions(ind.weight)
        bpos = lay.positions(ind.binary)[np.asarray(ind.index)]
        for e_ in np.nonzero(wpos >= 0)[0]:
            wp, bp = int(wpos[e_]), int(bpos[e_])
            if tr.mode == "bigm":
                Me = float(tr.ub[wp])
                if Me > 0:
                    mdl.addCons(x[wp] - Me * x[bp] <= -float(shift[wp]))
                    mdl.addCons(x[wp] + Me * x[bp] >= -float(shift[wp]))
            else:
                mdl.addConsIndicator(x[wp] <= -float(shift[wp]), x[bp], activeone=False)
                mdl.addConsIndicator(-x[wp] <= float(shift[wp]), x[bp], activeone=False)


def _add_start(mdl, x, epigraphs, tr: Translation, start: np.ndarray) -> None:
    """Hand SCIP the feasible start, with each row epigraph at its row's value so that the start is feasible."""
    sol = mdl.createSol()
    for j in range(tr.layout.size):
        mdl.setSolVal(sol, x[j], float(start[j]))
    rows = [(pos, Q, lin) for pos, S, Q, lin, _ in tr.rows if S.size]
    for t, (pos, Q, lin) in zip(epigraphs, rows):
        d = start[pos]
        mdl.setSolVal(sol, t, float(0.5 * d @ Q @ d + lin @ d) + 1e-9)
    try:
        mdl.addSol(sol, free=True)
    except Exception:  # a rejected start is not an error
        pass
