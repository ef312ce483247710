"""Valid lower bounds on the optimal reconstruction error of a layer's L0 program (``optprune prune --certify``).

For a support pattern P (unstructured per matrix or per row, N:M, expander N:M, column groups) the L0 program is
``f_P* = min f(W) s.t. supp(W) ∈ P``. Write ``W*`` for an unconstrained minimiser of ``f`` and ``f*`` for its
value; for Grams built from activations, exactly::

    f(W) = f* + ½ Σ_i (w_i − w*_i) Ĥ (w_i − w*_i)ᵀ.

**Diagonal-shift (perspective) bound.** For any diagonal ``D = diag(d) ⪯ Ĥ`` (``d ≥ 0``), every row's quadratic
form is at least ``Σ_j d_j (w_ij − w*_ij)²``; minimising that separable bound over the support exactly — kept
entries take ``w*_ij`` (cost 0), pruned ones cost ``d_j w*_ij²`` — gives::

    f_P* ≥ f* + ½ min_{pruned set feasible for P} Σ_{(i,j) pruned} d_j W*_ij²
         = f* + ½ (Σ_ij d_j W*_ij² − max_{kept set ∈ P} Σ_kept d_j W*_ij²),

and the maximum is the pattern's own projection of the scores ``d_j W*_ij²`` (top-k per matrix or row, top-N
per group of M, the exact tile transport for expander N:M, top groups by summed score). This is the bound of
the perspective relaxation with the diagonal part ``D`` moved into the perspective term, with the Boolean part
solved exactly. Two valid ``D`` are formed from one eigen-decomposition: ``λ_min(Ĥ)·I`` and ``t·diag(Ĥ)`` with
``t = λ_min(diag(Ĥ)^{-1/2} Ĥ diag(Ĥ)^{-1/2})``. A third separable lower bound comes from the exact cost of forcing
a set P to zero, ``½ w*_Pᵀ[(Ĥ⁻¹)_PP]⁻¹w*_P`` (the OBS formula), with ``(Ĥ⁻¹)_PP ⪯ t'·diag(Ĥ⁻¹)_PP`` (interlacing):
scores ``w*_ij² / (t'[Ĥ⁻¹]_jj)``. Every convex combination of these separable lower bounds is one, so the bound
is maximised over a grid of combinations (per row, for patterns whose rows are independent: per-row unstructured,
N:M; one combination for the whole matrix otherwise). Eigenvalues are lowered by ``1e-12·λ_max`` before use,
which keeps ``D ⪯ Ĥ`` under float64 round-off.

**Optimal diagonal (an SDP in the diagonal).** The three diagonals above are points of one convex set,
``𝒟 = {d ≥ 0 : diag(d) ⪯ Ĥ}`` (the OBS diagonal too: ``diag(Ĥ⁻¹)``-type bounds ``E ⪰ Ĥ⁻¹`` with ``c = 1/e`` are
exactly ``diag(c) ⪯ Ĥ``), and the bound ``L(d) = ½ min_P Σ_{(i,j)∈P} d_j W*_ij²`` is concave in d (a minimum of
linear functions). So the best diagonal is a concave maximisation over an LMI: starting from the best
combination, each round fixes the pruned set P of the current d, which gives the supergradient
``g_j = ½ Σ_{i:(i,j)∈P} W*_ij²``, maximises ``g·d`` over 𝒟 by a log-barrier Newton method (in Ĥ's unit-diagonal
scaling: gradient ``g − μ diag((Ĥ−D)⁻¹) + μ/d``, Hessian ``μ((Ĥ−D)⁻¹∘(Ĥ−D)⁻¹) + μ diag(1/d²)``, a few steps per μ),
and moves d along the segment to that maximiser as far as L improves (𝒟 is convex, so the whole segment is
feasible). The result is made safe before use: d is lowered by ``max(0, −λ_min(Ĥ − D)) + 1e-12·λ_max`` (and
clipped at 0), so ``diag(d) ⪯ Ĥ`` holds after round-off; any such d gives a valid bound, converged or not. The
certificate records which diagonal produced it (``bound_method``).

**Bounds that use the rows** (``row_bounds.py``). Per matrix, a Lagrangian over the kept count lets each row
take its best diagonal per count (``l0_lower_bound(..., lagrangian=True)``); with a search budget
(``bnb_time_s``; ``certify_layer`` gives :data:`BNB_TIME_S` per layer) the loosest rows are solved by
branch-and-bound — at the counts the dual gives them per matrix, under their own pattern per row and N:M —
and each row keeps the better of its bounds. The certificate records which bound won and the search's time.

**Tightness.** The bound is exact when Ĥ is diagonal and weakens as the inputs correlate: ``λ_min`` and ``t``
measure how far Ĥ is from its diagonal, and real layers' Grams are ill-conditioned (``t`` often 1e-3 or less),
so the certified relative gap ``(ours − bound)/ours`` is a statement about the bound as much as about the
solution. Reports give the distribution and name the layers where the bound is weak.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ...formulations.patterns import NM, ColumnGroups, ExpanderNM, Pattern, Unstructured
from ...formulations.problem import LayerProblem
from ..base import Timer
from ..backends.common import dead_columns, unconstrained_rows

__all__ = ["L0Bound", "l0_lower_bound", "certify_layer", "summarize_certificates"]

_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
METHOD_MIXTURES = "diagonal-shift bound (best of the λ_min, Jacobi and OBS diagonals)"
METHOD_SDP = "diagonal-shift bound, optimal diagonal (SDP in the diagonal)"
METHOD_LAGRANGIAN = "Lagrangian over the count (best diagonal per row and count)"
METHOD_BNB = "diagonal-shift bound + branch-and-bound on the loosest rows"
METHOD_LAGRANGIAN_BNB = "Lagrangian over the count + branch-and-bound on the loosest rows"

#: ``certify_layer``'s branch-and-bound budget per layer (seconds, all rows together) and per row
BNB_TIME_S = 2.0
BNB_ROW_S = 0.25


@dataclass
class L0Bound:
    bound: float             # valid lower bound on min f over the pattern
    f_unconstrained: float   # f* (the bound's first term)
    lam_min: float           # λ_min(Ĥ) on live inputs (after the safety shift)
    jacobi_t: float          # t of the t·diag(Ĥ) shift
    method: str = METHOD_MIXTURES
    info: dict = field(default_factory=dict)



def _barrier_diagonal(Hn: torch.Tensor, g: torch.Tensor, x0: torch.Tensor, *, rounds: int = 4, newton: int = 4,
                      shrink: float = 0.2) -> torch.Tensor:
    """Approximately ``argmax g·x`` over ``{x > 0 : diag(x) ≺ Hn}`` (Hn unit-diagonal, x0 strictly inside), by
    Newton steps on ``g·x + μ(log det(Hn − diag x) + Σ log x)`` with μ shrinking; always returns an interior
    point."""
    x = x0.clone()
    mu = max(float(g @ x) / max(Hn.shape[0], 1) * 0.1, 1e-300)

    def value(z):
        if bool((z <= 0).any()):
            return -math.inf, None
        L, info = torch.linalg.cholesky_ex(Hn - torch.diag(z))
        if int(info) != 0:
            return -math.inf, None
        return float(g @ z) + mu * (2.0 * float(L.diagonal().log().sum()) + float(z.log().sum())), L

    for _ in range(rounds):
        for _ in range(newton):
            v, L = value(x)
            if L is None:
                return x0
            M = torch.cholesky_inverse(L)
            grad = g - mu * M.diagonal() + mu / x
            hess = mu * (M * M) + torch.diag(mu / x.pow(2))
            try:
                step = torch.linalg.solve(hess, grad)
            except RuntimeError:
                break
            t = 1.0
            while t > 1e-10:
                if value(x + t * step)[0] >= v + 0.25 * t * float(grad @ step):
                    break
                t *= 0.5
            else:
                break
            x = x + t * step
        mu *= shrink
    return x


def _optimal_diagonal(Hh: torch.Tensor, live: torch.Tensor, W2: torch.Tensor, pattern: Pattern,
                      d_start: torch.Tensor, rounds: int) -> torch.Tensor:
    """A diagonal d ∈ 𝒟 with ``L(d) ≥ L(d_start)`` (module docstring), made safe against round-off."""
    s = Hh.diagonal()[live]
    r = s.rsqrt()
    Hn = r.unsqueeze(1) * Hh[live][:, live] * r.unsqueeze(0)
    emax = float(torch.linalg.eigvalsh(Hn).max())

    def full(x):
        d = torch.zeros_like(Hh.diagonal())
        d[live] = x * s
        return d

    def value(d):
        S = W2 * d.unsqueeze(0)
        return float((S.sum(1) - _kept_score(pattern, S)).sum())

    x = (d_start[live] / s) * 0.99 + 1e-9  # strictly inside 𝒟
    if int(torch.linalg.cholesky_ex(Hn - torch.diag(x)).info) != 0:
        return d_start
    best = value(full(x))
    for _ in range(rounds):
        d = full(x)
        S = W2 * d.unsqueeze(0)
        pruned = ~pattern.project(S).to(torch.bool)
        g = 0.5 * (W2 * pruned).sum(0)[live] * s
        xn = _barrier_diagonal(Hn, g, x)
        step = 0.0
        for t in (1.0, 0.75, 0.5, 0.25, 0.1):
            v = value(full(x + t * (xn - x)))
            if v > best:
                best, step = v, t
        if step == 0.0:
            break
        x = x + step * (xn - x)
    lam = float(torch.linalg.eigvalsh(Hn - torch.diag(x)).min())
    x = (x - max(0.0, -lam) - 1e-12 * emax).clamp_min(0.0)  # diag(x) ⪯ Hn after round-off
    return full(x)


def _separable_rows(pattern: Pattern) -> bool:
    if isinstance(pattern, ExpanderNM) or isinstance(pattern, ColumnGroups):
        return False
    if isinstance(pattern, NM):
        return True
    return isinstance(pattern, Unstructured) and pattern.scope == "row"


def _kept_score(pattern: Pattern, S: torch.Tensor) -> torch.Tensor:
    """Per-row kept score of the pattern's projection of scores S (the maximum over feasible supports)."""
    if isinstance(pattern, ExpanderNM):
        from ..methods import eggs  # noqa: F401  (registers the expander N:M projection: the exact tile transport)
    mask = pattern.project(S).to(torch.bool)
    return (S * mask).sum(1)


def _mixtures(three: bool):
    """Convex weights over the valid diagonal scores (a convex combination of lower bounds is one)."""
    if not three:
        return [(1 - a, a, 0.0) for a in _ALPHAS]
    out = []
    for i, a in enumerate(_ALPHAS):
        for b in _ALPHAS[: len(_ALPHAS) - i]:
            out.append((a, b, max(0.0, 1.0 - a - b)))
    return out


def _obs_diagonal(Hh: torch.Tensor, live: torch.Tensor, eig):
    """The OBS-saliency diagonal ``c_j = 1/(t'·[Ĥ⁻¹]_jj)`` with ``t' = λ_max(diag(Ĥ⁻¹)^{-1/2} Ĥ⁻¹ diag(Ĥ⁻¹)^{-1/2})``.

    Forcing ``w_P = 0`` (the other entries free) costs exactly ``½ w*_Pᵀ [(Ĥ⁻¹)_PP]⁻¹ w*_P``; by interlacing
    ``(Ĥ⁻¹)_PP ⪯ t'·diag(Ĥ⁻¹)_PP`` for every P, so the cost is ≥ ``½ Σ_{j∈P} c_j w*_j²``. ``None`` when Ĥ is
    singular on the live inputs (no inverse)."""
    if not bool(live.any()):
        return None, None
    e, V = eig
    if bool(live.all()):
        if float(e.min()) <= 1e-10 * float(e.max()):
            return None, None
        B = (V / e) @ V.T
    else:
        Hl = Hh[live][:, live]
        el, Vl = torch.linalg.eigh(Hl)
        if float(el.min()) <= 1e-10 * float(el.max()):
            return None, None
        B = (Vl / el) @ Vl.T
    bd = B.diagonal().clamp_min(1e-300)
    s = bd.rsqrt()
    tp = float(torch.linalg.eigvalsh(s.unsqueeze(1) * B * s.unsqueeze(0)).max()) * (1 + 1e-10)
    c = torch.zeros_like(Hh.diagonal())
    c[live] = 1.0 / (tp * bd)
    return c, tp


#: the spectral data of the last Gram seen (sub-layers fed by the same inputs — q/k/v, gate/up — share Ĥ)
_LAST: dict = {}


def _gram_data(problem: LayerProblem, dead: torch.Tensor) -> dict:
    """Everything the bound needs from Ĥ alone (eigen-decomposition, the three diagonal shifts), cached for
    the last Gram tensor (same object, not modified in place since)."""
    src = problem.Hh
    key = (id(src), src._version, src.dtype, tuple(dead.tolist()))
    if _LAST.get("key") == key and _LAST.get("ref") is src:
        return _LAST["data"]
    Hh = src.to(torch.float64)
    n = Hh.shape[0]
    eig = torch.linalg.eigh(Hh)
    e = eig.eigenvalues
    emax = float(e.max().clamp_min(0.0)) if n else 0.0
    live = ~dead
    d = Hh.diagonal().clone()
    # λ_min over live inputs (dead ones have zero rows/columns and zero weights in W*)
    if bool(live.all()):
        lam_min = float(e.min())
    elif bool(live.any()):
        lam_min = float(torch.linalg.eigvalsh(Hh[live][:, live]).min())
    else:
        lam_min = 0.0
    lam_min = max(lam_min - 1e-12 * emax, 0.0)
    tj = 0.0
    if bool(live.any()) and bool((d[live] > 0).all()):
        s = d[live].rsqrt()
        Nrm = s.unsqueeze(1) * Hh[live][:, live] * s.unsqueeze(0)
        tj = max(float(torch.linalg.eigvalsh(Nrm).min()) - 1e-12 * float(Nrm.diagonal().max()), 0.0)
    d_obs, _ = _obs_diagonal(Hh, live, eig)
    data = {"eig": eig, "lam_min": lam_min, "jacobi_t": tj,
            "d_eig": torch.where(live, torch.full_like(d, lam_min), torch.zeros_like(d)),
            "d_jac": torch.where(live, tj * d, torch.zeros_like(d)), "d_obs": d_obs}
    _LAST.clear()
    _LAST.update(key=key, ref=src, data=data)
    return data


def _search_counts(p, live, Wst, ell, which, diagonals, K, upper_rows, budget, row_s, rounds: int = 4) -> dict:
    """Branch-and-bound on the loosest rows at the kept count ``k_i`` the Lagrangian gives them (per-matrix
    unstructured); raises ``ell[i, :k_i + 1]`` in place to each row's search bound, then maximises the dual
    again and searches the rows whose count moved (``rounds`` times, within ``budget`` seconds)."""
    from .row_bounds import branch_and_bound_row, count_lagrangian, live_inverse, row_data
    m, n = Wst.shape
    stats = {"rows": 0, "proven": 0, "nodes": 0, "skipped": False, "rounds": 0}
    with Timer() as tb:
        Hinv, slack = live_inverse(p.Hh, live)
        if Hinv is None:
            stats["skipped"] = True
        else:
            ks = torch.arange(n + 1, dtype=torch.float64)
            f_rows = p.objective(Wst, per_row=True)
            searched = set()
            start = time.perf_counter()
            for _ in range(rounds):
                _, mu = count_lagrangian(ell, K)
                k = (ell + mu * ks).argmin(1)
                cur = ell.gather(1, k.unsqueeze(1)).squeeze(1)
                order = (torch.argsort(upper_rows.to(torch.float64) - f_rows - cur, descending=True)
                         if upper_rows is not None else torch.arange(m))
                todo = [i for i in order.tolist() if 0 < int(k[i]) < n and (i, int(k[i])) not in searched]
                if not todo or time.perf_counter() - start >= budget:
                    break
                stats["rounds"] += 1
                for i in todo:
                    left = budget - (time.perf_counter() - start)
                    if left <= 0:
                        break
                    ki = int(k[i])
                    searched.add((i, ki))
                    pat = Unstructured((n - ki + 0.5) / n, "row")  # prunes exactly n − k_i of the row
                    r = branch_and_bound_row(row_data(Hinv, live, Wst[i], diagonals[int(which[i, ki])], pat, n),
                                             time_budget=min(row_s, left), slack=slack)
                    stats["rows"] += 1
                    stats["proven"] += int(r.proven)
                    stats["nodes"] += r.nodes
                    ell[i, : ki + 1] = torch.maximum(ell[i, : ki + 1], torch.tensor(r.bound, dtype=ell.dtype))
    stats["time_s"] = tb.elapsed
    return stats


def _lagrangian_bound(p, pattern, live, Wst, W2, diagonals, upper_rows, bnb_time_s, bnb_row_s, info) -> float:
    """The Lagrangian over the matrix-wide count (without ``f*``), per-row bounds from every diagonal, exact
    values for enumerable rows, and with a budget the search of the loosest rows at their dual counts."""
    from .row_bounds import ENUMERATE_MAX, count_lagrangian, exact_row_count_values, row_count_bounds
    m, n = Wst.shape
    with Timer() as tl:
        ell, which = row_count_bounds(W2, diagonals, with_argmax=True)
        ell[:, 0] = torch.maximum(ell[:, 0], 0.5 * ((Wst @ p.Hh) * Wst).sum(1) * (1 - 1e-12))  # nothing kept: exact
        if int(live.sum()) <= ENUMERATE_MAX:
            for i in range(m):
                ell[i] = torch.maximum(ell[i], exact_row_count_values(p.Hh, live, Wst[i]))
        K = pattern.kept_count((m, n))
        lag, mu = count_lagrangian(ell, K)
        info.update(lagrangian_value=lag, lagrangian_mu=mu)
        if bnb_time_s > 0 and int(live.sum()) > ENUMERATE_MAX:
            stats = _search_counts(p, live, Wst, ell, which, diagonals, K, upper_rows, bnb_time_s, bnb_row_s)
            lag2, mu2 = count_lagrangian(ell, K)
            stats["value"] = lag2
            info["bnb"] = stats
            if lag2 > lag:
                lag = lag2
                info.update(lagrangian_search_value=lag2, lagrangian_mu=mu2)
    info["lagrangian_time_s"] = tl.elapsed
    return lag


def _row_search(p, pattern, live, Wst, diagonals, cand_rows, upper_rows, budget, row_s) -> dict:
    """Branch-and-bound on the loosest rows of a pattern whose rows are independent; ``rows_bound`` is the sum
    of the rows' bounds (the diagonal one where a row was not searched), without ``f*``."""
    from .row_bounds import branch_and_bound_row, live_inverse, row_data
    m, n = Wst.shape
    with Timer() as tb:
        Hinv, slack = live_inverse(p.Hh, live)
        stats = {"rows": 0, "proven": 0, "nodes": 0, "skipped": Hinv is None, "rows_bound": None}
        if Hinv is not None:
            R = torch.stack(cand_rows)                 # (candidates, m): pruned score per row
            row_lb = 0.5 * R.max(0).values              # the diagonal bound per row (½·score)
            which = R.argmax(0)
            if upper_rows is not None:  # loosest first: f_i(W) − f*_i − (row bound)
                order = torch.argsort(upper_rows.to(torch.float64) - p.objective(Wst, per_row=True) - row_lb,
                                      descending=True)
            else:
                order = torch.arange(m)
            start = time.perf_counter()
            for i in order.tolist():
                left = budget - (time.perf_counter() - start)
                if left <= 0:
                    break
                r = branch_and_bound_row(row_data(Hinv, live, Wst[i], diagonals[int(which[i])], pattern, n),
                                         time_budget=min(row_s, left), slack=slack)
                stats["rows"] += 1
                stats["proven"] += int(r.proven)
                stats["nodes"] += r.nodes
                row_lb[i] = max(float(row_lb[i]), r.bound)
            stats["rows_bound"] = float(row_lb.sum())
    stats["time_s"] = tb.elapsed
    return stats


def l0_lower_bound(problem: LayerProblem, pattern: Pattern, *, sdp_rounds: int = 2, lagrangian: bool = True,
                   bnb_time_s: float = 0.0, bnb_row_s: float = BNB_ROW_S,
                   upper_rows: Optional[torch.Tensor] = None) -> L0Bound:
    """A valid lower bound on ``min f(W)`` over supports feasible for ``pattern`` (see the module docstring):
    the best of the diagonal combinations, improved by ``sdp_rounds`` rounds of the optimal-diagonal search
    (0: the combinations only); under per-matrix unstructured sparsity by the Lagrangian over the count
    (``lagrangian``; with ``bnb_time_s`` also searching the loosest rows at their dual counts); for patterns
    whose rows are independent by branch-and-bound on the loosest rows within
    ``bnb_time_s`` seconds (``bnb_row_s`` per row; loosest rows first when ``upper_rows``, the per-row
    ``f_i(W)`` of a solution, is given). ``row_bounds.py`` has the mathematics of the last two."""
    with Timer() as t:
        p = problem.to(torch.float64)
        dead = torch.from_numpy(dead_columns(p))
        g = _gram_data(problem, dead)
        Wst, fst = unconstrained_rows(p, eig=g["eig"])
        lam_min, tj = g["lam_min"], g["jacobi_t"]
        d_eig, d_jac, d_obs = g["d_eig"], g["d_jac"], g["d_obs"]
        W2 = Wst.pow(2)
        best_rows = None
        best_total = -math.inf
        best_alpha = None
        sep = _separable_rows(pattern)
        diagonals, cand_rows = [], []
        for a in _mixtures(d_obs is not None):
            dd = a[0] * d_eig + a[1] * d_jac + (a[2] * d_obs if d_obs is not None else 0.0)
            diagonals.append(dd)
            S = W2 * dd.unsqueeze(0)
            pruned_rows = S.sum(1) - _kept_score(pattern, S)  # per-row pruned score of the optimal support
            cand_rows.append(pruned_rows)
            if sep:
                best_rows = pruned_rows if best_rows is None else torch.maximum(best_rows, pruned_rows)
            tot = float(pruned_rows.sum())
            if tot > best_total:
                best_total, best_alpha = tot, a
        extra = float(best_rows.sum()) if sep else best_total
        method, sdp_extra, mix_extra = METHOD_MIXTURES, None, extra
        live = ~dead & (p.Hh.diagonal() > 0)
        if sdp_rounds > 0 and bool(live.any()):
            a = best_alpha
            d0 = a[0] * d_eig + a[1] * d_jac + (a[2] * d_obs if d_obs is not None else 0.0)
            d = _optimal_diagonal(p.Hh, live, W2, pattern, d0, int(sdp_rounds))
            diagonals.append(d)
            S = W2 * d.unsqueeze(0)
            rows = S.sum(1) - _kept_score(pattern, S)
            cand_rows.append(rows)
            sdp_extra = float(rows.sum())
            new = float(torch.maximum(best_rows, rows).sum()) if sep else sdp_extra
            if new > extra:
                extra, method = new, METHOD_SDP
        bound = fst + 0.5 * max(extra, 0.0)
        info = {}
        if lagrangian and isinstance(pattern, Unstructured) and pattern.scope == "matrix" and bool(live.any()):
            lag = _lagrangian_bound(p, pattern, live, Wst, W2, diagonals, upper_rows, bnb_time_s, bnb_row_s, info)
            if fst + lag > bound:
                bound = fst + lag
                method = METHOD_LAGRANGIAN_BNB if "lagrangian_search_value" in info else METHOD_LAGRANGIAN
        if sep and bnb_time_s > 0 and bool(live.any()):
            info["bnb"] = _row_search(p, pattern, live, Wst, diagonals, cand_rows, upper_rows, bnb_time_s, bnb_row_s)
            rows_bound = info["bnb"].pop("rows_bound")
            if rows_bound is not None:
                info["bnb"]["bound"] = fst + rows_bound
                if fst + rows_bound > bound:
                    bound, method = fst + rows_bound, METHOD_BNB
    if "lagrangian_value" in info:
        info["lagrangian_bound"] = fst + info.pop("lagrangian_value")
    if "lagrangian_search_value" in info:
        info["lagrangian_search_bound"] = fst + info.pop("lagrangian_search_value")
    if "value" in info.get("bnb", {}):
        info["bnb"]["bound"] = fst + info["bnb"].pop("value")
    info.update({"alpha": best_alpha, "per_row_alpha": sep, "time_s": t.elapsed,
                 "dead_inputs": int(dead.sum()), "mixtures_bound": fst + 0.5 * max(mix_extra, 0.0),
                 "sdp_bound": None if sdp_extra is None else fst + 0.5 * max(sdp_extra, 0.0)})
    return L0Bound(bound=float(bound), f_unconstrained=float(fst), lam_min=lam_min, jacobi_t=tj, method=method,
                   info=info)


def certify_layer(problem: LayerProblem, pattern: Pattern, result, *, bnb_time_s: float = BNB_TIME_S) -> dict:
    """The per-layer certificate record of ``optprune prune --certify``: our objective ``f(W)``, a valid lower
    bound on the optimum of the layer's L0 program and the relative gap ``(f(W) − bound)/f(W)``; and, when the
    method reports one (FISTA), the certified duality gap of its ℓ1 model."""
    W = result.W.to(problem.H.device)
    p64 = problem.to(torch.float64)
    f_rows = p64.objective(W.to(torch.float64), per_row=True)
    obj = float(f_rows.sum())
    b = l0_lower_bound(problem, pattern, bnb_time_s=bnb_time_s, upper_rows=f_rows)
    rel = (obj - b.bound) / obj if obj > 0 else 0.0
    rec = {"objective": obj, "lower_bound": b.bound, "rel_gap": rel, "bound_method": b.method,
           "bound_mixtures": b.info["mixtures_bound"], "bound_sdp": b.info["sdp_bound"],
           "f_unconstrained": b.f_unconstrained, "lam_min": b.lam_min, "jacobi_t": b.jacobi_t,
           "bound_time_s": b.info["time_s"], "bound_alpha": b.info["alpha"]}
    if "lagrangian_bound" in b.info:
        rec["bound_lagrangian"] = b.info["lagrangian_bound"]
    if "bnb" in b.info:
        rec["bound_bnb"] = b.info["bnb"]
    l1 = (result.info or {}).get("l1_certificate")
    if l1:
        rec["l1"] = dict(l1)
    return rec


def summarize_certificates(layers: list[dict]) -> Optional[dict]:
    """Distribution of the certified relative gaps over a run's layers (``None`` without certificates), and
    the layers where the bound is weakest."""
    certs = [(r.get("name"), r["certificate"]) for r in layers if r.get("certificate")]
    if not certs:
        return None

    def dist(v):
        v = sorted(v)
        q = lambda f: v[min(len(v) - 1, int(f * (len(v) - 1) + 0.5))]
        return {"n": len(v), "min": v[0], "median": q(0.5), "p90": q(0.9), "max": v[-1]}

    out = {"l0_rel_gap": dist([c["rel_gap"] for _, c in certs]),
           "weakest": [{"name": n, "rel_gap": c["rel_gap"], "jacobi_t": c["jacobi_t"]}
                       for n, c in sorted(certs, key=lambda x: -x[1]["rel_gap"])[:5]]}
    l1 = [c["l1"]["rel_gap"] for _, c in certs if c.get("l1")]
    if l1:
        out["l1_rel_gap"] = dist(l1)
    return out
