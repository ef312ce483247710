"""Reference backend: Gurobi through gurobipy directly (MIQP, MILP, QP, LP, ℓ1).

Translation of a :class:`Program`:

* variables — the free entries only (fixed-zero entries dropped); binaries as ``GRB.BINARY``;
* layer objective — per output row ``½ w_iᵀ Ĥ_{SS} w_i − b_iᵀ w_i`` plus the constant ``Σ c_i`` (``ObjCon``),
  so ``ObjVal`` and ``ObjBound`` are on the scale of ``f`` itself;
* ``L1Penalty`` — ``t ≥ ±w``, ``λ Σ t``; ``LinearScore`` — a linear objective; ``LinearRow`` — linear rows;
* ``Indicator`` (``W = 0`` where the binary is 0) — big-M rows ``−M_ij b ≤ W_ij ≤ M_ij b`` with the bound
  derived in :mod:`.ref_common` (valid for every optimal solution; weights of dead inputs fixed at 0), or
  Gurobi indicator constraints when that bound is not numerically useful (``indicator='indicator'`` forces
  them). After the solve ``info['bigm_max_ratio'] = max |W_ij|/M_ij`` shows the bound was not active.

**Size-limited licence.** The pip package's licence solves models with at most 2000 variables and 2000
(linear + general) constraints, and at most 200 variables once the model has a quadratic term (measured
here with gurobipy 13.0.3: 201 variables with ``x@x`` and 2001 rows both raise errno 10010; quadratic
*constraints* count only through the 200-variable rule). Whether the licence is size-limited is probed once
per process (a 201-variable QP), and models over the limit raise :class:`LicenseLimitError` *before*
anything is built; an errno 10010 that still happens is translated into the same error.

Results: ``status`` from Gurobi's ``Status``; ``objective`` = ``Program.evaluate`` of the returned values
(binaries rounded, W zeroed off the support, then — for L0 programs, ``polish=True`` — the exact least-squares
refit on Gurobi's support; ``info['objective_unpolished']`` keeps Gurobi's own W's value); ``bound`` =
``ObjBound`` and ``gap`` = ``MIPGap`` for integer models; ``time`` = ``Runtime`` plus translation.
"""
from __future__ import annotations

import time

import numpy as np

from .base import Backend, Capabilities, LicenseLimitError, SolveResult, SolverUnavailable
from .ref_common import (Layout, bigm_bounds, dead_columns, feasible_start, finish_mask_solution, linear_rows,
                         objective_terms, row_quadratics)
from .registry import register_backend

__all__ = ["GurobiBackend", "gurobi_size_limited", "LICENCE_QUAD_VARS", "LICENCE_VARS", "LICENCE_CONSTRS", "gurobi_env"]

LICENCE_QUAD_VARS = 200   # QP/MIQP (any quadratic term)
LICENCE_VARS = 2000       # LP/MILP
LICENCE_CONSTRS = 2000    # linear + general constraints
_LIMITED: dict = {}


def gurobi_env():
    import gurobipy as gp
    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 0)
    env.start()
    return env


def gurobi_size_limited() -> bool:
    """Whether this machine's Gurobi licence is the size-limited one (probed once, ~0.5 s)."""
    if "v" not in _LIMITED:
        import gurobipy as gp
        try:
            env = gurobi_env()
            m = gp.Model(env=env)
            x = m.addMVar(LICENCE_QUAD_VARS + 1)
            m.setObjective(x @ x)
            m.optimize()
            _LIMITED["v"] = False
        except gp.GurobiError as e:
            if e.errno == 10010:
                _LIMITED["v"] = True
            else:
                raise SolverUnavailable(f"gurobi cannot start: {e}") from None
    return _LIMITED["v"]


def _fallback(kind: str) -> str:
    if kind == "MIQP":
        return "use backend 'scip' (PySCIPOpt) or 'enumerate' (tiny instances) instead"
    if kind == "MILP":
        return ("use backend 'scip', 'enumerate' (tiny instances) or 'cvxpy' (LP relaxation, exact when "
                "integral) instead")
    return "use backend 'cvxpy' (Clarabel/HiGHS) instead"


def _licence_message(kind: str, nvars: int, ncons: int, quadratic: bool) -> str:
    lim = LICENCE_QUAD_VARS if quadratic else LICENCE_VARS
    return (f"Gurobi's size-limited pip licence solves {'QP/MIQP' if quadratic else 'LP/MILP'} models of at most "
            f"{lim} variables and {LICENCE_CONSTRS} constraints; this {kind} model has {nvars} variables and "
            f"{ncons} constraints — {_fallback(kind)}")


@register_backend
class GurobiBackend(Backend):
    name = "gurobi"
    capabilities = Capabilities(
        kinds=frozenset({"QP", "L1", "LP", "MILP", "MIQP"}), proves_optimality=True, convex=True, integer=True,
        note="gurobipy; pip licence: ≤ 200 variables with a quadratic term, ≤ 2000 otherwise, ≤ 2000 constraints")

    requires = "gurobipy"

    # ------------------------------------------------------------------ sizes
    def model_size(self, program, indicator: str = "auto") -> tuple[int, int, bool, str]:
        """``(variables, constraints, quadratic, indicator mode)`` of the Gurobi model this program becomes."""
        lay = Layout(program)
        quad, l1s, _ = objective_terms(program)
        nvars = lay.size
        for t in l1s:
            nvars += int((lay.positions(t.var) >= 0).sum())
        nrows = len(program.linear_rows())
        nrows += 2 * sum(int((lay.positions(t.var) >= 0).sum()) for t in l1s)
        n_ind = sum(int((lay.positions(c.weight)[np.asarray(c.index)] >= 0).sum()) for c in program.indicators())
        mode = indicator
        if n_ind and mode == "auto":
            mode = "bigm" if program.problem is not None and program.pattern is not None else "indicator"
        nrows += (2 * n_ind) if mode == "bigm" else n_ind
        return nvars, nrows, quad is not None, mode

    def licence_check(self, program, indicator: str = "auto") -> None:
        nvars, ncons, quadratic, _ = self.model_size(program, indicator)
        if not gurobi_size_limited():
            return
        lim = LICENCE_QUAD_VARS if quadratic else LICENCE_VARS
        if nvars > lim or ncons > LICENCE_CONSTRS:
            raise LicenseLimitError(_licence_message(program.kind, nvars, ncons, quadratic))

    def supports(self, program):
        ok, why = super().supports(program)
        if not ok:
            return ok, why
        try:
            self.licence_check(program)
        except LicenseLimitError as e:
            return False, str(e)
        except SolverUnavailable as e:
            return False, str(e)
        return True, ""

    # ------------------------------------------------------------------ solve
    def solve(self, program, *, time_limit: float | None = None, mip_gap: float = 1e-6, threads: int | None = None,
              indicator: str = "auto", polish: bool = True, warm_start: bool = True, verbose: bool = False,
              params: dict | None = None, **_) -> SolveResult:
        if not self.available():
            raise SolverUnavailable("gurobipy is not installed (pip install gurobipy)")
        ok, why = Backend.supports(self, program)
        if not ok:
            raise SolverUnavailable(why)
        import gurobipy as gp
        from gurobipy import GRB

        t0 = time.perf_counter()
        self.licence_check(program, indicator)  # raises LicenseLimitError before anything is built
        lay = Layout(program)
        quad, l1s, lins = objective_terms(program)
        info: dict = {}
        env = gurobi_env()
        mdl = gp.Model(env=env)
        mdl.Params.OutputFlag = 1 if verbose else 0
        if threads:
            mdl.Params.Threads = int(threads)
        if time_limit is not None:
            mdl.Params.TimeLimit = float(time_limit)
        if program.is_integer:
            mdl.Params.MIPGap = mip_gap
            mdl.Params.MIPGapAbs = 1e-10
        else:  # continuous programs: reference accuracy (defaults left allocation QPs 1e-5 relative off)
            mdl.Params.FeasibilityTol = 1e-9
            mdl.Params.OptimalityTol = 1e-9
            mdl.Params.BarConvTol = 1e-12
        for k, v in (params or {}).items():
            mdl.setParam(k, v)
        lb = np.full(lay.size, -np.inf)
        ub = np.full(lay.size, np.inf)
        vtype = np.full(lay.size, GRB.CONTINUOUS)
        binm = lay.binary_mask()
        vtype[binm] = GRB.BINARY
        lb[binm], ub[binm] = 0.0, 1.0
        intm, ilo, ihi = lay.integer_bounds()  # grid codes
        vtype[intm] = GRB.INTEGER
        lb[intm], ub[intm] = ilo[intm], ihi[intm]
        # indicator handling: big-M (bounds on W) or indicator constraints
        inds = program.indicators()
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
                    lb[p] = ub[p] = 0.0  # dead inputs do not change f: fixing them at 0 is exact
        # Gurobi's variables are d = x − s: the layer objective is expanded around the unconstrained optimum
        # (s = W* on the weights, 0 elsewhere; see ref_common.row_quadratics) — no large-term cancellation.
        rows_q, shift = (row_quadratics(program, lay, quad.var, shifted=not l1s) if quad is not None
                         else ([], np.zeros(lay.size)))
        x = mdl.addMVar(lay.size, lb=lb - shift, ub=ub - shift, vtype=vtype)
        obj = 0
        const = 0.0
        for pos, S, Q, lin, c in rows_q:
            const += c
            if S.size:
                xi = x[pos]
                obj = obj + 0.5 * (xi @ Q @ xi) + lin @ xi
        for t in l1s:
            pos = lay.positions(t.var)
            pos = pos[pos >= 0]
            if pos.size:
                tt = mdl.addMVar(pos.size, lb=0.0)
                mdl.addConstr(tt >= x[pos] + shift[pos])
                mdl.addConstr(tt >= -x[pos] - shift[pos])
                obj = obj + t.lam * tt.sum()
        for t in lins:
            pos = lay.positions(t.var)
            sc = t.scores.reshape(-1).double().cpu().numpy()
            keep = pos >= 0
            if keep.any():
                obj = obj - sc[keep] @ x[pos[keep]]
                const -= float(sc[keep] @ shift[pos[keep]])
        mdl.setObjective(obj + const, GRB.MINIMIZE)
        A, sense, rhs = linear_rows(program, lay)
        rhs = rhs - A @ shift
        for sn, gs in (("<=", "<"), (">=", ">"), ("==", "=")):
            sel = np.nonzero(sense == sn)[0]
            if sel.size:
                mdl.addMConstr(A[sel], x, gs, rhs[sel])
        import scipy.sparse as sp
        for ind in inds:
            wpos = lay.positions(ind.weight)
            bpos = lay.positions(ind.binary)[np.asarray(ind.index)]
            sel = np.nonzero(wpos >= 0)[0]
            wp, bp = wpos[sel], bpos[sel]
            if mode == "bigm":  # −M b ≤ W = d + s ≤ M b, as two sparse blocks
                Me = ub[wp]
                keep = Me > 0
                wp, bp, Me = wp[keep], bp[keep], Me[keep]
                k = wp.size
                if k:
                    r = np.arange(k)
                    for sgn, gs in ((-1.0, "<"), (1.0, ">")):
                        Ab = sp.csr_matrix((np.concatenate([np.ones(k), sgn * Me]),
                                            (np.concatenate([r, r]), np.concatenate([wp, bp]))),
                                           shape=(k, lay.size))
                        mdl.addMConstr(Ab, x, gs, -shift[wp])
            else:
                for w_, b_ in zip(wp.tolist(), bp.tolist()):
                    mdl.addGenConstrIndicator(x[b_].item(), False, x[w_].item() == -float(shift[w_]))
        if warm_start and program.is_integer and program.problem is not None:
            start = feasible_start(program)
            if start is not None:
                x.Start = lay.pack(start) - shift
        try:
            mdl.optimize()
        except gp.GurobiError as e:
            if e.errno == 10010:
                raise LicenseLimitError(_licence_message(program.kind, mdl.NumVars, mdl.NumConstrs + mdl.NumGenConstrs,
                                                         quad is not None)) from None
            raise
        st = mdl.Status
        status = {GRB.OPTIMAL: "optimal", GRB.TIME_LIMIT: "time_limit", GRB.INFEASIBLE: "infeasible",
                  GRB.INF_OR_UNBD: "infeasible", GRB.UNBOUNDED: "unbounded",
                  GRB.SUBOPTIMAL: "feasible", GRB.NODE_LIMIT: "node_limit",
                  GRB.NUMERIC: "numeric"}.get(st, f"gurobi-status-{st}")
        info.update(gurobi_status=st, runtime_s=mdl.Runtime, n_vars=mdl.NumVars,
                    n_constrs=mdl.NumConstrs + mdl.NumGenConstrs)
        elapsed = time.perf_counter() - t0
        if mdl.SolCount == 0:
            return SolveResult("gurobi", status, time=elapsed, info=info)
        values = lay.unpack(x.X + shift)
        info["solver_objective"] = mdl.ObjVal
        bound = gap = None
        if program.is_integer:
            bound = float(mdl.ObjBound)
            gap = float(mdl.MIPGap)
            info["node_count"] = mdl.NodeCount
            values, pinfo = finish_mask_solution(program, values, polish=polish)
            info.update(pinfo)
        if M is not None:
            W = values["W"].cpu().numpy()
            ratio = np.where(M > 0, np.abs(W) / np.maximum(M, 1e-300), 0.0)
            info["bigm_max_ratio"] = float(ratio.max())
        objective = program.evaluate(values)
        proven = st == GRB.OPTIMAL
        if status == "optimal" and not program.is_integer:
            gap = 0.0
        elapsed = time.perf_counter() - t0
        if program.is_integer:  # the proof holds to the gap limits and the feasibility tolerance it ran with
            tols = dict(gap_tol=float(mdl.Params.MIPGap), abs_tol=float(mdl.Params.MIPGapAbs),
                        feas_tol=float(mdl.Params.FeasibilityTol))
        else:  # barrier (QP) or simplex (LP): the larger of the two convergence tolerances
            tols = dict(gap_tol=max(float(mdl.Params.BarConvTol), float(mdl.Params.OptimalityTol)),
                        feas_tol=float(mdl.Params.FeasibilityTol))
        return SolveResult("gurobi", status, objective, bound=bound, gap=gap, time=elapsed, values=values,
                           proven_optimal=proven, info=info, **tols)
