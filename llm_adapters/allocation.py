"""Layer-wise sparsity allocation for a real model: uniform, AlphaPruning (α from weight spectra) and OWL.

The pieces of an allocation (spectra, activation norms, outlier ratios, the spec parser); the contract the prune
engine calls, :func:`optprune.llm_adapters.allocation_targets.layer_sparsities`, combines them::

    targets, info = layer_sparsities(model, arch, allocation, sparsity, eps=None, calib_ids=None, data=None)

``targets`` maps every prunable sub-layer's full module name (``f"{arch.blocks}.{i}.{sub}"``, the names
``PruneConfig.layer_sparsity`` takes) to its sparsity; the parameter-weighted mean over all of them is exactly
``sparsity`` and every value lies in ``[0, s_max] ⊂ [0, 1)``. Units are decoder blocks by default (every
sub-layer of a block gets the block's sparsity, α is the mean over the block's matrices — AlphaPruning's
default); ``granularity="matrix"`` gives one unit per matrix. Structured methods (SPAP) read the entry of
their structure sub-layer (``down``/``o``) from the same dict.

* ``alpha``: eigenvalues of ``WᵀW`` in float64 from the stored weights (:mod:`optprune.solvers.whole_model.spectra`),
  Hill α with KS-chosen x_min, then the allocation QP of :mod:`optprune.formulations.allocation`.
* ``owl``: layerwise outlier ratio ``D_l`` = share of Wanda scores ``|W_ij|·‖X_j‖`` above ``M·mean`` (M = 5)
  over the block's matrices, with ``‖X_j‖²`` from one streamed dense forward over ``calib_ids``
  (:func:`activation_sq_norms`); then OWL's map (λ = 0.08) as the same QP.
* ``uniform``: every sub-layer at ``sparsity``.
* ``auto``: chosen among uniform and bounded alpha/owl candidates by the pruned model's loss on held-out
  calibration sequences (:mod:`optprune.llm_adapters.allocation_select`); uniform is always a candidate.

An allocation is named by a spec ``NAME[:OPTION...]`` (what ``--allocation`` takes): ``alpha:median``,
``alpha:weighted`` (how a block's α comes from its matrices; ``mean`` — AlphaPruning's — by default),
``alpha:bounded`` / ``owl:bounded`` (per-block upper bounds from the measured error-vs-sparsity curves),
``alpha:eps=0.2``, ``auto:finalists=2:holdout=8:rows=32``. :func:`parse_allocation` checks a spec without a model.
"""
from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ..formulations.allocation import AllocationError
from ..solvers.whole_model.allocation import ALLOCATIONS as _RULES
from ..solvers.whole_model.spectra import AGGREGATES, MatrixSpectrum, matrix_spectra
from .architectures import ArchSpec, get_arch, get_module, linear_weight
from .devices import model_device
from .stats import add_hook_input

__all__ = ["prunable_matrices", "model_spectra", "activation_sq_norms", "owl_outlier_ratios",
           "parse_allocation", "AllocationError", "OWL_M", "ALLOCATIONS", "calibration_ids", "reference_check"]

OWL_M = 5.0  # OWL's outlier threshold: a score is an outlier above M × the layer's mean score
ALLOCATIONS = _RULES + ("auto",)
_FLOAT_OPTS = {"alpha": ("eps", "growth"), "owl": ("eps", "M", "growth"), "auto": ("growth",)}
_INT_OPTS = {"auto": ("finalists", "holdout", "rows")}


def parse_allocation(spec) -> tuple[str, dict]:
    """``"alpha:median:bounded"`` → ``("alpha", {"aggregate": "median", "bounded": True})``; one-line
    :class:`AllocationError` naming the valid choices for anything unknown."""
    parts = [t.strip() for t in str(spec or "uniform").strip().lower().split(":")]
    name, opts = parts[0], {}
    if name not in ALLOCATIONS:
        raise AllocationError(f"unknown allocation {name!r}; choose from {', '.join(ALLOCATIONS)} "
                              f"(options after ':', e.g. alpha:median, alpha:bounded, auto:finalists=2)")
    valid = (list(AGGREGATES) + ["bounded"] if name == "alpha" else ["bounded"] if name == "owl" else [])
    valid += [f"{k}=" for k in _FLOAT_OPTS.get(name, ()) + _INT_OPTS.get(name, ())]
    for t in parts[1:]:
        if "=" in t:
            k, v = (x.strip() for x in t.split("=", 1))
            k = {"m": "M"}.get(k, k)
            if k in _FLOAT_OPTS.get(name, ()) or k in _INT_OPTS.get(name, ()):
                try:
                    opts[k] = int(v) if k in _INT_OPTS.get(name, ()) else float(v)
                except ValueError:
                    raise AllocationError(f"allocation option {k}={v!r} is not a number") from None
                continue
        elif name == "alpha" and t in AGGREGATES:
            opts["aggregate"] = t
            continue
        elif t == "bounded" and name in ("alpha", "owl"):
            opts["bounded"] = True
            continue
        raise AllocationError(f"unknown option {t!r} for allocation {name!r}; valid: "
                              f"{', '.join(valid) if valid else 'none'}")
    if "eps" in opts and not (0 <= opts["eps"] < 1):
        raise AllocationError(f"allocation eps must be in [0, 1), got {opts['eps']}")
    if "growth" in opts and not opts["growth"] >= 1:
        raise AllocationError(f"allocation growth must be ≥ 1, got {opts['growth']}")
    for k in ("finalists", "holdout", "rows"):
        if k in opts and opts[k] < 1:
            raise AllocationError(f"allocation {k} must be ≥ 1, got {opts[k]}")
    return name, opts


def prunable_matrices(model: nn.Module, arch: Optional[ArchSpec] = None) -> list[tuple[str, int, str, nn.Module]]:
    """``(full name, block index, sub-layer path, module)`` of every prunable linear, in pruning order."""
    arch = arch or get_arch(model)
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
    arch = arch or get_arch(model)
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
        from ..solvers.whole_model.spectra import eigenvalues
        for s, (_, _, W) in zip(spectra, items):
            if s.name in want:
                s.eigs = eigenvalues([W], device=device, method=fit_options.get("eig_method", "svd"))[0].cpu()
    return spectra


@torch.no_grad()
def activation_sq_norms(model: nn.Module, arch: Optional[ArchSpec], calib_ids: torch.Tensor, *,
                        batch_size: Optional[int] = None, tokens_per_batch: int = 2048) -> dict:
    """``Σ_t x_tj²`` (float32, per input column) of every prunable linear's input on the **dense** model.

    One forward per batch of calibration samples, forward pre-hooks accumulate and drop the activations
    (streamed: nothing but the ``n``-vectors is kept). Runs where the model is.
    """
    arch = arch or get_arch(model)
    ids = _as_ids(calib_ids)
    dev = model_device(model)
    acc: dict = {}
    handles = []

    def hook(name):
        def pre(mod, args, kwargs=None):
            add_hook_input(acc, name, args, kwargs, full=False)
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
    return {k: v.sq_norm.cpu() for k, v in acc.items()}


def owl_outlier_ratios(model: nn.Module, arch: Optional[ArchSpec], sq_norms: dict, *, M: float = OWL_M,
                       granularity: str = "block") -> dict:
    """OWL's outlier ratio ``D`` per unit: share of Wanda scores ``|W_ij|·‖X_j‖`` above ``M·mean``.

    ``granularity='block'`` pools all matrices of a block (as OWL: one mean, one ratio per block) and returns
    ``{block: D}``; ``'matrix'`` returns ``{matrix name: D}``.
    """
    arch = arch or get_arch(model)
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


def calibration_ids(calib_ids, data) -> Optional[torch.Tensor]:
    """The calibration token ids as a ``(nsamples, seqlen)`` long tensor: ``calib_ids`` when given, else found in
    ``data`` (a tensor, a list of tensors, or a dict/object with ``calib_ids``/``input_ids``/``ids``/``tokens``);
    None without either."""
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


def reference_check(program, sparsities, backend: str = "cvxpy", tol: float = 1e-6) -> dict:
    """Solve ``program`` again with a reference backend and compare with the production solution (recorded in the
    run; a disagreement above ``tol`` raises). Without the backend installed the check is recorded as skipped."""
    try:
        from ..solvers.whole_model.allocation import reference_allocation
        ref = reference_allocation(program, backend)
    except (ImportError, ModuleNotFoundError, KeyError) as e:
        return {"backend": backend, "skipped": f"{type(e).__name__}: {e}"}
    s_ref = ref.values["s"].reshape(-1).to(torch.float64)
    diff = float((s_ref - torch.as_tensor(sparsities, dtype=torch.float64)).abs().max())
    if diff > tol:
        raise AllocationError(f"allocation solver and the {backend} reference disagree by {diff:.2e} (> {tol:g})")
    return {"backend": backend, "status": ref.status, "max_abs_diff": diff, "tol": tol}


