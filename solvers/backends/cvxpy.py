"""Reference backend: cvxpy for the convex models (refit QP, ℓ1 model) and the LP relaxation of mask programs.

Solvers: Clarabel (default for QP/ℓ1), OSQP, SCS, and HiGHS (default for LP). The layer objective is handed
to cvxpy in *data form*: with ``Ĥ = RᵀR`` (eigen square root, :func:`.common.gram_factor`) and
``Rᵀ y_i = b_i``, row i contributes ``½‖R_{:,S_i} w_i − y_i‖²``, which equals the row's part of ``f`` up to a
known constant — a well-scaled least-squares term whose optimum is the pruned error itself (not a difference
of large numbers), so interior-point tolerances translate into small *relative* objective errors.
All rows go into one problem as a block-diagonal sparse matrix on the free entries only.

A mask program (``MILP`` with binary ``z``) is solved as its LP relaxation; the result is reported as proven
optimal only when the relaxation's solution is integral (then it is optimal for the integer program — the
N:M and expander N:M constraint matrices are totally unimodular, so this is the expected outcome there).
The reported objective is always ``Program.evaluate`` on the returned values; ``proven_optimal`` is set only
when the solver says ``optimal`` (not ``optimal_inaccurate``) and never for OSQP (a first-order method whose
"solved" meets tolerances only: status ``first-order``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..base import Backend, Capabilities, SolveResult
from ..registry import register_backend
from .common import Layout, dead_columns, gram_factor, linear_rows, objective_terms

__all__ = ["CvxpyBackend"]

# accuracy settings: the cross-check asks for 1e-6 relative agreement on convex models
_SOLVER_OPTS = {
    "CLARABEL": dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, tol_ktratio=1e-8, max_iter=400),
    "OSQP": dict(eps_abs=1e-10, eps_rel=1e-10, max_iter=200000, polish=True),
    "SCS": dict(eps_abs=1e-9, eps_rel=1e-9, max_iters=200000),
    "HIGHS": dict(),
}

# the option names behind each solver's (relative gap, absolute gap, feasibility) tolerances, and the solver's
# defaults for those it is not given (HiGHS: its primal/dual feasibility tolerances, 1e-7)
_TOLERANCE_KEYS = {
    "CLARABEL": (("tol_gap_rel", 1e-8), ("tol_gap_abs", 1e-8), ("tol_feas", 1e-8)),
    "OSQP": (("eps_rel", 1e-3), ("eps_abs", 1e-3), ("eps_rel", 1e-3)),
    "SCS": (("eps_rel", 1e-4), ("eps_abs", 1e-4), ("eps_rel", 1e-4)),
    "HIGHS": (("dual_feasibility_tolerance", 1e-7), (None, 0.0), ("primal_feasibility_tolerance", 1e-7)),
}


def _tolerances(name: str, opts: dict) -> dict:
    """The tolerances a solve with these options holds to, as :class:`~.base.SolveResult` reports them."""
    keys = _TOLERANCE_KEYS.get(name)
    if keys is None:  # a solver without a declared table: no claim beyond the cross-check's own tolerance
        return {}
    return {field: float(opts.get(k, d)) if k else d
            for field, (k, d) in zip(("gap_tol", "abs_tol", "feas_tol"), keys)}


@register_backend
class CvxpyBackend(Backend):
    name = "cvxpy"
    capabilities = Capabilities(
        kinds=frozenset({"QP", "L1", "LP", "MILP"}), proves_optimality=True, max_variables=200_000, convex=True,
        variants=(("osqp", {"solver": "OSQP"}, frozenset({"QP"})), ("scs", {"solver": "SCS"}, frozenset({"QP", "L1"}))),
        note="convex QP/ℓ1 (Clarabel default; OSQP, SCS), LP (HiGHS); MILP only as LP relaxation, "
             "proven when integral")

    requires = "cvxpy"
    #: cvxpy's statuses are ours but for one; ``optimal`` is a proof only from an interior-point solver (below)
    statuses = {"optimal_inaccurate": "inaccurate"}

    def supports(self, program):
        ok, why = super().supports(program)
        if not ok:
            return ok, why
        if program.indicators():
            return False, "cvxpy backend does not take indicator (W–z coupling) constraints; use gurobi/scip"
        return True, ""

    def build(self, program, *, solver: str | None = None, verbose: bool = False, time_limit: float | None = None,
              solver_options: dict | None = None, **_) -> _Model:
        import cvxpy as cp
        lay = Layout(program)
        quad, l1s, lins = objective_terms(program)
        x = cp.Variable(lay.size)
        obj, cons, const = 0, [], 0.0
        if quad is not None:
            obj, cons, const = _data_form(program, lay, quad, x)
        for t in l1s:
            pos = lay.positions(t.var)
            pos = pos[pos >= 0]
            if pos.size:
                obj = obj + t.lam * cp.norm1(x[pos])
        for t in lins:
            pos = lay.positions(t.var)
            s = t.scores.to(torch.float64).reshape(-1).cpu().numpy()
            keep = pos >= 0
            if keep.any():
                obj = obj - s[keep] @ x[pos[keep]]
        cons += _linear_constraints(program, lay, x)
        binary = lay.binary_mask()
        if binary.any():  # LP relaxation of the binaries
            idx = np.nonzero(binary)[0]
            cons += [x[idx] >= 0, x[idx] <= 1]
        name = (solver or ("HIGHS" if quad is None and not l1s else "CLARABEL")).upper()
        return _Model(program, lay, x, cp.Problem(cp.Minimize(obj), cons), const, binary, quad is not None, name,
                      _solver_options(name, time_limit, solver_options), verbose)

    def optimize(self, model: _Model) -> None:
        import cvxpy as cp
        try:
            model.problem.solve(solver=model.solver, verbose=model.verbose, **model.options)
        except cp.error.SolverError as e:
            model.error = str(e).splitlines()[0] if str(e) else repr(e)

    def read_back(self, model: _Model, t0: float) -> SolveResult:
        label, prob, xv = f"cvxpy-{model.solver.lower()}", model.problem, model.x.value
        if model.error is not None:
            return SolveResult(label, "error", time=time.perf_counter() - t0, info={"error": model.error})
        elapsed = time.perf_counter() - t0
        stats = prob.solver_stats
        info = {"cvxpy_status": prob.status, "solver_time_s": getattr(stats, "solve_time", None),
                "iterations": getattr(stats, "num_iters", None), "solver_objective": prob.value}
        if xv is None:
            return SolveResult(label, "infeasible" if "infeasible" in prob.status else "error", time=elapsed,
                               info=info)
        values = model.layout.unpack(xv)
        proven = prob.status == "optimal"
        st = self.status(prob.status)
        if proven and model.solver == "OSQP":
            # OSQP is a first-order method: "solved" means its eps tolerances are met, not a proof. Measured on
            # the allocation QPs (one equality, box bounds): "optimal" answers up to 2e-5 above the optimum
            # (absolute), polished or not; on refit QPs within 1e-11 relative. Reported, never a reference.
            info["osqp_status_polish"] = getattr(getattr(getattr(stats, "extra_stats", None), "info", None),
                                                 "status_polish", None)
            proven, st = False, "first-order"
        bound = None
        if model.binary.any():
            frac = float(np.abs(xv[model.binary] - np.round(xv[model.binary])).max())
            info["max_fractionality"] = frac
            bound = float(prob.value) + model.const  # LP relaxation value bounds the integer optimum
            if frac <= 1e-6:
                for name_v, v in model.program.variables.items():
                    if v.domain == "binary":
                        values[name_v] = values[name_v].round()
            else:
                proven, st = False, "fractional"
        objective = model.program.evaluate(values)
        if model.quadratic:
            info["solver_objective_plus_const"] = float(prob.value) + model.const
        gap = 0.0 if proven else None
        if bound is not None and np.isfinite(objective):
            gap = max(0.0, objective - bound) / max(abs(objective), 1e-12)
        return SolveResult(label, st, objective, bound=bound, gap=gap, time=elapsed, values=values,
                           proven_optimal=proven, info=info, **_tolerances(model.solver, model.options))


@dataclass
class _Model:
    """A built cvxpy problem and what solving and reading it back need."""
    program: object
    layout: Layout
    x: object
    problem: object
    const: float          # the objective's constant, which the data form leaves out
    binary: np.ndarray    # binaries relaxed to [0, 1]
    quadratic: bool
    solver: str
    options: dict
    verbose: bool
    error: Optional[str] = None


def _data_form(program, lay: Layout, quad, x):
    """The layer objective as ``½‖A P x − y‖²`` over the rows' free live entries (block-diagonal ``A`` of the
    Gram factor's columns), the constraints fixing dead inputs' weights at 0, and the constant left out."""
    import cvxpy as cp
    import scipy.sparse as sp
    problem = program.problem
    R, Y = gram_factor(problem)
    m, n = problem.shape
    mp = lay.maps[quad.var].reshape(m, n)
    dead = dead_columns(problem)
    blocks, ys, pos_all, fixed_dead = [], [], [], []
    W0 = problem.W0.to(torch.float64)
    c_rows = (0.5 * ((W0 @ problem.H.to(torch.float64)) * W0).sum(1)).cpu().numpy()
    obj, cons, const = 0, [], 0.0
    for i in range(m):
        S = np.nonzero((mp[i] >= 0) & ~dead)[0]
        fixed_dead.extend(mp[i, (mp[i] >= 0) & dead].tolist())
        if S.size == 0:
            const += float(c_rows[i])
            continue
        blocks.append(sp.csr_matrix(R[:, S]))
        ys.append(Y[i])
        pos_all.append(mp[i, S])
        const += float(c_rows[i]) - 0.5 * float(Y[i] @ Y[i])
    if blocks:
        A = sp.block_diag(blocks, format="csr")
        k = sum(p.size for p in pos_all)
        P = sp.csr_matrix((np.ones(k), (np.arange(k), np.concatenate(pos_all))), shape=(A.shape[1], lay.size))
        obj = obj + 0.5 * cp.sum_squares((A @ P) @ x - np.concatenate(ys))
    if fixed_dead:  # dead inputs: their weights do not change f; fix them at 0 (exact)
        cons.append(x[np.array(fixed_dead)] == 0)
    return obj, cons, const


def _linear_constraints(program, lay: Layout, x) -> list:
    """The program's linear rows, each scaled to max |coefficient| 1 (the same constraint): the allocation
    QPs' mean-sparsity row carries layer sizes ~1e6, with which Clarabel failed on 12 of 100 instances."""
    import scipy.sparse as sp
    A, sense, rhs = linear_rows(program, lay)
    if A.shape[0]:
        s = np.asarray(abs(A).max(axis=1).todense()).reshape(-1)
        s[s == 0] = 1.0
        A, rhs = sp.diags(1.0 / s) @ A, rhs / s
    cons = []
    for sn, op in (("<=", lambda a, b: a <= b), (">=", lambda a, b: a >= b), ("==", lambda a, b: a == b)):
        sel = np.nonzero(sense == sn)[0]
        if sel.size:
            cons.append(op(A[sel] @ x, rhs[sel]))
    return cons


def _solver_options(name: str, time_limit, solver_options) -> dict:
    """The accuracy settings of ``name``, its time limit and the caller's options."""
    opts = dict(_SOLVER_OPTS.get(name, {}))
    if name == "OSQP":  # osqp ≥ 1.0 renamed 'polish'
        import osqp
        if int(str(getattr(osqp, "__version__", "0")).split(".")[0]) >= 1:
            opts["polishing"] = opts.pop("polish")
    if time_limit is not None:
        opts.update({"CLARABEL": {"time_limit": time_limit}, "HIGHS": {"time_limit": time_limit},
                     "SCS": {"time_limit_secs": time_limit}, "OSQP": {"time_limit": time_limit}}.get(name, {}))
    opts.update(solver_options or {})
    return opts
