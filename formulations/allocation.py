"""Layer-wise sparsity allocation as a small declarative program (docs/methods.md §3).

Units ``l = 1..L`` (decoder blocks, or single matrices) with parameter counts ``p_l`` receive sparsities
``s_l``. Every allocation in optprune — AlphaPruning's, OWL's and uniform — is the same convex QP::

    minimise    Σ_l w_l (s_l − t_l)²
    subject to  Σ_l p_l s_l = S · Σ_l p_l                 (parameter-weighted mean exactly S)
                lo_l ≤ s_l ≤ hi_l,   lo_l = max(0, S(1−ε), a_l),  hi_l = min(s_max, S(1+ε), b_l),  s_max < 1

that stays as close as the constraints allow to a rule's target ``t``:

* **alpha** (AlphaPruning): ratios ``r_l = (1−ε) + 2ε (α_l − α_min)/(α_max − α_min)``, target
  ``t_l = c* r_l`` with ``c* = S Σp / Σ p r`` (the paper's map), weights ``w_l = p_l / r_l`` (all weights are
  divided by ``mean(p)``, which changes no solution). With these
  weights the KKT conditions give ``s_l = clip(c · r_l, lo_l, hi_l)`` for one scalar ``c``: the optimum *is*
  the paper's multiplicative map, clipped, with ``c`` re-solved so that the mean stays exactly S. When no bound
  is active, ``s = c* r`` exactly (the public code's answer).
* **owl** (OWL, Yin et al. 2023): outlier ratios ``D_l``; target ``t_l = S + λ − 2λ (D_l − D_min)/(D_max −
  D_min)`` (more outliers ⇒ denser), weights ``w_l = p_l``: the optimum is ``clip(t_l + ν)`` — OWL's additive
  centring, weighted by parameters and kept inside the bounds.
* **uniform**: ``t_l = S`` — the optimum is ``s_l = S``.

``a_l`` / ``b_l`` are optional per-unit bounds (``lower=`` / ``upper=``), intersected with the band: e.g. the
largest sparsity at which a block's measured reconstruction error stays acceptable
(:mod:`optprune.llm_adapters.allocation_select`). They change only the bounds, never the rule's target.

The program is data (:class:`~optprune.formulations.programs.Program` of kind ``'QP'``, variable ``s`` of
shape ``(1, L)``). Its objective is written as the shared layer objective: ``Σ w (s − t)² = ½ (s − t)
diag(2w) (s − t)ᵀ`` is ``f`` of a :class:`LayerProblem` with ``W0 = t`` (one row) and ``H = diag(2w)``, so
every reference backend that solves a refit QP (cvxpy, Gurobi) solves the allocation unchanged; the bounds
and the mean are :class:`LinearRow` s. The production solver (:mod:`optprune.solvers.whole_model.allocation`, exact
water-filling on the one multiplier) reads the same object, and :meth:`Program.evaluate` /
:meth:`Program.check` judge both.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .patterns import LinearRow
from .problem import LayerProblem
from .programs import LayerObjective, Program, Variable

__all__ = ["AllocationError", "alpha_ratios", "public_alpha_map", "allocation_program",
           "alpha_program", "owl_program", "uniform_program", "allocation_bounds", "DEFAULT_EPS",
           "DEFAULT_S_MAX", "OWL_LAMBDA"]

DEFAULT_EPS = 0.3      # AlphaPruning's ε (docs/methods.md §3 default)
DEFAULT_S_MAX = 0.99   # no unit is pruned to (or beyond) 100%
OWL_LAMBDA = 0.08      # OWL's λ


class AllocationError(ValueError):
    """Bad allocation input (sizes, metrics, sparsity or bounds that admit no solution)."""


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1).clone()


def alpha_ratios(metric: Sequence[float], eps: float) -> torch.Tensor:
    """AlphaPruning's linear map ``r = (1−ε) + 2ε (m − m_min)/(m_max − m_min)`` (all ones if m is constant)."""
    m = _t(metric)
    if not torch.isfinite(m).all():
        raise AllocationError("allocation metric contains NaN/Inf")
    lo, hi = float(m.min()), float(m.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return torch.ones_like(m)
    return (1.0 - eps) + 2.0 * eps * (m - lo) / (hi - lo)


def public_alpha_map(metric: Sequence[float], sizes: Sequence[float], sparsity: float, eps: float) -> torch.Tensor:
    """The public code's unclipped answer ``c* r`` (may leave [0, 1) — kept to show and test that weakness)."""
    r = alpha_ratios(metric, eps)
    p = _t(sizes)
    return r * (sparsity * p.sum() / (p * r).sum())


def allocation_bounds(L: int, sparsity: float, eps: Optional[float], s_max: float, band: bool,
                      absolute: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``lo = max(0, S − δ)``, ``hi = min(s_max, S + δ)`` with ``δ = εS`` (or ``absolute``); no band: ``[0, s_max]``."""
    lo = torch.zeros(L, dtype=torch.float64)
    hi = torch.full((L,), float(s_max), dtype=torch.float64)
    if band:
        d = absolute if absolute is not None else (eps or 0.0) * sparsity
        lo = lo.clamp_min(sparsity - d)
        hi = hi.clamp_max(sparsity + d)
    return lo, hi


def _unit_bounds(lo, hi, lower, upper):
    """Intersect the band ``[lo, hi]`` with optional per-unit bounds."""
    for nm, b, op in (("lower", lower, torch.maximum), ("upper", upper, torch.minimum)):
        if b is None:
            continue
        v = _t(b)
        if v.numel() != lo.numel():
            raise AllocationError(f"{nm} bounds: {v.numel()} entries for {lo.numel()} units")
        if not torch.isfinite(v).all():
            raise AllocationError(f"{nm} bounds contain NaN/Inf")
        if nm == "lower":
            lo = op(lo, v)
        else:
            hi = op(hi, v)
    return lo, hi


def _validate(sizes, sparsity, s_max):
    p = _t(sizes)
    if p.numel() == 0:
        raise AllocationError("no units to allocate sparsity to")
    if not torch.isfinite(p).all() or (p <= 0).any():
        raise AllocationError("unit sizes (parameter counts) must be positive and finite")
    if not (0.0 <= sparsity < 1.0):
        raise AllocationError(f"sparsity must be in [0, 1), got {sparsity}")
    if not (0.0 < s_max < 1.0):
        raise AllocationError(f"s_max must be in (0, 1), got {s_max}")
    if sparsity > s_max:
        raise AllocationError(f"sparsity {sparsity} exceeds the per-unit cap s_max={s_max}")
    return p


def allocation_program(target, weights, sizes, sparsity: float, lower, upper, *, name: str = "allocation",
                       units: Optional[Sequence] = None, meta: Optional[dict] = None) -> Program:
    """The QP ``min Σ w (s − t)²  s.t.  Σ p s = S Σ p,  lo ≤ s ≤ hi`` as a :class:`Program` (``s``: shape (1, L)).

    Constraints are :class:`LinearRow` s (one equality, then ``L`` lower and ``L`` upper rows), so
    :meth:`Program.check` verifies them; ``meta`` also carries ``lower``/``upper`` arrays for backends that
    take simple bounds directly.
    """
    p = _t(sizes)
    t, w, lo, hi = _t(target), _t(weights), _t(lower), _t(upper)
    L = p.numel()
    for nm, v in (("target", t), ("weights", w), ("lower", lo), ("upper", hi)):
        if v.numel() != L:
            raise AllocationError(f"{nm} has {v.numel()} entries for {L} units")
        if not torch.isfinite(v).all():
            raise AllocationError(f"{nm} contains NaN/Inf")
    if (w <= 0).any():
        raise AllocationError("objective weights must be positive")
    if (lo > hi + 1e-15).any():
        raise AllocationError("a unit's lower bound exceeds its upper bound")
    total = float(sparsity) * float(p.sum())
    if float((p * lo).sum()) > total * (1 + 1e-12) + 1e-12 or float((p * hi).sum()) < total * (1 - 1e-12) - 1e-12:
        raise AllocationError(f"bounds admit no allocation with weighted mean {sparsity}: "
                              f"[{float((p * lo).sum() / p.sum()):.4f}, {float((p * hi).sum() / p.sum()):.4f}]")
    idx = torch.arange(L)
    one = torch.ones(1, dtype=torch.float64)
    rows = [LinearRow([("s", idx, p)], "==", total)]
    rows += [LinearRow([("s", idx[i:i + 1], one)], ">=", float(lo[i])) for i in range(L)]
    rows += [LinearRow([("s", idx[i:i + 1], one)], "<=", float(hi[i])) for i in range(L)]
    m = {"sizes": p, "sparsity": float(sparsity), "lower": lo, "upper": hi, "target": t, "weights": w,
         "units": list(units) if units is not None else list(range(L))}
    m.update(meta or {})
    problem = LayerProblem(W0=t.unsqueeze(0).clone(), H=torch.diag(2.0 * w), name=name)
    return Program(name, "QP", {"s": Variable("s", (1, L), "real")}, [LayerObjective(var="s")], rows, problem,
                   None, m)


def alpha_program(metric, sizes, sparsity: float, *, eps: float = DEFAULT_EPS, s_max: float = DEFAULT_S_MAX,
                  band: bool = True, units=None, lower=None, upper=None) -> Program:
    """AlphaPruning's allocation: closest (weights ``p/r``) to ``c* r`` inside the bounds (``lower``/``upper``:
    optional per-unit bounds, intersected with the band)."""
    p = _validate(sizes, sparsity, s_max)
    if not (0.0 <= eps < 1.0):
        raise AllocationError(f"eps must be in [0, 1), got {eps}")
    r = alpha_ratios(metric, eps)
    if r.numel() != p.numel():
        raise AllocationError(f"{r.numel()} metric values for {p.numel()} units")
    c_star = sparsity * float(p.sum()) / float((p * r).sum())
    lo, hi = _unit_bounds(*allocation_bounds(p.numel(), sparsity, eps, s_max, band), lower, upper)
    return allocation_program(c_star * r, p / r / p.mean(), p, sparsity, lo, hi, name="alpha allocation QP", units=units,
                              meta={"rule": "alpha", "ratios": r, "c_star": c_star, "eps": eps, "s_max": s_max,
                                    "band": band, "metric": _t(metric)})


def owl_program(outlier_ratio, sizes, sparsity: float, *, lam: float = OWL_LAMBDA, s_max: float = DEFAULT_S_MAX,
                band: bool = False, units=None, lower=None, upper=None) -> Program:
    """OWL's allocation: target ``S + λ − 2λ·D_norm``, closest in ``Σ p (s − t)²``, mean exactly S.

    ``band=True`` adds the bounds ``[S − λ, S + λ]``; by default only ``[0, s_max]`` (OWL itself has no band).
    """
    p = _validate(sizes, sparsity, s_max)
    if not (0.0 <= lam < 1.0):
        raise AllocationError(f"OWL λ must be in [0, 1), got {lam}")
    D = _t(outlier_ratio)
    if D.numel() != p.numel():
        raise AllocationError(f"{D.numel()} outlier ratios for {p.numel()} units")
    rng = float(D.max() - D.min())
    dn = (D - D.min()) / rng if rng > 0 else torch.full_like(D, 0.5)
    t = sparsity + lam - 2.0 * lam * dn
    lo, hi = _unit_bounds(*allocation_bounds(p.numel(), sparsity, None, s_max, band, absolute=lam), lower, upper)
    return allocation_program(t, p / p.mean(), p, sparsity, lo, hi, name="OWL allocation QP", units=units,
                              meta={"rule": "owl", "lam": lam, "s_max": s_max, "band": band,
                                    "outlier_ratio": D})


def uniform_program(sizes, sparsity: float, *, s_max: float = DEFAULT_S_MAX, units=None) -> Program:
    p = _validate(sizes, sparsity, s_max)
    lo, hi = allocation_bounds(p.numel(), sparsity, None, s_max, False)
    return allocation_program(torch.full_like(p, float(sparsity)), p / p.mean(), p, sparsity, lo, hi,
                              name="uniform allocation QP", units=units,
                              meta={"rule": "uniform", "s_max": s_max})
