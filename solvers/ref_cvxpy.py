"""Reference backend: cvxpy for the convex models (refit QP, ℓ1 model) and the LP relaxation of mask programs.

Solvers: Clarabel (default for QP/ℓ1), OSQP, SCS, and HiGHS (default for LP). The layer objective is handed
to cvxpy in *data form*: with ``Ĥ = RᵀR`` (eigen square root, :func:`.ref_common.gram_factor`) and
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

import numpy as np
import torch

from .base import Backend, Capabilities, SolveResult, SolverUnavailable, Timer
from .ref_common import Layout, dead_columns, gram_factor, linear_rows, objective_terms
from .registry import register_backend

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

    def supports(self, program):
        ok, why = super().supports(program)
        if not ok:
            return ok, why
        if program.indicators():
            return False, "cvxpy backend does not take indicator (W–z coupling) constraints; use gurobi/scip"
        return True, ""

    def solve(self, program, *, solver: str | None = None, verbose: bool = False, time_limit: float | None = None,
              solver_options: dict | None = None, **_) -> SolveResult:
        ok, why = self.supports(program)
        if not ok:
            raise SolverUnavailable(why)
        import cvxpy as cp
        import scipy.sparse as sp

        with Timer() as t_all:
            lay = Layout(program)
            quad, l1s, lins = objective_terms(program)
            x = cp.Variable(lay.size)
            obj = 0
            cons = []
            const = 0.0
            if quad is not None:
                problem = program.problem
                R, Y = gram_factor(problem)
                m, n = problem.shape
                mp = lay.maps[quad.var].reshape(m, n)
                dead = dead_columns(problem)
                blocks, ys, pos_all = [], [], []
                fixed_dead = []
                W0 = problem.W0.to(torch.float64)
                c_rows = (0.5 * ((W0 @ problem.H.to(torch.float64)) * W0).sum(1)).cpu().numpy()
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
                    P = sp.csr_matrix((np.ones(sum(p.size for p in pos_all)),
                                       (np.arange(sum(p.size for p in pos_all)), np.concatenate(pos_all))),
                                      shape=(A.shape[1], lay.size))
                    obj = obj + 0.5 * cp.sum_squares((A @ P) @ x - np.concatenate(ys))
                if fixed_dead:  # dead inputs: their weights do not change f; fix them at 0 (exact)
                    cons.append(x[np.array(fixed_dead)] == 0)
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
            A, sense, rhs = linear_rows(program, lay)
            if A.shape[0]:  # each row scaled to max |coefficient| 1 (the same constraint): the allocation QPs'
                # mean-sparsity row carries layer sizes ~1e6, with which Clarabel failed on 12 of 100 instances
                import scipy.sparse as sp_
                s = np.asarray(abs(A).max(axis=1).todense()).reshape(-1)
                s[s == 0] = 1.0
                A, rhs = sp_.diags(1.0 / s) @ A, rhs / s
            for sn, op in (("<=", lambda a, b: a <= b), (">=", lambda a, b: a >= b), ("==", lambda a, b: a == b)):
                sel = np.nonzero(sense == sn)[0]
                if sel.size:
                    cons.append(op(A[sel] @ x, rhs[sel]))
            binm = lay.binary_mask()
            if binm.any():  # LP relaxation of the binaries
                idx = np.nonzero(binm)[0]
                cons += [x[idx] >= 0, x[idx] <= 1]
            prob = cp.Problem(cp.Minimize(obj), cons)
            name = (solver or ("HIGHS" if quad is None and not l1s else "CLARABEL")).upper()
            opts = dict(_SOLVER_OPTS.get(name, {}))
            if name == "OSQP":  # osqp ≥ 1.0 renamed 'polish'
                try:
                    import osqp
                    if int(str(getattr(osqp, "__version__", "0")).split(".")[0]) >= 1:
                        opts["polishing"] = opts.pop("polish")
                except ImportError:
                    pass
            if time_limit is not None:
                opts.update({"CLARABEL": {"time_limit": time_limit}, "HIGHS": {"time_limit": time_limit},
                             "SCS": {"time_limit_secs": time_limit}, "OSQP": {"time_limit": time_limit}}.get(name, {}))
            opts.update(solver_options or {})
            try:
                prob.solve(solver=name, verbose=verbose, **opts)
            except cp.error.SolverError as e:
                msg = str(e).splitlines()[0] if str(e) else repr(e)
                return SolveResult(f"cvxpy-{name.lower()}", "error", time=time.perf_counter() - t_all.t0,
                                   info={"error": msg})
            status = prob.status
            xv = x.value
        stats = prob.solver_stats
        info = {"cvxpy_status": status, "solver_time_s": getattr(stats, "solve_time", None),
                "iterations": getattr(stats, "num_iters", None), "solver_objective": prob.value}
        if xv is None:
            return SolveResult(f"cvxpy-{name.lower()}", "infeasible" if "infeasible" in status else "error",
                               time=t_all.elapsed, info=info)
        values = lay.unpack(xv)
        proven = status == "optimal"
        st = "optimal" if proven else ("inaccurate" if status == "optimal_inaccurate" else status)
        if proven and name == "OSQP":
            # OSQP is a first-order method: "solved" means its eps tolerances are met, not a proof. Measured on
            # the allocation QPs (one equality, box bounds): "optimal" answers up to 2e-5 above the optimum
            # (absolute), polished or not; on refit QPs within 1e-11 relative. Reported, never a reference.
            info["osqp_status_polish"] = getattr(getattr(getattr(stats, "extra_stats", None), "info", None),
                                                 "status_polish", None)
            proven, st = False, "first-order"
        bound = None
        if binm.any():
            frac = float(np.abs(xv[binm] - np.round(xv[binm])).max())
            info["max_fractionality"] = frac
            bound = float(prob.value) + const  # LP relaxation value bounds the integer optimum
            if frac <= 1e-6:
                for name_v, v in program.variables.items():
                    if v.domain == "binary":
                        values[name_v] = values[name_v].round()
            else:
                proven, st = False, "fractional"
        objective = program.evaluate(values)
        if quad is not None:
            info["solver_objective_plus_const"] = float(prob.value) + const
        gap = 0.0 if proven else None
        if bound is not None and np.isfinite(objective):
            gap = max(0.0, objective - bound) / max(abs(objective), 1e-12)
        return SolveResult(f"cvxpy-{name.lower()}", st, objective, bound=bound, gap=gap, time=t_all.elapsed,
                           values=values, proven_optimal=proven, info=info, **_tolerances(name, opts))
