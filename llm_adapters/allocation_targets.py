"""Per-sub-layer sparsity targets of an allocation (``--allocation``): the contract the prune engine calls::

    targets, info = layer_sparsities(model, arch, allocation, sparsity, eps=None, calib_ids=None, data=None)

It combines the pieces of :mod:`optprune.llm_adapters.allocation` (α from weight spectra, OWL outlier ratios,
the allocation program) with the measured error curves and the ``auto`` selection of
:mod:`optprune.llm_adapters.allocation_select`; both of those modules sit below this one.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from ..formulations.allocation import AllocationError
from ..solvers.whole_model.allocation import allocate
from ..solvers.serialization import to_json
from ..solvers.whole_model.spectra import AGGREGATES, MIN_TAIL, SHAPE_METRICS, aggregate_metric
from .allocation import (OWL_M, activation_sq_norms, calibration_ids, model_spectra, owl_outlier_ratios,
                         parse_allocation, prunable_matrices, reference_check)
from .architectures import ArchSpec, get_arch, linear_weight

__all__ = ["layer_sparsities"]


def layer_sparsities(model: nn.Module, arch: Optional[ArchSpec], allocation: str, sparsity: float,
                     eps: Optional[float] = None, calib_ids=None, data=None, *, granularity: str = "block",
                     metric: str = "alpha", s_max: Optional[float] = None, device=None, spectra=None,
                     params: Optional[dict] = None, aggregate: Optional[str] = None, bounds=None,
                     prune_config=None, progress: bool = False, **fit_options) -> tuple[dict, dict]:
    """Per-sub-layer sparsity targets (full module name → sparsity) and a JSON-ready info dict.

    ``allocation``: a spec (:func:`parse_allocation`): ``uniform``, ``alpha``, ``owl`` or ``auto``, with options.
    ``aggregate``: alpha's block value from its matrices (``mean``, ``median``, ``weighted``; overrides the
    spec's). ``bounds``: per-block upper bounds — ``True`` measures them from the error curves on ``calib_ids``
    (:func:`~optprune.llm_adapters.allocation_select.block_upper_bounds`), or ``{block: s}``. ``prune_config``
    (a :class:`~optprune.llm_adapters.pipeline.PruneConfig`): needed by ``auto``, which prunes its finalists.
    ``eps``: alpha's ε (default 0.3; bounds
    ``[S(1−ε), S(1+ε)]``); for owl λ = εS (default λ = 0.08). ``granularity``: ``block`` (default) or
    ``matrix``. ``metric``: alpha's ranking metric (any of ``SHAPE_METRICS``; default α). ``calib_ids`` (or
    ``data`` holding them): needed by owl only. ``spectra``: precomputed :func:`model_spectra` output.
    ``fit_options`` go to :func:`~optprune.solvers.whole_model.spectra.fit_power_law` (e.g. ``peak_limit=False``).
    """
    t0 = time.perf_counter()
    arch = arch or get_arch(model)
    key, sopts = parse_allocation(allocation)
    if key == "auto":
        from .allocation_select import select_allocation
        ids = calibration_ids(calib_ids, data)
        if ids is None:
            raise AllocationError("the auto allocation needs calibration data (calib_ids)")
        if prune_config is None:
            raise AllocationError("the auto allocation needs the pruning configuration (prune_config) to prune its "
                                  "finalists")
        return select_allocation(model, arch, sparsity, ids, prune_config, progress=progress, eps=eps,
                                 **{k: v for k, v in sopts.items()})
    eps = sopts.get("eps", eps)
    aggregate, bounds = _checked_options(key, sopts, aggregate, bounds, granularity, metric)
    mats = prunable_matrices(model, arch)
    records = {}
    for name, bi, sub, mod in mats:
        W = linear_weight(mod, sub in arch.transposed)
        records[name] = {"block": bi, "numel": int(W.numel())}
    opts = dict(params or {})
    opts["granularity"] = granularity
    if s_max is not None:
        opts["s_max"] = s_max
    info: dict = {"allocation": key, "sparsity": float(sparsity), "granularity": granularity}
    if key == "alpha":
        info["matrices"] = _add_spectral_metrics(records, spectra if spectra is not None else
                                                 model_spectra(model, arch, device=device, **fit_options))
        opts["metric"] = metric
        opts["aggregate"] = aggregate
    elif key == "owl":
        ids = calibration_ids(calib_ids, data)
        if ids is None:
            raise AllocationError("the owl allocation needs calibration data (calib_ids) for the Wanda scores")
        M = float(opts.pop("M", sopts.get("M", OWL_M)))
        sq = activation_sq_norms(model, arch, ids)
        D = owl_outlier_ratios(model, arch, sq, M=M, granularity=granularity)
        for n, rec in records.items():
            rec["outlier_ratio"] = D[rec["block"]] if granularity == "block" else D[n]
        info.update(owl_M=M, calibration_shape=list(ids.shape))
    bounds_info = None
    if bounds is True:
        opts["upper"], bounds_info = _measured_upper_bounds(model, arch, calibration_ids(calib_ids, data), sparsity,
                                                            prune_config, sopts.get("growth"))
    elif bounds is not None:
        opts["upper"] = dict(bounds)
    res = allocate(key, records, sparsity, eps=eps, params=opts)
    targets = dict(res.per_matrix)
    p = torch.tensor([records[n]["numel"] for n in targets], dtype=torch.float64)
    s = torch.tensor([targets[n] for n in targets], dtype=torch.float64)
    info.update(res.info)
    info.update(targets=targets, units=res.units, unit_sizes=res.sizes, unit_sparsities=res.sparsities,
                weighted_mean=float((p * s).sum() / p.sum()), min=float(s.min()), max=float(s.max()),
                time_s=time.perf_counter() - t0)
    if bounds_info is not None:
        info["bounds"] = bounds_info
    if opts.get("upper") is not None:
        info["reference_check"] = reference_check(res.program, res.sparsities)
    info["spec"] = str(allocation)
    if key == "alpha":
        info.update(_alpha_per_block(records, aggregate))
    return targets, to_json(info, string_keys=False)


def _checked_options(key: str, sopts: dict, aggregate, bounds, granularity: str, metric: str) -> tuple:
    """(aggregate, bounds) after the spec's options (``aggregate=``, ``bounded``); one-line errors."""
    aggregate = aggregate or sopts.get("aggregate", "mean")
    if aggregate not in AGGREGATES:
        raise AllocationError(f"unknown aggregate {aggregate!r}; choose from {', '.join(AGGREGATES)}")
    if bounds is None and sopts.get("bounded"):
        bounds = True
    if bounds is not None and key == "uniform":
        raise AllocationError("the uniform allocation takes no per-block bounds")
    if bounds is not None and granularity != "block":
        raise AllocationError("per-block bounds need granularity='block'")
    if metric not in SHAPE_METRICS:
        raise AllocationError(f"unknown shape metric {metric!r}; choose from {', '.join(SHAPE_METRICS)}")
    return aggregate, bounds


def _add_spectral_metrics(records: dict, spectra) -> dict:
    """Add every shape metric and the tail size of each matrix's spectrum to its record; returns the spectra's
    records by matrix name."""
    by_name = {s.name: s for s in spectra}
    missing = [n for n in records if n not in by_name]
    if missing:
        raise AllocationError(f"no spectrum for {missing[0]!r}")
    for n, rec in records.items():
        sp = by_name[n]
        rec.update({m: sp.metric(m) for m in SHAPE_METRICS})
        rec["n_tail"] = int(sp.fit.n_tail)
    return {n: by_name[n].to_dict() for n in records}


def _measured_upper_bounds(model, arch, ids, sparsity: float, prune_config, growth) -> tuple[dict, dict]:
    """Per-block upper bounds measured from the error curves on the calibration ids, and their record."""
    from .allocation_select import block_upper_bounds, curve_grid, curve_rule, error_curves
    if ids is None:
        raise AllocationError("per-block bounds are measured on calibration data (calib_ids)")
    rule = curve_rule(getattr(prune_config, "method", None))
    curves = error_curves(model, arch, ids, rule=rule, grid=curve_grid(rule, sparsity))
    return block_upper_bounds(curves, sparsity, growth=growth)


def _alpha_per_block(records: dict, aggregate: str) -> dict:
    """α per block, both the paper's mean and the chosen aggregate (which the allocation used), and the
    matrices whose power-law tail is too short to trust."""
    per: dict = {}
    for n, rec in records.items():
        per.setdefault(rec["block"], []).append((rec["alpha"], rec["n_tail"], n))
    return {"alpha_per_block": {b: aggregate_metric([a for a, _, _ in v], None, "mean") for b, v in per.items()},
            "alpha_per_block_aggregate": {
                b: aggregate_metric([a for a, _, _ in v], [t for _, t, _ in v], aggregate) for b, v in per.items()},
            "small_tails": sorted(n for v in per.values() for _, t, n in v if t < MIN_TAIL)}
