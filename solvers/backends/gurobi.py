"""Reference backend: Gurobi through gurobipy directly (MIQP, MILP, QP, LP, ℓ1).

Translation of a :class:`Program`:

* variables — the free entries only (fixed-zero entries dropped); binaries as ``GRB.BINARY``;
* layer objective — per output row ``½ w_iᵀ Ĥ_{SS} w_i − b_iᵀ w_i`` plus the constant ``Σ c_i`` (``ObjCon``),
  so ``ObjVal`` and ``ObjBound`` are on the scale of ``f`` itself;
* ``L1Penalty`` — ``t ≥ ±w``, ``λ Σ t``; ``LinearScore`` — a linear objective; ``LinearRow`` — linear rows;
* ``Indicator`` (``W = 0`` where the binary is 0) — big-M rows ``−M_ij b ≤ W_ij ≤ M_ij b`` with the bound
  derived in :mod:`.common` (valid for every optimal solution; weights of dead inputs fixed at 0), or
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
from dataclasses import dataclass

import numpy as np

from ..base import Backend, Capabilities, LicenseLimitError, SolveResult, SolverUnavailable
from ..registry import register_backend
from .common import Layout, Translation, bigm_ratio, finish_mask_solution, objective_terms, translate, warm_start_values

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
    unknown_status = "gurobi-status-{raw}"

    @property
    def statuses(self) -> dict:
        from gurobipy import GRB
        return {GRB.OPTIMAL: "optimal", GRB.TIME_LIMIT: "time_limit", GRB.INFEASIBLE: "infeasible",
                GRB.INF_OR_UNBD: "infeasible", GRB.UNBOUNDED: "unbounded", GRB.SUBOPTIMAL: "feasible",
                GRB.NODE_LIMIT: "node_limit", GRB.NUMERIC: "numeric"}

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

    # ------------------------------------------------------------------ build, solve, read back
    def check(self, program) -> None:
        """The generic checks; the licence is checked in :meth:`build`, with the indicator mode asked for."""
        ok, why = Backend.supports(self, program)
        if not ok:
            raise SolverUnavailable(why)

    def build(self, program, *, time_limit: float | None = None, mip_gap: float = 1e-6, threads: int | None = None,
              indicator: str = "auto", polish: bool = True, warm_start: bool = True, verbose: bool = False,
              params: dict | None = None, **_) -> _Model:
        import gurobipy as gp
        from gurobipy import GRB
        self.licence_check(program, indicator)  # raises LicenseLimitError before anything is built
        tr = translate(program, indicator)
        env = gurobi_env()
        mdl = gp.Model(env=env)
        _set_params(mdl, program, verbose, threads, time_limit, mip_gap, params)
        vtype = np.full(tr.layout.size, GRB.CONTINUOUS)
        vtype[tr.binary] = GRB.BINARY
        vtype[tr.integer] = GRB.INTEGER
        x = mdl.addMVar(tr.layout.size, lb=tr.lb - tr.shift, ub=tr.ub - tr.shift, vtype=vtype)
        _add_objective(mdl, x, tr)
        for sn, gs in (("<=", "<"), (">=", ">"), ("==", "=")):
            sel = np.nonzero(tr.sense == sn)[0]
            if sel.size:
                mdl.addMConstr(tr.A[sel], x, gs, tr.rhs[sel])
        _add_indicators(mdl, x, program, tr)
        start = warm_start_values(program, tr) if warm_start else None
        if start is not None:
            x.Start = start
        return _Model(program, tr, env, mdl, x, polish)

    def optimize(self, model: _Model) -> None:
        import gurobipy as gp
        mdl = model.mdl
        try:
            mdl.optimize()
        except gp.GurobiError as e:
            if e.errno == 10010:
                raise LicenseLimitError(_licence_message(model.program.kind, mdl.NumVars,
                                                         mdl.NumConstrs + mdl.NumGenConstrs,
                                                         model.tr.quad is not None)) from None
            raise

    def read_back(self, model: _Model, t0: float) -> SolveResult:
        from gurobipy import GRB
        program, tr, mdl = model.program, model.tr, model.mdl
        st = mdl.Status
        status = self.status(st)
        info = dict(tr.info, gurobi_status=st, runtime_s=mdl.Runtime, n_vars=mdl.NumVars,
                    n_constrs=mdl.NumConstrs + mdl.NumGenConstrs)
        if mdl.SolCount == 0:
            return SolveResult("gurobi", status, time=time.perf_counter() - t0, info=info)
        values = tr.layout.unpack(model.x.X + tr.shift)
        info["solver_objective"] = mdl.ObjVal
        bound = gap = None
        if program.is_integer:
            bound = float(mdl.ObjBound)
            gap = float(mdl.MIPGap)
            info["node_count"] = mdl.NodeCount
            values, pinfo = finish_mask_solution(program, values, polish=model.polish)
            info.update(pinfo)
        if tr.M is not None:
            info["bigm_max_ratio"] = bigm_ratio(tr.M, values)
        objective = program.evaluate(values)
        if status == "optimal" and not program.is_integer:
            gap = 0.0
        return SolveResult("gurobi", status, objective, bound=bound, gap=gap, time=time.perf_counter() - t0,
                           values=values, proven_optimal=st == GRB.OPTIMAL, info=info, **_tolerances(mdl, program))


@dataclass
class _Model:
    """A built Gurobi model and what reading it back needs."""
    program: object
    tr: Translation
    env: object
    mdl: object
    x: object
    polish: bool


def _set_params(mdl, program, verbose, threads, time_limit, mip_gap, params) -> None:
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


def _add_objective(mdl, x, tr: Translation) -> None:
    """The layer objective per row around the unconstrained optimum, the ℓ1 epigraphs and the linear scores."""
    from gurobipy import GRB
    obj, const, shift = 0, 0.0, tr.shift
    for pos, S, Q, lin, c in tr.rows:
        const += c
        if S.size:
            xi = x[pos]
            obj = obj + 0.5 * (xi @ Q @ xi) + lin @ xi
    for t in tr.l1s:
        pos = tr.layout.positions(t.var)
        pos = pos[pos >= 0]
        if pos.size:
            tt = mdl.addMVar(pos.size, lb=0.0)
            mdl.addConstr(tt >= x[pos] + shift[pos])
            mdl.addConstr(tt >= -x[pos] - shift[pos])
            obj = obj + t.lam * tt.sum()
    for t in tr.lins:
        pos = tr.layout.positions(t.var)
        sc = t.scores.reshape(-1).double().cpu().numpy()
        keep = pos >= 0
        if keep.any():
            obj = obj - sc[keep] @ x[pos[keep]]
            const -= float(sc[keep] @ shift[pos[keep]])
    mdl.setObjective(obj + const, GRB.MINIMIZE)


def _add_indicators(mdl, x, program, tr: Translation) -> None:
    """``W = 0`` where the binary is 0: big-M rows ``−M b ≤ W = d + s ≤ M b`` as two sparse blocks, or
    Gurobi's indicator constraints."""
    import scipy.sparse as sp
    lay, shift = tr.layout, tr.shift
    for ind in program.indicators():
        wpos = lay.positions(ind.weight)
        bpos = lay.positions(ind.binary)[np.asarray(ind.index)]
        sel = np.nonzero(wpos >= 0)[0]
        wp, bp = wpos[sel], bpos[sel]
        if tr.mode != "bigm":
            for w_, b_ in zip(wp.tolist(), bp.tolist()):
                mdl.addGenConstrIndicator(x[b_].item(), False, x[w_].item() == -float(shift[w_]))
            continue
        Me = tr.ub[wp]
        keep = Me > 0
        wp, bp, Me = wp[keep], bp[keep], Me[keep]
        k = wp.size
        if k:
            r = np.arange(k)
            for sgn, gs in ((-1.0, "<"), (1.0, ">")):
                Ab = sp.csr_matrix((np.concatenate([np.ones(k), sgn * Me]),
                                    (np.concatenate([r, r]), np.concatenate([wp, bp]))), shape=(k, lay.size))
                mdl.addMConstr(Ab, x, gs, -shift[wp])


def _tolerances(mdl, program) -> dict:
    """The tolerances the result's proof holds to."""
    if program.is_integer:  # the gap limits and the feasibility tolerance it ran with
        return dict(gap_tol=float(mdl.Params.MIPGap), abs_tol=float(mdl.Params.MIPGapAbs),
                    feas_tol=float(mdl.Params.FeasibilityTol))
    # barrier (QP) or simplex (LP): the larger of the two convergence tolerances
    return dict(gap_tol=max(float(mdl.Params.BarConvTol), float(mdl.Params.OptimalityTol)),
                feas_tol=float(mdl.Params.FeasibilityTol))
