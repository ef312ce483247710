"""Row-wise bounds that certify: a Lagrangian over the matrix-wide count, and exact branch-and-bound on rows
(docs/methods.md §8).

Every output row i of the L0 program, with its kept count fixed, is a problem of its own::

    φ_i(S) = f*_i + min_{w: w_j = 0, j ∈ P} ½ (w − w*_i) Ĥ (w − w*_i)ᵀ = f*_i + ½ w*_Pᵀ [(Ĥ⁻¹)_PP]⁻¹ w*_P

for the pruned set P (the complement of the kept set S; the OBS formula). Two tools raise the diagonal-shift
bound of ``certificates.py`` with it:

**Lagrangian over the count.** Under per-matrix unstructured sparsity the rows are coupled only by the total
kept count ``Σ_i k_i ≤ K``. For any per-row lower bounds ``ℓ_i(k) ≤ min_{|S|=k} φ_i(S)`` and any ``μ ≥ 0``::

    min_P Σ_i φ_i  ≥  g(μ) = Σ_i min_k [ℓ_i(k) + μ k] − μ K,

a bound whose rows decouple. ``ℓ_i(k)`` is, per row and per count, the best of the separable diagonal-shift
bounds (each candidate diagonal ``d`` gives ``f*_i + ½(Σ_j d_j W*_ij² − top_k(d_j W*_ij²))``), or the exact
``min_{|S|=k} φ_i`` where a row has few enough live inputs to enumerate. ``g`` is concave and piecewise linear
in μ; its supergradient is ``Σ_i k_i(μ) − K``, so μ is found by bisection and the best value seen is kept.
With one diagonal for all rows ``g`` equals the old per-matrix bound; taking the best diagonal per row *and*
per count is what lifts it.

**Branch-and-bound on a row.** A node fixes some columns pruned (F) and some kept; the rest are free. Forcing
F to zero is exact: cost ``c(F) = ½ w*_Fᵀ[(Ĥ⁻¹)_FF]⁻¹ w*_F`` and new optimum ``w' = w* − (Ĥ⁻¹)_{:,F}[(Ĥ⁻¹)_FF]⁻¹
w*_F`` on the others, whose Gram is the principal submatrix of Ĥ, so any valid diagonal stays valid there. The
node bound is ``c(F) + ½ Σ`` of the smallest scores ``d_j w'_j²`` among the free columns that the pattern still
requires pruned (per N:M group, or per row). Best-first search; each node's completion by its own bound's
choice is evaluated exactly and kept as the incumbent. Within a time budget the row bound is the least open
node bound (or the incumbent when the search closes: the row's exact optimum). Dead inputs are pruned first
(free). The search needs Ĥ invertible on the live inputs; values are lowered by a relative slack of
``max(1e-9, 100·cond(Ĥ)·ε)`` against round-off, and the search is skipped when that slack exceeds 1e-3.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ...formulations.patterns import NM, Pattern, Unstructured

__all__ = ["row_groups", "RowSearch", "branch_and_bound_row", "count_lagrangian", "row_count_bounds",
           "exact_row_count_values", "ENUMERATE_MAX"]

#: rows with at most this many live inputs are enumerated for the Lagrangian's exact per-count values
ENUMERATE_MAX = 12


def row_groups(pattern: Pattern, n: int):
    """For patterns whose rows are independent: (group of each column, columns to prune per group), else None."""
    if isinstance(pattern, NM):
        G = n // pattern.M
        return torch.arange(n) // pattern.M, [pattern.M - pattern.N] * G
    if isinstance(pattern, Unstructured) and pattern.scope == "row":
        return torch.zeros(n, dtype=torch.long), [pattern.prune_count(n)]
    return None


@dataclass
class RowSearch:
    bound: float        # valid lower bound on min ½(w − w*)Ĥ(w − w*) over the row's feasible masks
    incumbent: float    # the best mask's exact value found
    proven: bool        # the search closed: bound = incumbent = the row's optimum
    nodes: int
    time_s: float


class _RowData:
    """The live part of one row (numpy, float64: the search makes many tiny solves): Ĥ⁻¹, w*, a diagonal,
    the group structure."""

    def __init__(self, Hinv: torch.Tensor, wst: torch.Tensor, d: torch.Tensor, group: torch.Tensor, need: list):
        self.B = Hinv.double().cpu().numpy()
        self.w = wst.double().cpu().numpy()
        self.d = d.double().cpu().numpy()
        self.group = group.cpu().numpy()
        self.need0 = list(need)
        self.n = self.w.size

    def cost(self, F: list):
        """Exact cost of forcing F to zero and the re-optimised row (``c(F)``, ``w'``)."""
        if not F:
            return 0.0, self.w
        idx = np.asarray(F)
        BF = self.B[np.ix_(idx, idx)]
        wF = self.w[idx]
        try:
            y = np.linalg.solve(BF, wF)
        except np.linalg.LinAlgError:
            y = np.linalg.lstsq(BF, wF, rcond=None)[0]
        c = 0.5 * float(wF @ y)
        w2 = self.w - self.B[:, idx] @ y
        w2[idx] = 0.0
        return max(c, 0.0), w2

    def choose(self, w2, free, need: list):
        """The diagonal part of the node bound: per group the ``need`` smallest free scores. (value, chosen)
        or (inf, None) when a group cannot prune enough."""
        s = self.d * w2 * w2
        chosen, val = [], 0.0
        for g, k in enumerate(need):
            if k <= 0:
                continue
            cols = np.nonzero(free & (self.group == g))[0]
            if cols.size < k:
                return math.inf, None
            order = np.argsort(s[cols], kind="stable")[:k]
            chosen.extend(cols[order].tolist())
            val += float(s[cols[order]].sum())
        return 0.5 * val, chosen


def branch_and_bound_row(data: _RowData, *, time_budget: float = 1.0, node_limit: int = 100_000,
                         slack: float = 1e-9) -> RowSearch:
    """Best-first branch-and-bound on one row (module docstring); anytime: stops at the budget with a valid
    bound. Values are in the units of ``½(w − w*)Ĥ(w − w*)`` (add ``f*_i`` for the row's f)."""
    t0 = time.perf_counter()
    n = data.n
    counter = 0
    best = math.inf

    def node(F, kept, need):
        nonlocal best
        c, w2 = data.cost(F)
        free = np.ones(n, dtype=bool)
        if F:
            free[F] = False
        if kept:
            free[list(kept)] = False
        v, chosen = data.choose(w2, free, need)
        if chosen is None:
            return None
        if not chosen:  # leaf: every required prune is fixed; the rest is kept, so c is exact
            best = min(best, c)
            return None
        cf, _ = data.cost(F + chosen)  # the bound's own completion, evaluated exactly
        best = min(best, cf)
        s = data.d * w2 * w2
        j = max(chosen, key=lambda q: float(s[q]))
        return c + v, j

    heap = []
    r = node([], set(), data.need0)
    nodes = 1
    if r is not None:
        heap.append((r[0], 0, [], frozenset(), tuple(data.need0), r[1]))
    while heap and nodes < node_limit and time.perf_counter() - t0 < time_budget:
        b, _, F, kept, need, j = heapq.heappop(heap)
        if b >= best:
            heap.clear()
            break
        g = int(data.group[j])
        nd = list(need)
        nd[g] -= 1
        for child in ((F + [j], kept, nd), (F, kept | {j}, list(need))):
            r = node(*child)
            nodes += 1
            if r is not None and r[0] < best:
                counter += 1
                heapq.heappush(heap, (r[0], counter, child[0], frozenset(child[1]), tuple(child[2]), r[1]))
    proven = not heap
    lb = best if proven else min(heap[0][0], best)
    return RowSearch(bound=lb * (1.0 - slack), incumbent=best, proven=proven, nodes=nodes,
                     time_s=time.perf_counter() - t0)


def live_inverse(Hh: torch.Tensor, live: torch.Tensor, max_slack: float = 1e-3):
    """``(Ĥ_LL)⁻¹`` on the live inputs and the relative round-off slack of values computed with it, or
    ``(None, None)`` when Ĥ is (numerically) singular there."""
    HL = Hh[live][:, live]
    e, V = torch.linalg.eigh(HL)
    if e.numel() == 0 or float(e.min()) <= 0:
        return None, None
    cond = float(e.max() / e.min())
    slack = max(1e-9, 100.0 * cond * torch.finfo(torch.float64).eps)
    if slack > max_slack:
        return None, None
    return (V / e) @ V.T, slack


def row_data(Hinv: torch.Tensor, live: torch.Tensor, wst_row: torch.Tensor, d: torch.Tensor, pattern: Pattern,
             n: int) -> Optional[_RowData]:
    """The B&B data of one row: live columns only, dead ones pruned first (they cost nothing)."""
    grp = row_groups(pattern, n)
    if grp is None:
        return None
    group, need = grp
    need = list(need)
    for g in range(len(need)):
        dead_g = int(((group == g) & ~live).sum())
        need[g] = max(0, need[g] - dead_g)
    return _RowData(Hinv, wst_row[live], d[live], group[live], need)


def exact_row_count_values(Hh: torch.Tensor, live: torch.Tensor, wst_row: torch.Tensor) -> torch.Tensor:
    """``min_{|S| = k} ½(w − w*)Ĥ(w − w*)`` over kept sets S of each size k = 0..n (live inputs enumerated;
    dead ones kept first, at no gain), for a row with at most :data:`ENUMERATE_MAX` live inputs."""
    n = wst_row.numel()
    L = torch.nonzero(live).flatten()
    nl = L.numel()
    HL = Hh[L][:, L]
    w = wst_row[L]
    b = HL @ w
    total = 0.5 * float(w @ b)
    masks = ((torch.arange(1 << nl).unsqueeze(1) >> torch.arange(nl)) & 1).to(torch.float64)  # all kept sets
    A = masks.unsqueeze(2) * HL.unsqueeze(0) * masks.unsqueeze(1)
    rhs = (masks * b).unsqueeze(2)
    gain = 0.5 * (rhs * (torch.linalg.pinv(A, hermitian=True) @ rhs)).sum((1, 2))
    vals = (total - gain).clamp_min(0.0)
    size = masks.sum(1).long()
    best = torch.full((nl + 1,), math.inf, dtype=torch.float64).scatter_reduce(0, size, vals, "amin")
    # a kept count k uses min(k, nl) live columns at best: dead ones add nothing
    out = best[torch.arange(n + 1).clamp_max(nl)]
    return torch.cummin(out, 0).values


def row_count_bounds(W2: torch.Tensor, diagonals: list, with_argmax: bool = False):
    """``ℓ_i(k)`` for k = 0..n kept: per row and count the best separable diagonal-shift bound over the
    candidate diagonals (in units of ½(w − w*)Ĥ(w − w*), i.e. without ``f*_i``); with ``with_argmax`` also
    which diagonal gives it."""
    m, n = W2.shape
    best = torch.zeros(m, n + 1, dtype=torch.float64)
    arg = torch.zeros(m, n + 1, dtype=torch.long)
    for a, d in enumerate(diagonals):
        S = W2 * d.unsqueeze(0)
        top = torch.sort(S, 1, descending=True).values.cumsum(1)
        ell = (0.5 * (S.sum(1, keepdim=True) - torch.cat([torch.zeros(m, 1, dtype=S.dtype), top], 1))).clamp_min(0.0)
        arg = torch.where(ell > best, torch.full_like(arg, a), arg)
        best = torch.maximum(best, ell)
    return (best, arg) if with_argmax else best


def count_lagrangian(ell: torch.Tensor, K: int, *, iters: int = 80) -> tuple[float, float]:
    """``max_{μ≥0} Σ_i min_k [ℓ_i(k) + μ k] − μ K`` by bisection on the supergradient; returns (value, μ)."""
    m, n1 = ell.shape
    ks = torch.arange(n1, dtype=torch.float64)

    def g(mu):
        v = ell + mu * ks
        val, k = v.min(1)
        return float(val.sum()) - mu * K, int(k.sum())

    best, best_mu = g(0.0)[0], 0.0
    step = (ell[:, :-1] - ell[:, 1:]).max() if n1 > 1 else torch.tensor(0.0)
    lo, hi = 0.0, float(step.clamp_min(0.0)) * 1.01 + 1e-300
    for _ in range(iters):
        mu = 0.5 * (lo + hi)
        v, kk = g(mu)
        if v > best:
            best, best_mu = v, mu
        if kk > K:
            lo = mu
        else:
            hi = mu
        if hi - lo <= 1e-15 * hi:
            break
    for mu in (lo, hi):
        v = g(mu)[0]
        if v > best:
            best, best_mu = v, mu
    return best, best_mu
