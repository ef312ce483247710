"""Reference backend: SCIP through PySCIPOpt (MIQP, MILP; also QP/LP on small instances).

SCIP takes a linear objective only, so the layer objective goes into epigraph variables, one per output row:
``t_i ≥ ½ d_Sᵀ Ĥ_SS d_S + linᵀ d_S`` (a convex quadratic constraint), minimise ``Σ t_i + const``. As in the
Gurobi backend the weights are expanded around the unconstrained optimum (``d = W − W*``,
:func:`.ref_common.row_quadratics`), so the constraint carries no large cancelling terms.
``Indicator`` constraints become big-M rows with the bound of :mod:`.ref_common` (or SCIP indicator
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

import numpy as np

from .base import Backend, Capabilities, SolveResult, SolverUnavailable
from .ref_common import (Layout, bigm_bounds, dead_columns, feasible_start, finish_mask_solution, linear_rows,
                         objective_terms, row_quadratics)
from .registry import register_backend

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

    def solve(self, program, *, time_limit: float | None = None, gap: float = 1e-6, indicator: str = "auto",
              polish: bool = True, warm_start: bool = True, verbose: bool = False, params: dict | None = None,
              statistics: str | None = None, **_) -> SolveResult:
        ok, why = self.supports(program)
        if not ok:
            raise SolverUnavailable(why)
        from pyscipopt import Model, quicksum

        t0 = time.perf_counter()
        lay = Layout(program)
        quad, l1s, lins = objective_terms(program)
        info: dict = {}
        mdl = Model()
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
        inds = program.indicators()
        lb = np.full(lay.size, -np.inf)
        ub = np.full(lay.size, np.inf)
        binm = lay.binary_mask()
        lb[binm], ub[binm] = 0.0, 1.0
        intm, ilo, ihi = lay.integer_bounds()  # grid codes
        lb[intm], ub[intm] = ilo[intm], ihi[intm]
        M = None
        mode = indicator
        if inds:
            if mode in ("auto", "bigm") and program.problem is not None:
                M, binfo = bigm_bounds(program)
                info.update(binfo)
                if M is None and mode == "bigm":
                    raise SolverUnavailable(f"no big-M bound: {binfo.get('bigm')}")
            mode = "bigm" if M is not None else "indicator"
            info["indicator_mode"] = mode
        if M is not None:
            wpos = lay.positions("W").reshape(M.shape)
            sel = wpos >= 0
            lb[wpos[sel]] = -M[sel]
            ub[wpos[sel]] = M[sel]
        elif quad is not None:
            dead = dead_columns(program.problem)
            wpos = lay.positions(quad.var).reshape(program.problem.shape)
            for p in wpos[:, dead].reshape(-1):
                if p >= 0:
                    lb[p] = ub[p] = 0.0
        rows_q, shift = (row_quadratics(program, lay, quad.var, shifted=not l1s) if quad is not None
                         else ([], np.zeros(lay.size)))
        lo, hi = lb - shift, ub - shift
        x = [mdl.addVar(vtype="B" if binm[j] else "I" if intm[j] else "C", lb=None if not np.isfinite(lo[j]) else float(lo[j]),
                        ub=None if not np.isfinite(hi[j]) else float(hi[j])) for j in range(lay.size)]
        obj_terms = []
        const = 0.0
        for pos, S, Q, lin, c in rows_q:
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
        for term in l1s:
            pos = lay.positions(term.var)
            for p in pos[pos >= 0]:
                tt = mdl.addVar(vtype="C", lb=0.0)
                mdl.addCons(tt >= x[int(p)] + float(shift[p]))
                mdl.addCons(tt >= -x[int(p)] - float(shift[p]))
                obj_terms.append(term.lam * tt)
        for term in lins:
            pos = lay.positions(term.var)
            sc = term.scores.reshape(-1).double().cpu().numpy()
            for j in np.nonzero(pos >= 0)[0]:
                if sc[j] != 0:
                    obj_terms.append(-float(sc[j]) * x[int(pos[j])])
                    const -= float(sc[j]) * float(shift[pos[j]])
        mdl.setObjective(quicksum(obj_terms) + const, "minimize")
        A, sense, rhs = linear_rows(program, lay)
        rhs = rhs - A @ shift
        A = A.tocsr()
        for r in range(A.shape[0]):
            cols = A.indices[A.indptr[r]:A.indptr[r + 1]]
            vals = A.data[A.indptr[r]:A.indptr[r + 1]]
            e = quicksum(float(v) * x[int(c)] for c, v in zip(cols, vals))
            s_, b_ = sense[r], float(rhs[r])
            mdl.addCons(e <= b_ if s_ == "<=" else e >= b_ if s_ == ">=" else e == b_)
        for ind in inds:
            wpos = lay.positions(ind.weight)
            bpos = lay.positions(ind.binary)[np.asarray(ind.index)]
            for e_ in np.nonzero(wpos >= 0)[0]:
                wp, bp = int(wpos[e_]), int(bpos[e_])
                if mode == "bigm":
                    Me = float(ub[wp])
                    if Me > 0:  # −M b ≤ W = d + s ≤ M b
                        mdl.addCons(x[wp] - Me * x[bp] <= -float(shift[wp]))
                        mdl.addCons(x[wp] + Me * x[bp] >= -float(shift[wp]))
                else:
                    mdl.addConsIndicator(x[wp] <= -float(shift[wp]), x[bp], activeone=False)
                    mdl.addConsIndicator(-x[wp] <= float(shift[wp]), x[bp], activeone=False)
        if warm_start and program.is_integer and program.problem is not None:
            start = feasible_start(program)
            if start is not None:
                xs0 = lay.pack(start) - shift
                sol = mdl.createSol()
                for j in range(lay.size):
                    mdl.setSolVal(sol, x[j], float(xs0[j]))
                # epigraph values: set to their row value so the start is feasible
                k = 0
                for pos, S, Q, lin, c in rows_q:
                    if not S.size:
                        continue
                    d = xs0[pos]
                    mdl.setSolVal(sol, obj_terms[k], float(0.5 * d @ Q @ d + lin @ d) + 1e-9)
                    k += 1
                try:
                    mdl.addSol(sol, free=True)
                except Exception:  # a rejected start is not an error
                    pass
        mdl.optimize()
        if statistics:  # SCIP's own statistics (where the time went), for tuning
            mdl.writeStatistics(statistics)
        st = mdl.getStatus()
        status = {"optimal": "optimal", "timelimit": "time_limit", "infeasible": "infeasible",
                  "gaplimit": "feasible", "unbounded": "unbounded"}.get(st, st)
        info.update(scip_status=st, solving_time_s=mdl.getSolvingTime(), n_nodes=mdl.getNNodes())
        elapsed = time.perf_counter() - t0
        if mdl.getNSols() == 0:
            return SolveResult("scip", status, time=elapsed, info=info)
        best = mdl.getBestSol()
        xv = np.array([mdl.getSolVal(best, v) for v in x])
        values = lay.unpack(xv + shift)
        info["solver_objective"] = mdl.getObjVal()
        bound = float(mdl.getDualbound())
        gapv = float(mdl.getGap())
        if program.is_integer:
            values, pinfo = finish_mask_solution(program, values, polish=polish)
            info.update(pinfo)
        if M is not None:
            W = values["W"].cpu().numpy()
            info["bigm_max_ratio"] = float(np.where(M > 0, np.abs(W) / np.maximum(M, 1e-300), 0.0).max())
        objective = program.evaluate(values)
        proven = st == "optimal" or (st == "gaplimit" and gapv <= gap)
        if proven:
            status = "optimal"
        return SolveResult("scip", status, objective, bound=bound, gap=gapv, time=time.perf_counter() - t0,
                           values=values, proven_optimal=proven, info=info,
                           gap_tol=float(mdl.getParam("limits/gap")), abs_tol=float(mdl.getParam("limits/absgap")),
                           feas_tol=float(mdl.getParam("numerics/feastol")))
