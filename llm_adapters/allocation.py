"""Layer-wise sparsity allocation for a real model: uniform, AlphaPruning (α from weight spectra) and OWL.

The contract the prune engine calls::

    targets, info = layer_sparsities(model, arch, allocation, sparsity, eps=None, calib_ids=None, data=None)

``targets`` maps every prunable sub-layer's full module name (``f"{arch.blocks}.{i}.{sub}"``, the names
``PruneConfig.layer_sparsity`` takes) to its sparsity; the parameter-weighted mean over all of them is exactly
``sparsity`` and every value lies in ``[0, s_max] ⊂ [0, 1)``. Units are decoder blocks by default (every
sub-layer of a block gets the block's sparsity, α is the mean over the block's matrices — AlphaPruning's
default); ``granularity="matrix"`` gives one unit per matrix. Structured methods (SPAP) read the entry of
their structure sub-layer (``down``/``o``) from the same dict.

* ``alpha``: eigenvalues of ``WᵀW`` in float64 from the stored weights (:mod:`optprune.solvers.spectra`),
  Hill α with KS-chosen x_min, then the allocation QP of :mod:`optprune.formulations.allocation`.
* ``owl``: layerwise outlier ratio ``D_l`` = share of Wanda scores ``|W_ij|·‖X_j‖`` above ``M·mean`` (M = 5)
  over the block's matrices, with ``‖X_j‖²`` from one streamed dense forward over ``calib_ids``
  (:func:`activation_sq_norms`); then OWL's map (λ = 0.08) as the same QP.
* ``uniform``: every sub-layer at ``sparsity``.
"""
from __future__ import annotations

import copy
import hashlib
import time
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ..formulations.allocation import AllocationError
from ..solvers.allocation import ALLOCATIONS, allocate
from ..solvers.spectra import SHAPE_METRICS, MatrixSpectrum, matrix_spectra
from .architectures import ArchSpec, get_arch, get_module, linear_weight

__all__ = ["prunable_matrices", "model_spectra", "activation_sq_norms", "owl_outlier_ratios", "layer_sparsities",
           "AllocationError", "OWL_M"]

OWL_M = 5.0  # OWL's outlier threshold: a score is an outlier above M × the layer's mean score


def _arch(model, arch) -> ArchSpec:
    return arch if isinstance(arch, ArchSpec) else get_arch(model)


def prunable_matrices(model: nn.Module, arch: Optional[ArchSpec] = None) -> list[tuple[str, int, str, nn.Module]]:
    """``(full name, block index, sub-layer path, module)`` of every prunable linear, in pruning order."""
    arch = _arch(model, arch)
    blocks = get_module(model, arch.blocks)
    out = []
    for bi in range(len(blocks)):
        for sub in arch.sublayer_names():
            out.append((f"{arch.blocks}.{bi}.{sub}", bi, sub, get_module(blocks[bi], sub)))
    return out


_SPECTRA_CACHE: "OrderedDict[str, list]" = OrderedDict()
_SPECTRA_CACHE_SIZE = 4


def _weights_key(items, device, options) -> str:
    h = hashlib.sha1(repr((str(device), sorted(options.items()))).encode())
    for name, bi, W in items:
        t = W.detach().contiguous().cpu()
        h.update(f"{name}|{bi}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def model_spectra(model: nn.Module, arch: Optional[ArchSpec] = None, *, device=None, keep_eigs=False,
                  names=None, cache: bool = True, **fit_options) -> list[MatrixSpectrum]:
    """Spectra and power-law fits of the prunable matrices (float64 from the stored weights).

    Results are memoised in-process by a hash of the weights and the options (``cache=False`` to skip): a sweep
    that reloads the same model for each run pays for the SVDs once.
    """
    arch = _arch(model, arch)
    items = []
    for name, bi, sub, mod in prunable_matrices(model, arch):
        if names is not None and name not in names:
            continue
        items.append((name, bi, linear_weight(mod, sub in arch.transposed)))
    if not items:
        raise AllocationError("no prunable matrices selected")
    keep = keep_eigs if not isinstance(keep_eigs, (set, list, tuple)) else False
    key = _weights_key(items, device, fit_options) if cache and not keep else None
    if key is not None and key in _SPECTRA_CACHE:
        _SPECTRA_CACHE.move_to_end(key)
        spectra = [copy.copy(s) for s in _SPECTRA_CACHE[key]]
    else:
        spectra = matrix_spectra(items, device=device, keep_eigs=bool(keep), **fit_options)
        if key is not None:
            _SPECTRA_CACHE[key] = [copy.copy(s) for s in spectra]
            while len(_SPECTRA_CACHE) > _SPECTRA_CACHE_SIZE:
                _SPECTRA_CACHE.popitem(last=False)
    if isinstance(keep_eigs, (set, list, tuple)):  # keep eigenvalues only for the named matrices
        want = set(keep_eigs)
        from ..solvers.spectra import eigenvalues
        for s, (_, _, W) in zip(spectra, items):
            if s.name in want:
                s.eigs = eigenvalues([W], device=device, method=fit_options.get("eig_method", "svd"))[0].cpu()
    return spectra


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def activation_sq_norms(model: nn.Module, arch: Optional[ArchSpec], calib_ids: torch.Tensor, *,
                        batch_size: Optional[int] = None, tokens_per_batch: int = 2048) -> dict:
    """``Σ_t x_tj²`` (float32, per input column) of every prunable linear's input on the **dense** model.

    One forward per batch of calibration samples, forward pre-hooks accumulate and drop the activations
    (streamed: nothing but the ``n``-vectors is kept). Runs where the model is.
    """
    arch = _arch(model, arch)
    ids = _as_ids(calib_ids)
    dev = _model_device(model)
    acc: dict = {}
    handles = []

    def hook(name):
        def pre(mod, args, kwargs=None):
            x = args[0] if args else (kwargs or {}).get("input")
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            v = acc.get(name)
            s = (x * x).sum(0)
            acc[name] = s if v is None else v + s
        return pre

    try:
        for name, _, _, mod in prunable_matrices(model, arch):
            handles.append(mod.register_forward_pre_hook(hook(name)))
        bs = batch_size or max(1, tokens_per_batch // max(1, ids.shape[1]))
        was_training = model.training
        model.eval()
        for i in range(0, ids.shape[0], bs):
            model(input_ids=ids[i:i + bs].to(dev), use_cache=False)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in acc.items()}


def owl_outlier_ratios(model: nn.Module, arch: Optional[ArchSpec], sq_norms: dict, *, M: float = OWL_M,
                       granularity: str = "block") -> dict:
    """OWL's outlier ratio ``D`` per unit: share of Wanda scores ``|W_ij|·‖X_j‖`` above ``M·mean``.

    ``granularity='block'`` pools all matrices of a block (as OWL: one mean, one ratio per block) and returns
    ``{block: D}``; ``'matrix'`` returns ``{matrix name: D}``.
    """
    arch = _arch(model, arch)
    per = {}
    for name, bi, sub, mod in prunable_matrices(model, arch):
        if name not in sq_norms:
            raise AllocationError(f"no activation statistics for {name!r}")
        W = linear_weight(mod, sub in arch.transposed).detach().to(torch.float32).cpu()
        sc = W.abs() * sq_norms[name].to(torch.float32).sqrt().unsqueeze(0)
        per[name] = (bi, sc.reshape(-1))
    if granularity == "matrix":
        return {n: float((sc > M * sc.mean()).to(torch.float64).mean()) for n, (_, sc) in per.items()}
    blocks: dict = {}
    for n, (bi, sc) in per.items():
        blocks.setdefault(bi, []).append(sc)
    out = {}
    for bi, scs in blocks.items():
        allsc = torch.cat(scs)
        out[bi] = float((allsc > M * allsc.mean()).to(torch.float64).mean())
    return out


def _as_ids(x) -> torch.Tensor:
    if torch.is_tensor(x):
        ids = x
    elif isinstance(x, (list, tuple)) and x and torch.is_tensor(x[0]):
        ids = torch.cat([t.reshape(1, -1) if t.dim() == 1 else t for t in x])
    else:
        raise AllocationError("calibration ids must be a (nsamples, seqlen) tensor of token ids")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype not in (torch.int64, torch.int32):
        raise AllocationError("calibration ids must be a non-empty (nsamples, seqlen) integer tensor")
    return ids.long()


def _calib_from(calib_ids, data):
    if calib_ids is not None:
        return _as_ids(calib_ids)
    if data is None:
        return None
    if torch.is_tensor(data) or isinstance(data, (list, tuple)):
        return _as_ids(data)
    for key in ("calib_ids", "input_ids", "ids", "tokens"):
        v = data.get(key) if isinstance(data, dict) else getattr(data, key, None)
        if v is not None:
            return _as_ids(v)
    raise AllocationError(f"cannot find calibration ids in {type(data).__name__}")


def layer_sparsities(model: nn.Module, arch: Optional[ArchSpec], allocation: str, sparsity: float,
                     eps: Optional[float] = None, calib_ids=None, data=None, *, granularity: str = "block",
                     metric: str = "alpha", s_max: Optional[float] = None, device=None, spectra=None,
                     params: Optional[dict] = None, **fit_options) -> tuple[dict, dict]:
    """Per-sub-layer sparsity targets (full module name → sparsity) and a JSON-ready info dict.

    ``allocation``: ``uniform``, ``alpha`` or ``owl``. ``eps``: alpha's ε (default 0.3; bounds
    ``[S(1−ε), S(1+ε)]``); for owl λ = εS (default λ = 0.08). ``granularity``: ``block`` (default) or
    ``matrix``. ``metric``: alpha's ranking metric (any of ``SHAPE_METRICS``; default α). ``calib_ids`` (or
    ``data`` holding them): needed by owl only. ``spectra``: precomputed :func:`model_spectra` output.
    ``fit_options`` go to :func:`~optprune.solvers.spectra.fit_power_law` (e.g. ``peak_limit=False``).
    """
    t0 = time.perf_counter()
    arch = _arch(model, arch)
    key = (allocation or "uniform").strip().lower()
    if key not in ALLOCATIONS:
        raise AllocationError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    if metric not in SHAPE_METRICS:
        raise AllocationError(f"unknown shape metric {metric!r}; choose from {', '.join(SHAPE_METRICS)}")
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
        if spectra is None:
            spectra = model_spectra(model, arch, device=device, **fit_options)
        by_name = {s.name: s for s in spectra}
        missing = [n for n in records if n not in by_name]
        if missing:
            raise AllocationError(f"no spectrum for {missing[0]!r}")
        for n, rec in records.items():
            sp = by_name[n]
            rec.update({m: sp.metric(m) for m in SHAPE_METRICS})
        opts["metric"] = metric
        info["matrices"] = {n: by_name[n].to_dict() for n in records}
    elif key == "owl":
        ids = _calib_from(calib_ids, data)
        if ids is None:
            raise AllocationError("the owl allocation needs calibration data (calib_ids) for the Wanda scores")
        M = float(opts.pop("M", OWL_M))
        sq = activation_sq_norms(model, arch, ids)
        D = owl_outlier_ratios(model, arch, sq, M=M, granularity=granularity)
        for n, rec in records.items():
            rec["outlier_ratio"] = D[rec["block"]] if granularity == "block" else D[n]
        info.update(owl_M=M, calibration_shape=list(ids.shape))
    res = allocate(key, records, sparsity, eps=eps, params=opts)
    targets = dict(res.per_matrix)
    p = torch.tensor([records[n]["numel"] for n in targets], dtype=torch.float64)
    s = torch.tensor([targets[n] for n in targets], dtype=torch.float64)
    info.update(res.info)
    info.update(targets=targets, units=res.units, unit_sizes=res.sizes, unit_sparsities=res.sparsities,
                weighted_mean=float((p * s).sum() / p.sum()), min=float(s.min()), max=float(s.max()),
                time_s=time.perf_counter() - t0)
    if key == "alpha":
        info["alpha_per_block"] = {}
        for n, rec in records.items():
            info["alpha_per_block"].setdefault(rec["block"], []).append(rec["alpha"])
        info["alpha_per_block"] = {b: sum(v) / len(v) for b, v in info["alpha_per_block"].items()}
    return targets, _jsonable(info)


def _jsonable(v):
    if isinstance(v, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): _jsonable(x)
                for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    return v
