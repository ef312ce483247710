"""Production solver for the allocation programs of :mod:`optprune.formulations.allocation`, and ``allocate``.

The QP ``min Σ w_l (s_l − t_l)²  s.t.  Σ p_l s_l = S Σ p_l,  lo ≤ s ≤ hi`` has KKT solution
``s_l(ν) = clip(t_l + ν d_l, lo_l, hi_l)`` with ``d_l = p_l / w_l`` and one multiplier ``ν``;
``g(ν) = Σ p_l s_l(ν)`` is continuous, non-decreasing and piecewise linear with breakpoints where a unit
hits a bound. :func:`solve_allocation` sorts the breakpoints, finds the segment where ``g`` crosses ``S Σp``
and solves the linear piece exactly (water-filling), then polishes the residual on the free units — the
weighted mean is S to round-off (≈1e-16), every bound holds exactly.

For AlphaPruning (``t = c* r``, ``w = p/r``) this is the paper's map ``s = c·r`` clipped to the bounds, with
``c`` re-solved; for OWL (``w = p``) it is OWL's additive centring, clipped.

:func:`allocate` is the entry point used by the LLM side: rule name + per-unit metrics → :class:`AllocationResult`.
:func:`reference_allocation` solves the same program with a reference backend (cvxpy or Gurobi).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from ...formulations.allocation import (DEFAULT_EPS, DEFAULT_S_MAX, OWL_LAMBDA, AllocationError, alpha_program,
                                       owl_program, public_alpha_map, uniform_program)
from ...formulations.programs import Program
from ..base import SolveResult, Timer
from .spectra import AGGREGATES, SpectraError, aggregate_metric

__all__ = ["AllocationResult", "solve_allocation", "allocate", "reference_allocation", "ALLOCATIONS", "integer_bits"]

ALLOCATIONS = ("uniform", "alpha", "owl")


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1)


def solve_allocation(program: Program) -> SolveResult:
    """Exact solution of an allocation QP by water-filling on its single equality multiplier."""
    m = program.meta
    with Timer() as tm:
        p, lo, hi = _f64(m["sizes"]), _f64(m["lower"]), _f64(m["upper"])
        t, w = _f64(m["target"]), _f64(m["weights"])
        d = p / w
        total = float(m["sparsity"]) * float(p.sum())

        def g(nu: float) -> float:
            return float((p * torch.minimum(torch.maximum(t + nu * d, lo), hi)).sum())

        bps = torch.cat([(lo - t) / d, (hi - t) / d])
        bps, _ = torch.sort(bps)
        # g is constant below the first and above the last breakpoint; find the crossing segment
        vals = torch.tensor([g(float(b)) for b in bps], dtype=torch.float64)
        k = int(torch.searchsorted(vals, torch.tensor([total], dtype=torch.float64)))
        if abs(g(0.0) - total) <= 1e-15 * max(1.0, total):  # the target itself is optimal (no clip, mean S)
            k, nu0 = -1, 0.0
        if k == -1:
            nu = nu0
        elif k == 0:
            nu = float(bps[0])
        elif k >= len(bps):
            nu = float(bps[-1])
        else:
            a, b = float(bps[k - 1]), float(bps[k])
            ga, gb = float(vals[k - 1]), float(vals[k])
            nu = a if gb == ga else a + (total - ga) * (b - a) / (gb - ga)
        s = torch.minimum(torch.maximum(t + nu * d, lo), hi)
        # polish: put the round-off residual on the free units (keeps the bounds)
        for _ in range(3):
            res = total - float((p * s).sum())
            free = (s > lo) & (s < hi)
            if abs(res) <= 1e-15 * total or not free.any():
                break
            nu += res / float((p * d)[free].sum())
            s = torch.where(free, torch.minimum(torch.maximum(t + nu * d, lo), hi), s)
    mean = float((p * s).sum() / p.sum())
    active_lo = (s <= lo + 1e-15).nonzero().reshape(-1).tolist()
    active_hi = (s >= hi - 1e-15).nonzero().reshape(-1).tolist()
    info = {"nu": nu, "weighted_mean": mean, "mean_error": mean - float(m["sparsity"]),
            "active_lower": active_lo, "active_upper": active_hi,
            "clip_active": bool(((t + nu * d) < lo - 1e-15).any() or ((t + nu * d) > hi + 1e-15).any())}
    values = {"s": s.reshape(1, -1)}
    return SolveResult("water-filling", "optimal", program.evaluate(values), time=tm.elapsed, values=values,
                       proven_optimal=True, info=info)


def reference_allocation(program: Program, backend: str = "cvxpy", **options) -> SolveResult:
    """Solve the allocation QP with a registered reference backend (cvxpy/Clarabel by default; ``gurobi``
    takes programs of at most 200 variables) — the independent check of :func:`solve_allocation`."""
    from ..registry import get_backend
    return get_backend(backend).solve(program, **options)


# --------------------------------------------------------------------------------------------- allocate
@dataclass
class AllocationResult:
    """Per-unit sparsities (``per_block``: unit → s) and, when matrices were given, ``per_matrix``."""
    allocation: str
    sparsity: float
    units: list
    sizes: list
    sparsities: list
    per_matrix: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    program: Optional[Program] = field(default=None, repr=False)

    @property
    def per_block(self) -> dict:
        return dict(zip(self.units, self.sparsities))

    @property
    def weighted_mean(self) -> float:
        p = _f64(self.sizes)
        return float((p * _f64(self.sparsities)).sum() / p.sum())

    def to_dict(self) -> dict:
        return {"allocation": self.allocation, "sparsity": self.sparsity, "units": self.units, "sizes": self.sizes,
                "sparsities": self.sparsities, "per_matrix": self.per_matrix, "weighted_mean": self.weighted_mean,
                "info": self.info}


def _units_from(metrics, key: str, granularity: str, sizes_param, aggregate: str = "mean"):
    """Normalise the input into (unit names, unit sizes, unit metric values, matrix → unit map); a unit's value
    from its matrices' records by :func:`~optprune.solvers.whole_model.spectra.aggregate_metric` (``weighted`` reads each
    record's ``n_tail``)."""
    if isinstance(metrics, Mapping) and metrics and all(isinstance(v, Mapping) for v in metrics.values()):
        # {matrix name: {"block": b, "numel": p, key: value, ...}}
        mat2unit, acc = {}, {}
        for name, rec in metrics.items():
            if "numel" not in rec:
                raise AllocationError(f"matrix {name!r}: record needs 'numel'")
            u = rec.get("block") if granularity == "block" else name
            if granularity == "block" and u is None:
                raise AllocationError(f"matrix {name!r}: block granularity needs a 'block' entry")
            if key is not None and key not in rec:
                raise AllocationError(f"matrix {name!r}: no {key!r} value")
            mat2unit[name] = u
            a = acc.setdefault(u, {"p": 0, "v": [], "n": []})
            a["p"] += int(rec["numel"])
            if key is not None:
                a["v"].append(float(rec[key]))
                if aggregate == "weighted":
                    if "n_tail" not in rec:
                        raise AllocationError(f"matrix {name!r}: the weighted aggregate needs 'n_tail'")
                    a["n"].append(int(rec["n_tail"]))
        units = list(acc)
        sizes = [acc[u]["p"] for u in units]
        try:
            vals = ([aggregate_metric(acc[u]["v"], acc[u]["n"] or None, aggregate) for u in units]
                    if key is not None else None)
        except SpectraError as e:
            raise AllocationError(str(e)) from None
        return units, sizes, vals, mat2unit
    if isinstance(metrics, Mapping):  # {unit: value}
        units = list(metrics)
        vals = [float(metrics[u]) for u in units]
    else:
        vals = [float(v) for v in _f64(metrics).tolist()]
        units = list(range(len(vals)))
    if sizes_param is None:
        sizes = [1] * len(units)
    elif isinstance(sizes_param, Mapping):
        sizes = [sizes_param[u] for u in units]
    else:
        sizes = list(sizes_param)
    if len(sizes) != len(units):
        raise AllocationError(f"{len(sizes)} sizes for {len(units)} units")
    return units, sizes, vals, {}


def _unit_bound_list(units, bounds, what):
    """``{unit: s}`` (or a per-unit sequence) → a list aligned with ``units`` (NaN-free; missing → no bound)."""
    if bounds is None:
        return None
    if isinstance(bounds, Mapping):
        unknown = [u for u in bounds if u not in units and str(u) not in {str(x) for x in units}]
        if unknown:
            raise AllocationError(f"{what} bounds name unknown unit(s) {unknown[:3]}; units are {units[:8]}")
        by = {str(k): float(v) for k, v in bounds.items()}
        default = 0.0 if what == "lower" else 1.0
        return [by.get(str(u), default) for u in units]
    vals = [float(v) for v in bounds]
    if len(vals) != len(units):
        raise AllocationError(f"{what} bounds: {len(vals)} values for {len(units)} units")
    return vals


def _program(key: str, vals, sizes, sparsity: float, eps, params: dict, s_max: float, units: list, ub: tuple,
             metric, info: dict):
    """The allocation program of rule ``key``; takes its options out of ``params`` and records them in ``info``."""
    if key == "alpha":
        e = DEFAULT_EPS if eps is None else float(eps)
        band = bool(params.pop("band", True))
        prog = alpha_program(vals, sizes, sparsity, eps=e, s_max=s_max, band=band, units=units, lower=ub[0],
                             upper=ub[1])
        pub = public_alpha_map(vals, sizes, sparsity, e)
        info.update(eps=e, band=band, metric=metric, metric_values=dict(zip(units, vals)),
                    ratios=prog.meta["ratios"].tolist(), c_star=prog.meta["c_star"],
                    public_map=pub.tolist(), public_map_out_of_range=bool((pub >= 1).any() or (pub < 0).any()))
        return prog
    if key == "owl":
        lam = float(params.pop("lam", OWL_LAMBDA if eps is None else float(eps) * float(sparsity)))
        band = bool(params.pop("band", False))
        prog = owl_program(vals, sizes, sparsity, lam=lam, s_max=s_max, band=band, units=units, lower=ub[0],
                           upper=ub[1])
        info.update(lam=lam, band=band, outlier_ratio=dict(zip(units, vals)))
        return prog
    if ub[0] is not None or ub[1] is not None:
        raise AllocationError("the uniform allocation takes no per-unit bounds")
    return uniform_program(sizes, sparsity, s_max=s_max, units=units)


def allocate(name: str, metrics_or_weights, sparsity: float, eps: Optional[float] = None,
             params: Optional[dict] = None) -> AllocationResult:
    """Per-unit sparsities with parameter-weighted mean exactly ``sparsity``.

    ``name``: ``uniform``, ``alpha`` or ``owl``. ``metrics_or_weights``: either per-matrix records
    ``{matrix: {"block": b, "numel": p, "alpha": ..., "outlier_ratio": ..., ...}}`` (units are blocks by default,
    α averaged over a block's matrices, as AlphaPruning; ``params['granularity'] = 'matrix'`` for one unit per
    matrix), or plain per-unit values (a sequence or ``{unit: value}``) with ``params['sizes']``.

    ``eps``: alpha — ε of the map (default 0.3), bounds ``[S(1−ε), S(1+ε)]``; owl — λ = εS (default λ = 0.08).
    ``params``: ``metric`` (alpha's ranking metric, default ``'alpha'``; any of
    :data:`~optprune.solvers.whole_model.spectra.SHAPE_METRICS` present in the records), ``s_max`` (default 0.99),
    ``band`` (alpha: True; owl: False), ``lam`` (OWL λ), ``granularity``, ``sizes``, ``aggregate`` (how a block's
    value comes from its matrices: ``mean`` — AlphaPruning's, default —, ``median`` or ``weighted``; see
    :func:`~optprune.solvers.whole_model.spectra.aggregate_metric`), ``lower`` / ``upper`` (per-unit bounds ``{unit: s}``,
    intersected with the band; units not named keep the band's).
    """
    params = dict(params or {})
    key = (name or "").strip().lower()
    if key not in ALLOCATIONS:
        raise AllocationError(f"unknown allocation {name!r}; choose from {', '.join(ALLOCATIONS)}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise AllocationError(f"sparsity must be in [0, 1), got {sparsity}")
    granularity = params.pop("granularity", "block")
    if granularity not in ("block", "matrix"):
        raise AllocationError(f"granularity must be 'block' or 'matrix', got {granularity!r}")
    s_max = float(params.pop("s_max", DEFAULT_S_MAX))
    metric = params.pop("metric", "alpha" if key == "alpha" else "outlier_ratio" if key == "owl" else None)
    aggregate = params.pop("aggregate", "mean")
    if aggregate not in AGGREGATES:
        raise AllocationError(f"unknown aggregate {aggregate!r}; choose from {', '.join(AGGREGATES)}")
    units, sizes, vals, mat2unit = _units_from(metrics_or_weights, metric, granularity, params.pop("sizes", None),
                                               aggregate if key == "alpha" else "mean")
    ub = _unit_bound_list(units, params.pop("lower", None), "lower"), _unit_bound_list(units, params.pop("upper", None),
                                                                                       "upper")
    info: dict = {"granularity": granularity, "s_max": s_max}
    if key == "alpha":
        info["aggregate"] = aggregate
    if ub[0] is not None or ub[1] is not None:
        info["unit_bounds"] = {"lower": ub[0], "upper": ub[1]}
    prog = _program(key, vals, sizes, sparsity, eps, params, s_max, units, ub, metric, info)
    if params:
        raise AllocationError(f"unknown allocation option(s): {', '.join(sorted(params))}")
    sol = solve_allocation(prog)
    s = sol.values["s"].reshape(-1)
    chk = prog.check(sol.values, tol=1e-12)
    if not chk["feasible"]:  # cannot happen for a correct solver; never hand back a bad allocation
        raise AllocationError(f"allocation solver returned an infeasible point: {chk['violations']}")
    info.update(weighted_mean=sol.info["weighted_mean"], mean_error=sol.info["mean_error"],
                clip_active=sol.info["clip_active"], active_lower=[units[i] for i in sol.info["active_lower"]],
                active_upper=[units[i] for i in sol.info["active_upper"]], objective=sol.objective,
                lower=prog.meta["lower"].tolist(), upper=prog.meta["upper"].tolist(),
                target=prog.meta["target"].tolist())
    if key == "alpha":
        # s = clip(t + ν d) with t = c*·r and d = p/w ∝ r: the scale of the clipped map is c = c* + ν·(d/r)
        d_over_r = _f64(prog.meta["sizes"]) / _f64(prog.meta["weights"]) / prog.meta["ratios"]
        info["scale_c"] = prog.meta["c_star"] + sol.info["nu"] * float(d_over_r.mean())
        info["max_deviation_from_public_map"] = float((s - _f64(info["public_map"])).abs().max())
    elif key == "owl":
        info["shift"] = sol.info["nu"]
    per_unit = dict(zip(units, s.tolist()))
    per_matrix = {mname: per_unit[u] for mname, u in mat2unit.items()}
    return AllocationResult(key, float(sparsity), units, [int(x) if float(x).is_integer() else float(x) for x in sizes],
                            s.tolist(), per_matrix, info, prog)


def integer_bits(real_bits, sizes, budget: int, lo: int = 2, hi: int = 8) -> list[int]:
    """Integer bit widths ``b_l ∈ [lo, hi]`` near real targets ``t_l`` with ``Σ p_l b_l ≤ budget · Σ p_l``
    (docs/methods.md §12, mixed precision): every unit starts at ``floor(t_l)`` (clipped), then units receive one
    more bit in order of decreasing remainder ``t_l − floor(t_l)`` while the budget allows. When the targets'
    weighted mean is the budget and the units are equally large (decoder blocks), exactly the largest remainders
    are rounded up and the weighted mean is the budget itself."""
    t = [min(max(float(x), lo), hi) for x in real_bits]
    p = [float(x) for x in sizes]
    if len(t) != len(p) or not t or min(p) <= 0:
        raise AllocationError("integer_bits needs one positive size per unit")
    if not (lo <= int(budget) <= hi):
        raise AllocationError(f"bit budget {budget} outside [{lo}, {hi}]")
    b = [int(math.floor(x + 1e-9)) for x in t]
    room = float(budget) * sum(p) - sum(pi * bi for pi, bi in zip(p, b))
    for i in sorted(range(len(t)), key=lambda i: (-(t[i] - b[i]), i)):
        if t[i] - b[i] <= 1e-9 or b[i] >= hi:
            continue
        if p[i] <= room + 1e-9 * sum(p):
            b[i] += 1
            room -= p[i]
    return b
