"""Per-block widths under one latency budget (docs/methods.md §13): ``optprune prune --structure mlp,heads
--speedup X`` (any comma list of ``mlp``, ``heads``, ``heads:kv``).

**Units** ``u = (block i, kind k)`` — block ``i``'s MLP neurons or attention heads — with ``g_u`` groups.

**Latency model** (measured on this machine, cached): the dense per-block prefill times ``b_i`` and the rest
``r`` (:func:`~.latency.latency_model`) and, per kind, the time ``c_k(f)`` of one block's MLP or attention at
kept fraction ``f`` (:func:`~.latency.width_time_curve`, made non-decreasing in ``f`` — interference only adds
time — and interpolated), read as shares of the dense block time
``β_k`` measured beside it (the two measurements may have run under different loads of a shared machine). With
``k_u`` groups kept the modelled time is ``T(k) = r + Σ_i b_i − Σ_u b_i [c_k(1) − c_k(k_u / g_u)] / β_k``; the
budget is ``T_dense / T(k) ≥ X``.

**Allocation**: the allocation machinery (:func:`~optprune.solvers.whole_model.allocation.allocate`) over the
units, each unit's size being its dense time ``b_i c_k(1) / β_k``: the time-weighted mean sparsity ``S`` is spread by the
rule — ``uniform`` (every unit ``S``: the same widths in every block) or ``alpha`` (AlphaPruning's map of the
unit's matrix's heavy-tail exponent, within ``[S(1−ε), S(1+ε)]``). ``S`` is the smallest value whose widths,
rounded to whole groups as the pattern rounds them, meet the budget (bisection; the modelled speed-up is
monotone in ``S``).

**Candidates**: the uniform widths are always a candidate; with ``--allocation alpha`` the rule's widths are the
other, and the one of lower *removed activation energy* is kept — ``Σ_u Σ_{removed groups} Σ_{j∈group} ‖x_j‖²
‖W_{:,j}‖²`` over the units' solved matrices (down / o projections) on up to 8 calibration windows, relative to
the total: a proxy [reconstructed] of the damage, computed in one dense forward, before any program is solved.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .architectures import ArchSpec, get_module, linear_weight

__all__ = ["WIDTH_KINDS", "WIDTH_ALLOCATIONS", "check_speed_widths", "width_units", "time_model", "modelled_time",
           "speed_widths", "removed_energy"]

WIDTH_KINDS = ("mlp", "heads", "heads:kv")
WIDTH_ALLOCATIONS = ("uniform", "alpha")
_PROXY_WINDOWS = 8


def check_speed_widths(options, spec) -> None:
    """``--speedup`` without ``--structure depth``: a structured method on MLP / head widths, no
    ``--sparsity``, an allocation this module spreads (one-line ValueErrors, before loading)."""
    sp = options.speedup
    if not spec.structured:
        raise ValueError(f"--speedup applies to structured methods (--structure depth or mlp,heads); {spec.name} "
                         f"prunes individual weights")
    kinds = [k.strip().lower() for k in str(options.structure or "mlp").split(",") if k.strip()]
    if not kinds or any(k not in WIDTH_KINDS for k in kinds):
        raise ValueError(f"--speedup chooses widths of {', '.join(WIDTH_KINDS)} (a comma list, e.g. "
                         f"--structure mlp,heads) or blocks (--structure depth), not --structure {options.structure}")
    if options.sparsity is not None:
        raise ValueError("--speedup sets the widths; drop --sparsity")
    if not (isinstance(sp, (int, float)) and math.isfinite(sp) and sp > 1):
        raise ValueError(f"--speedup must be a number > 1, got {sp!r}")
    if options.low_memory:
        raise ValueError("--speedup is not available with --low-memory")
    rule = str(options.allocation or "uniform").strip().lower().split(":")[0]
    if rule not in WIDTH_ALLOCATIONS:
        raise ValueError(f"--speedup spreads widths by --allocation {' or '.join(WIDTH_ALLOCATIONS)}, got "
                         f"{options.allocation!r}")


def width_units(model: nn.Module, arch: ArchSpec, kinds) -> list:
    """``[{"block", "kind", "name" (the solved sub-layer's full name), "groups", "pattern"}]`` in block order."""
    from .surgery import structure_pattern
    out = []
    for bi, block in enumerate(get_module(model, arch.blocks)):
        for kind in kinds:
            base, _, hg = kind.partition(":")
            sub, pat = structure_pattern(model, arch, bi, base, 0.0, **({"head_groups": hg} if hg else {}))
            n = linear_weight(get_module(block, sub), sub in arch.transposed).shape[1]
            out.append({"block": bi, "kind": kind, "name": f"{arch.blocks}.{bi}.{sub}", "groups": pat.n_groups(n),
                        "pattern": pat})
    return out


def time_model(model: nn.Module, arch: ArchSpec, kinds, *, batch: int = 8, seqlen: int = 512) -> dict:
    """The measured (cached) per-block times and the per-kind width curves."""
    from . import latency
    return {"latency_model": latency.latency_model(model, batch=batch, seqlen=seqlen),
            "curves": {k: latency.width_time_curve(model, arch, k, batch=batch, seqlen=seqlen) for k in kinds}}


def _kept(units: list, s: list) -> list:
    """Groups kept per unit at sparsities ``s``, rounded as the pattern rounds them (``ColumnGroups``)."""
    from ..formulations.patterns import ColumnGroups
    return [max(1, ColumnGroups(1, sparsity=min(max(x, 0.0), 1.0)).keep_groups(u["groups"])) for u, x in zip(units, s)]


def modelled_time(tm: dict, units: list, kept: list) -> tuple[float, float]:
    """``(T_dense, T(k))`` of the latency model (seconds of one prefill)."""
    from .latency import interpolate
    lat = tm["latency_model"]
    dense = lat["rest_s"] + sum(lat["block_s"])
    saved = 0.0
    for u, k in zip(units, kept):
        c = tm["curves"][u["kind"]]
        pts = _points(c)
        share = (interpolate(pts, 1.0) - interpolate(pts, k / u["groups"])) / _block_s(c)
        saved += share * lat["block_s"][u["block"]]
    return dense, dense - saved


def _points(curve: dict) -> list:
    """The curve made non-decreasing in the kept fraction: a narrower sub-module is never slower, and on a shared
    machine interference only adds time, so a point is capped by every point measured at a larger width."""
    out, cap = [], float("inf")
    for f, t in sorted(curve["points"], reverse=True):
        cap = min(cap, float(t))
        out.append((float(f), cap))
    return out[::-1]


def _block_s(curve: dict) -> float:
    """The dense block time the curve was measured beside (the curve is read as shares of it)."""
    return float(curve["block_s"])


def _spread(rule: str, S: float, units: list, sizes: list, metric: Optional[list], eps: Optional[float]) -> list:
    if rule == "uniform" or S <= 0:
        return [S] * len(units)
    from ..solvers.whole_model.allocation import allocate
    res = allocate(rule, dict(enumerate(metric)), S, eps=eps, params={"sizes": dict(enumerate(sizes))})
    return [float(x) for x in res.sparsities]


def _solve_budget(rule: str, tm: dict, units: list, speedup: float, metric, eps) -> dict:
    """The smallest mean ``S`` whose rounded widths meet the budget (bisection), and those widths."""
    from .latency import interpolate
    lat = tm["latency_model"]["block_s"]
    sizes = [interpolate(_points(tm["curves"][u["kind"]]), 1.0) / _block_s(tm["curves"][u["kind"]]) * lat[u["block"]]
             for u in units]

    def at(S):
        s = _spread(rule, S, units, sizes, metric, eps)
        k = _kept(units, s)
        dense, t = modelled_time(tm, units, k)
        return s, k, dense / t

    s_hi = 0.99 if rule == "uniform" else 0.99 / (1 + (eps if eps is not None else 0.3))
    if at(s_hi)[2] < speedup:
        dense, t = modelled_time(tm, units, [1] * len(units))
        raise ValueError(f"--speedup {speedup:g} cannot be reached by these widths: the modelled speed-up with "
                         f"one group per unit left is {dense / t:.3f}×")
    lo, hi = 0.0, s_hi
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if at(mid)[2] >= speedup:
            hi = mid
        else:
            lo = mid
    s, k, ratio = at(hi)
    return {"allocation": rule, "mean_sparsity": hi, "modelled_speedup": ratio, "sparsities": s, "kept": k,
            "sizes_s": sizes}


def removed_energy(model: nn.Module, arch: ArchSpec, units: list, kept: list, sq_norms: dict) -> float:
    """Removed activation energy of the widths ``kept`` relative to the total (the candidates' proxy): per unit,
    groups of least ``Σ_{j∈group} ‖x_j‖² ‖W_{:,j}‖²`` removed."""
    removed = total = 0.0
    blocks = get_module(model, arch.blocks)
    for u, k in zip(units, kept):
        sub = u["name"][len(arch.blocks) + 1:].split(".", 1)[1]
        W = linear_weight(get_module(blocks[u["block"]], sub), sub in arch.transposed).detach().float()
        col = sq_norms[u["name"]].float() * (W * W).sum(0)
        gs = torch.stack([col[g].sum() for g in u["pattern"].group_list(W.shape[1])])
        total += float(gs.sum())
        removed += float(torch.sort(gs).values[: u["groups"] - k].sum())
    return removed / total if total > 0 else 0.0


def _alpha_metric(model: nn.Module, arch: ArchSpec, units: list) -> list:
    from .allocation import model_spectra
    by = {s.name: s for s in model_spectra(model, arch, names={u["name"] for u in units})}
    return [by[u["name"]].metric("alpha") for u in units]


def speed_widths(model: nn.Module, arch: ArchSpec, kinds, speedup: float, *, allocation: str = "uniform",
                 eps: Optional[float] = None, calib: Optional[torch.Tensor] = None, batch: int = 8,
                 seqlen: int = 512) -> dict:
    """Per-unit widths meeting ``speedup`` on the latency model: the candidates (uniform, and the allocation's
    rule), the chosen one's per-sub-layer sparsities (``layer_sparsity``), kept widths per block, modelled
    speed-up, and the latency model itself — the run record's ``speed_budget``."""
    rule = str(allocation or "uniform").strip().lower().split(":")[0]
    units = width_units(model, arch, kinds)
    tm = time_model(model, arch, kinds, batch=batch, seqlen=seqlen)
    cands = [_solve_budget("uniform", tm, units, speedup, None, None)]
    if rule != "uniform":
        cands.append(_solve_budget(rule, tm, units, speedup, _alpha_metric(model, arch, units), eps))
    if len(cands) > 1 and calib is not None:
        from .allocation import activation_sq_norms
        sq = activation_sq_norms(model, arch, calib[:_PROXY_WINDOWS])
        for c in cands:
            c["removed_energy"] = removed_energy(model, arch, units, c["kept"], sq)
        best = min(cands, key=lambda c: c["removed_energy"])
    else:
        best = cands[-1]
    widths = [{} for _ in get_module(model, arch.blocks)]
    for u, k in zip(units, best["kept"]):
        widths[u["block"]][u["kind"]] = k
    return {"target": float(speedup), "kinds": list(kinds), "chosen": best["allocation"],
            "sparsity": best["mean_sparsity"], "modelled_speedup": best["modelled_speedup"],
            "layer_sparsity": {u["name"]: s for u, s in zip(units, best["sparsities"])}, "widths": widths,
            "candidates": [{k: v for k, v in c.items() if k not in ("sparsities", "sizes_s")} for c in cands],
            "unit_times_s": {u["name"]: t for u, t in zip(units, best["sizes_s"])},
            "latency_model": tm["latency_model"], "curves": tm["curves"],
            "unit": f"prefill time (batch {batch} × {seqlen} tokens, modelled)"}
