"""Reference backend: exhaustive enumeration for tiny integer instances (exact by construction).

* **L0 mask-and-weights MIQP** (``l0_program``). For a fixed support the best weights are the exact
  least-squares refit (:func:`~optprune.solvers.methods.baselines.refit_weights`), so the MIQP is a search over masks.
  The objective is a sum of independent per-row terms (``f = Σ_i f_i(w_i)``, all rows share ``Ĥ``), hence:

  - *unstructured per row* and *N:M*: every row's feasible masks are enumerated (all subsets obeying the
    row/group counts) and the best one is kept per row;
  - *unstructured per matrix*: every row's masks of every size are enumerated; an exact dynamic programme
    over rows then splits the matrix budget ``k`` (``best_i(c)`` = best row-i error with ``c`` kept);
  - *column groups*: every subset of exactly ``keep`` groups is enumerated (the rows share the mask).

  Candidates counted = (rows × row masks) or group subsets; more than ``max_candidates`` (default 2^20) is
  refused with a message. Expander N:M is not enumerated for the L0 model (its rows are coupled by tiles).
* **Mask programs** (``mask_program``, linear objective, ``LinearRow`` constraints over binaries): the
  variables are split into independent components (variables linked by a constraint share one); each
  component's 2^size assignments are checked against its rows and the best score kept; components larger
  than 20 binaries are refused. Column-group mask programs enumerate the group subsets directly.

The result is proven optimal (status ``optimal``, gap 0) — up to the refit's float64 round-off.
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch

from ...formulations.patterns import NM, ColumnGroups, ExpanderNM, Unstructured
from ...formulations.problem import LayerProblem
from ...formulations.programs import LayerObjective, LinearScore
from ..base import Backend, Capabilities, SolveResult, SolverUnavailable
from ..registry import register_backend
from .common import MAX_CANDIDATES, EnumerationBackend, Layout, linear_rows

__all__ = ["EnumerateBackend", "MAX_CANDIDATES"]

_MAX_COMPONENT = 20


def _row_masks(n: int) -> torch.Tensor:
    """All 2^n boolean row masks (2^n × n), bit j of the index ↔ column j."""
    idx = torch.arange(1 << n, dtype=torch.long)
    return ((idx.unsqueeze(1) >> torch.arange(n)) & 1).bool()


def _feasible_row_masks(pattern, n: int) -> torch.Tensor:
    R = _row_masks(n)
    if isinstance(pattern, Unstructured):
        if pattern.scope == "row":
            return R[R.sum(1) <= n - pattern.prune_count(n)]
        return R  # matrix scope: every row mask; the DP enforces the budget
    if isinstance(pattern, NM):
        g = R.reshape(R.shape[0], n // pattern.M, pattern.M).sum(2)
        return R[(g <= pattern.N).all(1)]
    raise SolverUnavailable(f"enumeration of the L0 model does not handle the {pattern.name} pattern")


def _rows_objective(problem: LayerProblem, rows: torch.Tensor, masks: torch.Tensor,
                    chunk: int = 1 << 15) -> torch.Tensor:
    """f_i of the refit for (row index, mask) pairs: rows (K,), masks (K, n) → (K,) float64."""
    from ..methods.baselines import refit_weights
    p64 = problem.to(torch.float64)
    out = torch.empty(rows.numel(), dtype=torch.float64)
    for s in range(0, rows.numel(), chunk):
        r = rows[s:s + chunk]
        sub = LayerProblem(W0=p64.W0[r], H=p64.H, Hhat=p64.Hhat, C=p64.C, name=problem.name)
        mk = masks[s:s + chunk]
        W = refit_weights(sub, mk)
        out[s:s + chunk] = sub.objective(W * mk, per_row=True)
    return out


def _l0_count(program) -> int:
    problem, pat = program.problem, program.pattern
    m, n = problem.shape
    if isinstance(pat, ColumnGroups):
        return math.comb(pat.n_groups(n), pat.keep_groups(n))
    if isinstance(pat, ExpanderNM):
        return -1
    if isinstance(pat, Unstructured) and pat.scope == "row":
        return m * sum(math.comb(n, k) for k in range(0, n - pat.prune_count(n) + 1))
    if isinstance(pat, NM):
        per = sum(math.comb(pat.M, k) for k in range(pat.N + 1)) ** (n // pat.M)
        return m * per
    if isinstance(pat, Unstructured):
        return m * (1 << n)
    if any(v != "z" for r in pat.constraints((m, n)) for v, *_ in r.terms):
        return -1   # a plug-in pattern with auxiliary variables: not enumerated here
    return 1 << (m * n)   # any other (plug-in) pattern: every mask of the matrix, checked against its rows


def _l0_generic(problem: LayerProblem, pat) -> torch.Tensor:
    """Exact L0 optimum for a pattern known only by its linear rows over ``z``: the refit objective is a sum of
    per-row terms, so it is tabulated per (row, row mask), then every whole-matrix mask is scored and the
    feasible one of least total kept. Returns the optimal mask (m × n)."""
    m, n = problem.shape
    R = _row_masks(n)
    K = R.shape[0]
    f = _rows_objective(problem, torch.arange(m).repeat_interleave(K), R.repeat(m, 1)).reshape(m, K)
    rows = pat.constraints((m, n))
    A = torch.zeros(len(rows), m * n, dtype=torch.float64)
    for i, r in enumerate(rows):
        for _, idx, coef in r.terms:
            A[i].index_add_(0, torch.as_tensor(idx).reshape(-1), torch.as_tensor(coef, dtype=torch.float64).reshape(-1))
    rhs = torch.tensor([float(r.rhs) for r in rows], dtype=torch.float64)
    sense = [r.sense for r in rows]
    best, best_idx = math.inf, None
    total = K ** m
    step = 1 << 16
    for s0 in range(0, total, step):
        code = torch.arange(s0, min(total, s0 + step), dtype=torch.long)
        digits = [(code // (K ** i)) % K for i in range(m)]          # row i's mask index
        z = torch.cat([R[d] for d in digits], 1).to(torch.float64)   # (B, m·n), row-major
        lhs = z @ A.T
        ok = torch.ones(code.numel(), dtype=torch.bool)
        for j, sj in enumerate(sense):
            ok &= {"<=": lhs[:, j] <= rhs[j] + 1e-9, ">=": lhs[:, j] >= rhs[j] - 1e-9,
                   "==": (lhs[:, j] - rhs[j]).abs() <= 1e-9}[sj]
        if not bool(ok.any()):
            continue
        tot = sum(f[i, digits[i]] for i in range(m))
        tot[~ok] = math.inf
        j = int(torch.argmin(tot))
        if float(tot[j]) < best:
            best, best_idx = float(tot[j]), [int(d[j]) for d in digits]
    if best_idx is None:
        raise SolverUnavailable(f"enumeration found no mask satisfying the {pat.name} pattern's rows")
    return torch.stack([R[d] for d in best_idx])


def _components(program, lay: Layout):
    """Union-find over the flat variables linked by linear rows → list of (variables, row indices)."""
    A, sense, rhs = linear_rows(program, lay)
    parent = np.arange(lay.size)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    A = A.tocsr()
    for r in range(A.shape[0]):
        cols = A.indices[A.indptr[r]:A.indptr[r + 1]]
        for c in cols[1:]:
            ra, rb = find(cols[0]), find(c)
            if ra != rb:
                parent[rb] = ra
    roots = np.array([find(i) for i in range(lay.size)])
    comps = {}
    for i, r in enumerate(roots):
        comps.setdefault(r, []).append(i)
    row_of = {}
    for r in range(A.shape[0]):
        cols = A.indices[A.indptr[r]:A.indptr[r + 1]]
        if cols.size:
            row_of.setdefault(roots[cols[0]], []).append(r)
    return [(np.array(v), row_of.get(k, [])) for k, v in comps.items()], A, sense, rhs


@register_backend
class EnumerateBackend(EnumerationBackend):
    name = "enumerate"
    capabilities = Capabilities(kinds=frozenset({"MIQP", "MILP"}), proves_optimality=True, integer=True,
                                note=f"exhaustive; ≤ {MAX_CANDIDATES} candidates (2^20)")

    def candidates(self, program) -> int:
        """Number of candidates this program needs (−1: not enumerable)."""
        if program.kind == "MIQP":
            if program.problem is None or program.pattern is None:
                return -1
            if program.meta.get("quantizer") is not None:
                return -1  # grid programs: backend 'enumerate-grid' (enumerate_grid.py)
            if any(not isinstance(t, LayerObjective) for t in program.objective) or program.meta.get("fixed_weights"):
                return -1  # (the search below refits the weights: not the mask-only program)
            return _l0_count(program)
        if any(not isinstance(t, LinearScore) for t in program.objective):
            return -1
        if isinstance(program.pattern, ColumnGroups):
            n = program.variables["z"].shape[1]
            return math.comb(program.pattern.n_groups(n), program.pattern.keep_groups(n))
        lay = Layout(program)
        comps, *_ = _components(program, lay)
        if max(len(c) for c, _ in comps) > _MAX_COMPONENT:
            return -1
        return sum(1 << len(c) for c, _ in comps)

    def refusal(self, program) -> str:
        return f"enumeration cannot split this {program.kind} ({program.pattern}) into small pieces"

    def solve(self, program, *, max_candidates: int = MAX_CANDIDATES, **_) -> SolveResult:
        ok, why = Backend.supports(self, program)
        if not ok:
            raise SolverUnavailable(why)
        k = self.candidates(program)
        if k < 0 or k > max_candidates:
            raise SolverUnavailable(
                f"enumeration refused: {'not decomposable' if k < 0 else f'{k} candidates > limit {max_candidates}'}"
                f" for this {program.kind}; use gurobi or scip")
        t0 = time.perf_counter()
        if program.kind == "MIQP":
            values = self._l0(program)
        else:
            values = self._mask(program)
        obj = program.evaluate(values)
        return SolveResult("enumerate", "optimal", obj, bound=obj, gap=0.0, time=time.perf_counter() - t0,
                           values=values, proven_optimal=True, info={"candidates": k})

    # ------------------------------------------------------------------ L0 MIQP
    def _l0(self, program) -> dict:
        from ..methods.baselines import refit_weights
        problem, pat = program.problem.to(torch.float64), program.pattern
        m, n = problem.shape
        if isinstance(pat, ColumnGroups):
            g, keep = pat.n_groups(n), pat.keep_groups(n)
            best, best_mask = math.inf, None
            combos = list(itertools.combinations(range(g), keep))
            step = max(1, (1 << 15) // m)
            for s in range(0, len(combos), step):
                cs = combos[s:s + step]
                gmask = torch.zeros(len(cs), g, dtype=torch.bool)
                for t, c in enumerate(cs):
                    gmask[t, list(c)] = True
                gi = pat.group_index(n)
                cm = gmask[:, gi]  # (K, n) column masks
                rows = torch.arange(m).repeat(len(cs))
                masks = cm.repeat_interleave(m, 0)
                f = _rows_objective(problem, rows, masks).reshape(len(cs), m).sum(1)
                j = int(torch.argmin(f))
                if float(f[j]) < best:
                    best, best_mask = float(f[j]), gmask[j]
            mask = pat.mask_from_groups(best_mask, m, n)
            W = refit_weights(problem, mask) * mask
            return {"W": W, "g": best_mask.to(torch.float64)}
        if not isinstance(pat, (Unstructured, NM)):  # a plug-in pattern: whole-matrix enumeration over its rows
            mask = _l0_generic(problem, pat)
            W = refit_weights(problem, mask) * mask
            return {"W": W, "z": mask.to(torch.float64)}
        R = _feasible_row_masks(pat, n)
        K = R.shape[0]
        rows = torch.arange(m).repeat_interleave(K)
        f = _rows_objective(problem, rows, R.repeat(m, 1)).reshape(m, K)
        if isinstance(pat, Unstructured) and pat.scope == "matrix":
            budget = pat.kept_count((m, n))
            cnt = R.sum(1)
            # best_i(c) and argmin per kept count c
            best_c = torch.full((m, n + 1), math.inf, dtype=torch.float64)
            arg_c = torch.zeros(m, n + 1, dtype=torch.long)
            for c in range(n + 1):
                sel = torch.nonzero(cnt == c).reshape(-1)
                v, a = f[:, sel].min(1)
                best_c[:, c], arg_c[:, c] = v, sel[a]
            # DP over rows: D[b] = best total with ≤ b kept so far
            D = torch.zeros(budget + 1, dtype=torch.float64)
            choice = []
            for i in range(m):
                ND = torch.full((budget + 1,), math.inf, dtype=torch.float64)
                NC = torch.zeros(budget + 1, dtype=torch.long)
                for c in range(min(n, budget) + 1):
                    cand = torch.full((budget + 1,), math.inf, dtype=torch.float64)
                    cand[c:] = D[:budget + 1 - c] + best_c[i, c]
                    better = cand < ND
                    ND[better], NC[better] = cand[better], c
                D = ND
                choice.append(NC)
            b = int(torch.argmin(D))
            sel_rows = []
            for i in reversed(range(m)):
                c = int(choice[i][b])
                sel_rows.append(int(arg_c[i, c]))
                b -= c
            idx = torch.tensor(list(reversed(sel_rows)))
        else:
            idx = torch.argmin(f, 1)
        mask = R[idx]
        W = refit_weights(problem, mask) * mask
        return {"W": W, "z": mask.to(torch.float64)}

    # ------------------------------------------------------------------ mask programs
    def _mask(self, program) -> dict:
        pat = program.pattern
        (score,) = [t for t in program.objective if isinstance(t, LinearScore)]
        S = score.scores.to(torch.float64)
        if isinstance(pat, ColumnGroups):
            m, n = S.shape
            g, keep = pat.n_groups(n), pat.keep_groups(n)
            gi = pat.group_index(n)
            pos = S.clamp_min(0)  # with a group kept, take exactly its positive-score entries
            gval = torch.zeros(g, dtype=torch.float64).index_add_(0, gi, pos.sum(0))
            best, bg = -math.inf, None
            for c in itertools.combinations(range(g), keep):
                v = float(gval[list(c)].sum())
                if v > best:
                    best, bg = v, c
            gm = torch.zeros(g, dtype=torch.bool)
            gm[list(bg)] = True
            z = gm[gi].unsqueeze(0).expand(m, n) & (S > 0)
            return {"z": z.to(torch.float64), "g": gm.to(torch.float64)}
        lay = Layout(program)
        comps, A, sense, rhs = _components(program, lay)
        c = np.zeros(lay.size)
        for t in program.objective:
            pos = lay.positions(t.var)
            c[pos[pos >= 0]] += t.scores.to(torch.float64).reshape(-1).cpu().numpy()[pos >= 0]
        x = np.zeros(lay.size)
        for vars_, rows in comps:
            k = len(vars_)
            bits = ((np.arange(1 << k)[:, None] >> np.arange(k)) & 1).astype(np.float64)
            ok = np.ones(bits.shape[0], dtype=bool)
            if rows:
                Ar = A[rows][:, vars_].toarray()
                lhs = bits @ Ar.T
                for j, r in enumerate(rows):
                    s, b = sense[r], rhs[r]
                    ok &= (lhs[:, j] <= b + 1e-9) if s == "<=" else (lhs[:, j] >= b - 1e-9) if s == ">=" \
                        else (np.abs(lhs[:, j] - b) <= 1e-9)
            if not ok.any():
                raise SolverUnavailable("enumeration found no feasible assignment (infeasible program)")
            val = np.where(ok, bits @ c[vars_], -np.inf)
            x[vars_] = bits[int(np.argmax(val))]
        return lay.unpack(x)
