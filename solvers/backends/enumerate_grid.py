"""Reference backend: exhaustive enumeration of the grid program on tiny instances (exact by construction).

The grid program (:func:`~optprune.formulations.programs.grid_program`, docs/methods.md §12) chooses for every
weight one of the ``2^b`` values of its grid, ``s_ij (q − z0_ij)`` — zero among them (``q = z0``: the weight is
pruned). Its objective is a sum of independent per-row terms ``f_i(w_i) = ½ w_iᵀ Ĥ w_i − b_iᵀ w_i + c_i``, so:

* every row's ``(2^b)^n`` value vectors are enumerated and scored in one batched quadratic form;
* *unstructured per row* and *N:M*: the best vector whose nonzeros obey the row's count / each group's count;
* *unstructured per matrix*: the best vector of each nonzero count per row, then an exact dynamic programme over
  the rows splits the matrix budget ``k``;
* *dense* (sparsity 0): any vector.

Candidates = rows × (2^b)^n; more than ``max_candidates`` (2^20) are refused with a message. The result is proven
optimal (status ``optimal``, gap 0).
"""
from __future__ import annotations

import math
import time

import torch

from ...formulations.grid import Quantized
from ...formulations.patterns import NM, ExpanderNM, Unstructured
from ..base import Capabilities, SolveResult, SolverUnavailable
from ..registry import register_backend
from .common import MAX_CANDIDATES, EnumerationBackend

__all__ = ["GridEnumerateBackend"]


def _row_codes(levels: int, n: int) -> torch.Tensor:
    """All ``levels^n`` code vectors (levels^n × n) as offsets 0..levels−1."""
    idx = torch.arange(levels ** n, dtype=torch.long)
    return torch.stack([(idx // levels ** j) % levels for j in range(n)], 1)


@register_backend
class GridEnumerateBackend(EnumerationBackend):
    name = "enumerate-grid"
    capabilities = Capabilities(kinds=frozenset({"MIQP"}), proves_optimality=True, integer=True,
                                patterns=frozenset({"grid"}),
                                note=f"grid programs by exhaustive enumeration; ≤ {MAX_CANDIDATES} candidates")

    def candidates(self, program) -> int:
        qz, pat = program.meta.get("quantizer"), program.pattern
        if qz is None or not isinstance(pat, Quantized) or program.problem is None:
            return -1
        if isinstance(pat.base, ExpanderNM) or not isinstance(pat.base, (Unstructured, NM)):
            return -1
        m, n = program.problem.shape
        return m * qz.spec.levels ** n

    def refusal(self, program) -> str:
        return "enumerate-grid takes grid programs over unstructured / N:M patterns"

    def solve(self, program, *, max_candidates: int = MAX_CANDIDATES, **_) -> SolveResult:
        self.check(program)
        if self.candidates(program) > max_candidates:
            raise SolverUnavailable(f"more than {max_candidates} candidates")
        t0 = time.perf_counter()
        p = program.problem.to(torch.float64)
        pat, qz = program.pattern, program.meta["quantizer"].to(torch.float64)
        base, spec = pat.base, qz.spec
        m, n = p.shape
        Hh, B = p.Hh, p.target(torch.float64)
        c = 0.5 * ((p.W0 @ p.H) * p.W0).sum(1)
        offs = _row_codes(spec.levels, n)                        # (K, n) code − q_min
        best_rows = []
        per_count = []                                           # matrix scope: per row, best by nonzero count
        for i in range(m):
            q = offs.to(torch.float64) + spec.qmin               # (K, n) codes
            s = qz.scales_full(dtype=torch.float64)[i]
            z0 = qz.zeros_full(dtype=torch.float64)[i]
            Wc = s * (q - z0)                                    # (K, n) candidate rows
            f = 0.5 * ((Wc @ Hh) * Wc).sum(1) - Wc @ B[i] + c[i]
            nz = Wc != 0
            if isinstance(base, Unstructured) and base.scope == "matrix":
                cnt = nz.sum(1)
                table = torch.full((n + 1,), math.inf, dtype=torch.float64)
                arg = torch.zeros(n + 1, dtype=torch.long)
                for k in range(n + 1):
                    sel = cnt == k
                    if bool(sel.any()):
                        j = int(torch.argmin(torch.where(sel, f, torch.full_like(f, math.inf))))
                        table[k], arg[k] = f[j], j
                per_count.append((table, arg, Wc, q))
                continue
            if isinstance(base, Unstructured):
                ok = nz.sum(1) <= n - base.prune_count(n)
            else:  # N:M
                ok = (nz.reshape(-1, n // base.M, base.M).sum(2) <= base.N).all(1)
            j = int(torch.argmin(torch.where(ok, f, torch.full_like(f, math.inf))))
            best_rows.append((Wc[j], q[j]))
        if per_count:  # split the matrix budget k over the rows (exact DP over kept counts)
            budget = base.kept_count((m, n))
            dp = torch.full((budget + 1,), math.inf, dtype=torch.float64)
            dp[0] = 0.0
            choice = []
            for table, _, _, _ in per_count:
                new = torch.full_like(dp, math.inf)
                pick = torch.zeros(budget + 1, dtype=torch.long)
                for used in range(budget + 1):
                    if not math.isfinite(float(dp[used])):
                        continue
                    for k in range(min(n, budget - used) + 1):
                        v = float(dp[used] + table[k])
                        if v < float(new[used + k]):
                            new[used + k], pick[used + k] = v, k
                choice.append(pick)
                dp = new
            total = int(torch.argmin(dp))
            counts = []
            for pick in reversed(choice):
                k = int(pick[total])
                counts.append(k)
                total -= k
            counts.reverse()
            best_rows = [(Wc[arg[k]], q[arg[k]]) for (table, arg, Wc, q), k in zip(per_count, counts)]
        W = torch.stack([w for w, _ in best_rows])
        Q = torch.stack([q for _, q in best_rows])
        values = {"W": W, "z": (W != 0).to(torch.float64), "q": Q}
        for name, v in program.variables.items():
            if name not in values:  # auxiliary binaries of plug-in base patterns are not enumerated
                raise SolverUnavailable(f"enumerate-grid does not set the auxiliary variable {name!r}")
        obj = program.evaluate(values)
        return SolveResult("enumerate-grid", "optimal", obj, bound=obj, gap=0.0, time=time.perf_counter() - t0,
                           values=values, proven_optimal=True,
                           info={"candidates": self.candidates(program)})
