"""Reference backend: the eigen-program (``EIG``) through its exact SDP relaxation, with cvxpy (Clarabel or SCS).

``max tr(QᵀMQ) s.t. QᵀQ = I_k`` is solved as ``max tr(MP) s.t. 0 ⪯ P ⪯ I, tr P = k`` (exact: the extreme
points of that set are the rank-k orthogonal projections — docs/methods.md §11). The answer handed back is
``Q`` = the ``k`` leading eigenvectors of the solver's ``P`` (a feasible point of the original program, scored by
``Program.evaluate``); ``bound`` is the SDP's optimal value (a bound on the program, up to the solver's
tolerance). An interior-point solve is independent of the production solver's symmetric eigendecomposition:
it never forms an eigenvector of ``M``. ``M`` is scaled to unit trace for the solve (the answer is unchanged).
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch

from ..base import Backend, Capabilities, SolveResult
from ..registry import register_backend

__all__ = ["SDPBackend"]

_OPTS = {"CLARABEL": dict(tol_gap_abs=1e-9, tol_gap_rel=1e-9, tol_feas=1e-9, max_iter=400),  # 1e-10: 2 of 30 "inaccurate"
         "SCS": dict(eps_abs=1e-9, eps_rel=1e-9, max_iters=200000)}


@register_backend
class SDPBackend(Backend):
    name = "sdp"
    capabilities = Capabilities(kinds=frozenset({"EIG"}), proves_optimality=True, max_variables=5_000, convex=True,
                                variants=(("scs", {"solver": "SCS"}, frozenset({"EIG"})),),
                                note="eigen-programs as their exact SDP relaxation (Clarabel default; SCS)")

    requires = "cvxpy"

    def supports(self, program):
        ok, why = super().supports(program)
        if not ok:
            return ok, why
        m = int(program.variables["Q"].shape[0])
        if m * m > (self.capabilities.max_variables or m * m):
            return False, f"an {m}×{m} SDP is beyond this backend's limit"
        return True, ""

    def build(self, program, *, solver: str | None = None, time_limit: float | None = None, verbose: bool = False,
              **_):
        """The SDP relaxation ``max tr(M P)`` over ``0 ⪯ P ⪯ I``, ``tr P = k``, with ``M`` scaled to trace 1."""
        import cvxpy as cp
        M = program.meta["M"].to(torch.float64).cpu()
        k = int(program.meta["k"])
        m = M.shape[0]
        scale = float(torch.trace(M).abs()) or 1.0
        name = (solver or "CLARABEL").upper()
        P = cp.Variable((m, m), symmetric=True)
        cons = [P >> 0, np.eye(m) - P >> 0, cp.trace(P) == k]
        opts = dict(_OPTS.get(name, {}))
        if time_limit is not None:
            opts.update({"CLARABEL": {"time_limit": time_limit}, "SCS": {"time_limit_secs": time_limit}}.get(name, {}))
        return SimpleNamespace(program=program, k=k, m=m, scale=scale, solver=name, P=P, options=opts,
                               problem=cp.Problem(cp.Maximize(cp.trace((M / scale).numpy() @ P)), cons),
                               verbose=verbose, error=None)

    def optimize(self, model) -> None:
        import cvxpy as cp
        try:
            model.problem.solve(solver=model.solver, verbose=model.verbose, **model.options)
        except cp.error.SolverError as e:
            model.error = str(e).splitlines()[0] if str(e) else repr(e)

    def read_back(self, model, t0: float) -> SolveResult:
        label, prob, Pv, k = f"sdp-{model.solver.lower()}", model.problem, model.P.value, model.k
        elapsed = time.perf_counter() - t0
        if model.error is not None:
            return SolveResult(label, "error", time=elapsed, info={"error": model.error})
        info = {"cvxpy_status": prob.status, "sdp_value": None if prob.value is None else float(prob.value) * model.scale}
        if Pv is None:
            return SolveResult(label, "error", time=elapsed, info=info)
        ev, V = np.linalg.eigh(0.5 * (Pv + Pv.T))
        Q = torch.from_numpy(V[:, ::-1][:, :k].copy())
        info["P_eigenvalues_kept_min"] = float(ev[::-1][k - 1])
        info["P_eigenvalues_dropped_max"] = float(ev[::-1][k]) if k < model.m else None
        values = {"Q": Q}
        proven = prob.status == "optimal"
        return SolveResult(label, self.status(prob.status), model.program.evaluate(values),
                           bound=-float(prob.value) * model.scale, gap=0.0 if proven else None, time=elapsed,
                           values=values, proven_optimal=proven, info=info)
