"""Reference backends of binary quadratic programs (kind ``'BQP'``: the depth knapsack, docs/methods.md §13).

A BQP has one binary vector ``z`` (shape ``(n,)``), the objective ``Σ c_i z_i + Σ_{i<j} Q_ij z_i z_j``
(:class:`~optprune.formulations.depth.PairwiseCost`) and linear rows over ``z``. Two references:

* ``bqp-enumerate`` — every one of the ``2^n`` selections is scored (vectorised in chunks) and the best
  feasible one kept: exact by construction, ``n ≤ 20``;
* ``bqp-gurobi`` — the same model in gurobipy (binary variables, the quadratic objective, the linear rows),
  solved to a proven optimum (``MIPGap`` 1e-9); the pip licence's 200-variable limit for quadratic models
  is far above the instances verified here.

Both return ``values={"z": ...}``; the objective is ``Program.evaluate`` of that ``z``.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from ..base import Backend, Capabilities, SolveResult, SolverUnavailable
from ..registry import register_backend

__all__ = ["BQPEnumerateBackend", "BQPGurobiBackend", "MAX_ENUMERATE"]

MAX_ENUMERATE = 20


def _terms(program):
    from ...formulations.depth import PairwiseCost
    if len(program.objective) != 1 or not isinstance(program.objective[0], PairwiseCost):
        raise SolverUnavailable("a BQP's objective must be one PairwiseCost term")
    t = program.objective[0]
    n = int(program.variables["z"].shape[0])
    rows = []
    for r in program.linear_rows():
        a = torch.zeros(n, dtype=torch.float64)
        for var, idx, coef in r.terms:
            if var != "z":
                raise SolverUnavailable(f"a BQP row over variable {var!r}")
            a.index_add_(0, torch.as_tensor(idx).reshape(-1), torch.as_tensor(coef, dtype=torch.float64).reshape(-1))
        rows.append((a, r.sense, float(r.rhs)))
    return t.c.to(torch.float64), torch.triu(t.Q.to(torch.float64), 1), rows, n


@register_backend
class BQPEnumerateBackend(Backend):
    name = "bqp-enumerate"
    capabilities = Capabilities(kinds=frozenset({"BQP"}), proves_optimality=True, integer=True,
                                max_integer=MAX_ENUMERATE, note=f"exhaustive over 2^n selections, n ≤ {MAX_ENUMERATE}")

    def solve(self, program, **_) -> SolveResult:
        self.check(program)
        t0 = time.perf_counter()
        c, Q, rows, n = _terms(program)
        best, best_z = float("inf"), None
        step = 1 << 16
        for s0 in range(0, 1 << n, step):
            code = torch.arange(s0, min(1 << n, s0 + step), dtype=torch.long)
            Z = ((code.unsqueeze(1) >> torch.arange(n)) & 1).to(torch.float64)
            ok = torch.ones(Z.shape[0], dtype=torch.bool)
            for a, sense, rhs in rows:
                lhs = Z @ a
                tol = 1e-9 * max(1.0, abs(rhs))
                ok &= {"<=": lhs <= rhs + tol, ">=": lhs >= rhs - tol, "==": (lhs - rhs).abs() <= tol}[sense]
            if not bool(ok.any()):
                continue
            f = Z @ c + ((Z @ Q) * Z).sum(1)
            f[~ok] = float("inf")
            j = int(torch.argmin(f))
            if float(f[j]) < best:
                best, best_z = float(f[j]), Z[j].clone()
        if best_z is None:
            return SolveResult(self.name, "infeasible", time=time.perf_counter() - t0)
        return SolveResult(self.name, "optimal", objective=program.evaluate({"z": best_z}), bound=best, gap=0.0,
                           time=time.perf_counter() - t0, values={"z": best_z}, proven_optimal=True)


@register_backend
class BQPGurobiBackend(Backend):
    name = "bqp-gurobi"
    capabilities = Capabilities(kinds=frozenset({"BQP"}), proves_optimality=True, integer=True, max_integer=200,
                                note="gurobipy, binary quadratic model; pip licence: ≤ 200 binaries")

    requires = "gurobipy"

    @property
    def statuses(self) -> dict:
        from gurobipy import GRB
        return {GRB.OPTIMAL: "optimal", GRB.TIME_LIMIT: "time_limit", GRB.INFEASIBLE: "infeasible"}

    def build(self, program, *, time_limit: float | None = None, threads: int | None = None, **_):
        import gurobipy as gp
        from gurobipy import GRB

        from .gurobi import gurobi_env
        c, Q, rows, n = _terms(program)
        env = gurobi_env()
        mdl = gp.Model(env=env)
        mdl.Params.OutputFlag = 0
        mdl.Params.MIPGap = 1e-9
        mdl.Params.MIPGapAbs = 1e-12
        if threads:
            mdl.Params.Threads = int(threads)
        if time_limit is not None:
            mdl.Params.TimeLimit = float(time_limit)
        z = mdl.addMVar(n, vtype=GRB.BINARY)
        mdl.setObjective(c.numpy() @ z + z @ Q.numpy() @ z, GRB.MINIMIZE)
        for a, sense, rhs in rows:
            expr = a.numpy() @ z
            mdl.addConstr(expr <= rhs if sense == "<=" else expr >= rhs if sense == ">=" else expr == rhs)
        return SimpleNamespace(program=program, env=env, mdl=mdl, z=z)

    def optimize(self, model) -> None:
        model.mdl.optimize()

    def read_back(self, model, t0: float) -> SolveResult:
        mdl, dt = model.mdl, time.perf_counter() - t0
        status = self.status(mdl.Status)
        if mdl.SolCount == 0:
            return SolveResult(self.name, status if status in ("infeasible", "time_limit") else "error", time=dt)
        zv = torch.as_tensor(model.z.X, dtype=torch.float64).round()
        return SolveResult(self.name, status, objective=model.program.evaluate({"z": zv}), bound=float(mdl.ObjBound),
                           gap=float(mdl.MIPGap), time=dt, values={"z": zv}, proven_optimal=status == "optimal")
