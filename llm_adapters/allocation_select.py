"""Allocation selection that cannot lose to uniform on held-out calibration data, and honest per-block bounds.

Two measurements on the **calibration** set only (never the evaluation text):

* :func:`error_curves` — each block's reconstruction error as a function of its sparsity, measured cheaply: one
  dense forward collects every prunable linear's input Gram ``G = XᵀX``; each matrix is pruned by Wanda's rule
  (scores ``|W_ij|·√G_jj``, compared within each output row) on a grid of sparsities and its error
  ``tr(ΔW G ΔWᵀ)`` computed exactly; a block's relative error is ``Σ err / Σ tr(W G Wᵀ)`` over its matrices.
  Wanda's error is an upper estimate of what the error-correcting solvers reach (SparseGPT is at or below it).
* The curve of a method that updates weights from the Gram (SparseGPT, and ADMM and FISTA, which never return
  worse than their SparseGPT warm start) is SparseGPT's own (``rule="obs"``: its sweep run per grid point on 64
  sampled rows of each matrix — rows are independent, so the scaled sample error is unbiased); mask-only methods
  use Wanda's. So a block's bound is what *its* solver reaches, not a cruder pruner's.
* :func:`block_upper_bounds` — the largest sparsity each block takes before its error exceeds ``growth`` × the
  error of the worst block under the uniform target: ``u_b = sup{s ≥ S : e_b(s') ≤ growth · max_c e_c(S) ∀ s' ∈
  [S, s]}`` (linear interpolation on the grid). ``u_b ≥ S`` by construction, so uniform stays feasible and the
  bounded program (:func:`optprune.formulations.allocation.alpha_program` with ``upper=``) always has a solution.

:func:`select_allocation` (``--allocation auto``) splits the calibration sequences into a pruning part and a
held-out part (``holdout``, default a quarter), builds a small candidate set — uniform; α allocations with every
block aggregate (mean, median, tail-weighted) × ε ∈ {0.1, 0.2, 0.3}; OWL with λ ∈ {0.04, 0.08}; all but uniform
with the measured upper bounds — ranks them by a cheap proxy — the held-out loss after one-shot Wanda masks from
the dense activation norms (one forward per candidate, no solver; ``Σ_b e_b(s_b)`` from the curves is recorded
beside it) — then prunes **uniform and the best ``finalists``** on the pruning part (on its first ``rows``
sequences when ``rows`` is given: a cheaper selection) and scores each by the mean token NLL of the held-out
sequences. The
winner is the lowest held-out loss; uniform wins ties and is always scored, so the chosen score is never above
uniform's. The run then prunes with the chosen allocation on the full calibration set. Every candidate (proxy,
held-out loss when scored, block sparsities) and the choice go into the run record; :func:`plot_selection` draws
them.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..formulations.allocation import DEFAULT_S_MAX, AllocationError
from ..solvers.whole_model.allocation import allocate
from ..solvers.serialization import to_json
from ..solvers.whole_model.spectra import AGGREGATES, SHAPE_METRICS
from .architectures import ArchSpec, get_arch, linear_weight
from .devices import model_device
from .stats import add_hook_input

__all__ = ["error_curves", "block_upper_bounds", "proxy_error", "one_pass_loss", "heldout_loss", "selection_candidates",
           "select_allocation", "plot_selection", "DEFAULT_GRID", "DEFAULT_GROWTH"]

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(20)) + (0.98,)  # 0, 0.05, …, 0.95, 0.98
DEFAULT_GROWTH = 1.5       # a block may reach 1.5× the error of the worst block at the uniform target
DEFAULT_FINALISTS = 3      # non-uniform candidates pruned and scored on the held-out sequences
ALPHA_EPS = (0.1, 0.2, 0.3)
OWL_LAMBDAS = (0.04, 0.08)
MAX_GRAM_TOKENS = 16384    # tokens of the pruning part used for the Grams of the error curves
OBS_CURVE_ROWS = 64        # output rows per matrix the SparseGPT error curve is estimated on
MAX_PROXY_TOKENS = 4096    # held-out tokens of the one-forward proxy (the finalists are scored on all of them)


# ============================================================================================ error curves
@torch.no_grad()
def input_grams(model: nn.Module, arch: Optional[ArchSpec], calib_ids: torch.Tensor, *,
                tokens_per_batch: int = 2048) -> dict:
    """``XᵀX`` (float32) of every prunable linear's input on the dense model, ``{matrix name: G}``.

    Linears of one block that read the same tensor (q/k/v, gate/up) share one Gram object (counted once).
    """
    from .allocation import prunable_matrices
    arch = arch or get_arch(model)
    ids = calib_ids
    dev = model_device(model)
    grams: dict = {}
    alias: dict = {}
    live: dict = {}   # (block, data_ptr, shape) → (input tensor kept alive, name) within the current block
    state = {"block": None}
    handles = []

    def hook(name, bi):
        def pre(mod, args, kwargs=None):
            x = args[0] if args else (kwargs or {}).get("input")
            if state["block"] != bi:
                live.clear()
                state["block"] = bi
            key = (x.data_ptr(), tuple(x.shape))
            if key in live and live[key][0] is x:
                alias[name] = live[key][1]
                return
            live[key] = (x, name)
            add_hook_input(grams, name, args, kwargs, full=True)
        return pre

    try:
        for name, bi, _, mod in prunable_matrices(model, arch):
            handles.append(mod.register_forward_pre_hook(hook(name, bi)))
        bs = max(1, tokens_per_batch // max(1, ids.shape[1]))
        was = model.training
        model.eval()
        for i in range(0, ids.shape[0], bs):
            live.clear()
            state["block"] = None
            model(input_ids=ids[i:i + bs].to(dev), use_cache=False)
        model.train(was)
    finally:
        live.clear()
        for h in handles:
            h.remove()
    out = {n: st.gram.H.cpu() for n, st in grams.items()}
    for n, a in alias.items():
        out[n] = out[a]
    return out


@torch.no_grad()
def wanda_error_curve(W: torch.Tensor, G: torch.Tensor, grid) -> tuple[list, float]:
    """``tr(ΔW G ΔWᵀ)`` of Wanda's mask (per output row) at each sparsity of ``grid``, and ``tr(W G Wᵀ)``."""
    W = W.detach().to(torch.float32).cpu()
    G = G.to(torch.float32)
    d = G.diagonal().clamp_min(0).sqrt()
    ranks = (W.abs() * d.unsqueeze(0)).argsort(dim=1).argsort(dim=1)  # 0 = smallest score in the row
    n = W.shape[1]
    errs = []
    for s in grid:
        k = int(math.floor(float(s) * n + 1e-9))
        if k <= 0:
            errs.append(0.0)
            continue
        dW = torch.where(ranks < k, W, torch.zeros_like(W))
        errs.append(max(0.0, float(((dW @ G) * dW).sum())))
    return errs, float(((W @ G) * W).sum())


@torch.no_grad()
def obs_error_curve(W: torch.Tensor, G: torch.Tensor, grid, *, rows: int = OBS_CURVE_ROWS,
                    seed: int = 0) -> tuple[list, float]:
    """Like :func:`wanda_error_curve`, for SparseGPT's OBS sweep (masks per row, weights updated): its error at each
    sparsity of ``grid``, estimated on ``rows`` output rows drawn at random (rows are solved independently, so the
    estimate is unbiased: the sampled error × m / rows), and the exact ``tr(W G Wᵀ)``."""
    from ..formulations.patterns import Unstructured
    from ..formulations.problem import LayerProblem
    from ..solvers.methods.baselines import SparseGPT
    W = W.detach().to(torch.float32).cpu()
    G = G.to(torch.float32)
    m = W.shape[0]
    if m > rows:
        idx = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:rows]
        Ws, scale = W[idx], m / rows
    else:
        Ws, scale = W, 1.0
    problem = LayerProblem(W0=Ws, H=G, name="curve")
    errs = []
    for s in grid:
        if float(s) <= 0:
            errs.append(0.0)
            continue
        dW = Ws - SparseGPT(problem, Unstructured(float(s), "row")).run().W.to(torch.float32)
        errs.append(max(0.0, scale * float(((dW @ G) * dW).sum())))
    return errs, float(((W @ G) * W).sum())


def curve_rule(method: Optional[str]) -> str:
    """Which solver's error curve bounds a method's blocks: ``obs`` (SparseGPT's) for methods that update weights
    from the Gram — SparseGPT itself, and ADMM and FISTA, which never return worse than their SparseGPT warm start,
    so SparseGPT's error is what they reach at worst — else ``wanda`` (mask-only methods)."""
    if method is None:
        return "wanda"
    from ..solvers.registry import get_method
    try:
        spec = get_method(method)
    except Exception:
        return "wanda"
    return "obs" if spec.needs == "gram" else "wanda"


def curve_grid(rule: str, sparsity: float) -> tuple:
    """The sparsities a curve is measured at: the full grid for Wanda's (cheap); for SparseGPT's, 0 and the grid
    from 0.1 below the target up (what the bounds read)."""
    if rule == "wanda":
        return DEFAULT_GRID
    return tuple(sorted({0.0} | {g for g in DEFAULT_GRID if g >= float(sparsity) - 0.1 - 1e-9}))


def error_curves(model: nn.Module, arch: Optional[ArchSpec], calib_ids: torch.Tensor, *, grid=DEFAULT_GRID,
                 max_tokens: int = MAX_GRAM_TOKENS, grams: Optional[dict] = None, rule: str = "wanda") -> dict:
    """Per-block relative reconstruction error vs sparsity (module doc): ``{"grid", "blocks": {b: [e(s)]},
    "sizes": {b: params}, "tokens", "rule", "time_s"}``. ``rule``: ``wanda`` (one-shot Wanda masks, exact) or
    ``obs`` (SparseGPT's sweep with weight updates, on a sample of rows: :func:`obs_error_curve`)."""
    if rule not in ("wanda", "obs"):
        raise AllocationError(f"unknown error-curve rule {rule!r}; choose wanda or obs")
    from .allocation import prunable_matrices
    t0 = time.perf_counter()
    arch = arch or get_arch(model)
    ids = calib_ids
    rows = max(1, min(ids.shape[0], max_tokens // max(1, ids.shape[1])))
    ids = ids[:rows]
    grid = [float(s) for s in grid]
    if grid != sorted(grid) or grid[0] < 0 or grid[-1] >= 1:
        raise AllocationError("the error-curve grid must be ascending inside [0, 1)")
    if grams is None:
        grams = input_grams(model, arch, ids)
    num: dict = {}
    den: dict = {}
    sizes: dict = {}
    for name, bi, sub, mod in prunable_matrices(model, arch):
        W = linear_weight(mod, sub in arch.transposed)
        errs, dense = (wanda_error_curve if rule == "wanda" else obs_error_curve)(W, grams[name], grid)
        acc = num.setdefault(bi, [0.0] * len(grid))
        for i, e in enumerate(errs):
            acc[i] += e
        den[bi] = den.get(bi, 0.0) + dense
        sizes[bi] = sizes.get(bi, 0) + int(W.numel())
    blocks = {b: [e / den[b] if den[b] > 0 else 0.0 for e in num[b]] for b in num}
    return {"grid": grid, "blocks": blocks, "sizes": sizes, "tokens": int(ids.numel()), "rule": rule,
            "time_s": time.perf_counter() - t0}


def _interp(grid, vals, s: float) -> float:
    if s <= grid[0]:
        return float(vals[0])
    for i in range(1, len(grid)):
        if s <= grid[i]:
            a, b = grid[i - 1], grid[i]
            return float(vals[i - 1] + (vals[i] - vals[i - 1]) * (s - a) / (b - a))
    # beyond the grid: extrapolate the last segment (the curve rises towards the dense norm at s = 1)
    a, b = grid[-2], grid[-1]
    return float(vals[-1] + (vals[-1] - vals[-2]) * (s - b) / (b - a))


def block_upper_bounds(curves: dict, sparsity: float, *, growth: Optional[float] = None,
                       s_max: float = DEFAULT_S_MAX) -> tuple[dict, dict]:
    """``({block: u_b}, info)`` with ``u_b`` the first sparsity ≥ S where the block's error reaches
    ``growth · max_c e_c(S)`` (module doc); ``u_b = s_max`` when it never does on the grid."""
    g = DEFAULT_GROWTH if growth is None else float(growth)
    if not g >= 1:
        raise AllocationError(f"growth must be ≥ 1, got {g}")
    S = float(sparsity)
    grid = curves["grid"]
    at_S = {b: _interp(grid, v, S) for b, v in curves["blocks"].items()}
    cap = g * max(at_S.values())
    upper = {}
    for b, v in curves["blocks"].items():
        pts = [(S, at_S[b])] + [(s, e) for s, e in zip(grid, v) if s > S]
        u = s_max
        for (s0, e0), (s1, e1) in zip(pts, pts[1:]):
            if e1 > cap:
                u = s0 + (cap - e0) * (s1 - s0) / (e1 - e0) if e1 > e0 else s0
                break
        upper[b] = min(s_max, max(S, u))
    info = {"growth": g, "error_cap": cap, "error_at_target": at_S, "upper": upper, "rule": curves.get("rule"),
            "binding_below_s_max": sorted(b for b, u in upper.items() if u < s_max)}
    return upper, info


def proxy_error(curves: dict, unit_sparsities: dict) -> float:
    """The cheap score of an allocation: ``Σ_b e_b(s_b)`` from the error curves (no pruning)."""
    grid = curves["grid"]
    return float(sum(_interp(grid, curves["blocks"][b], float(s)) for b, s in unit_sparsities.items()))


@torch.no_grad()
def one_pass_loss(model: nn.Module, arch: Optional[ArchSpec], sq_norms: dict, targets: dict, held: torch.Tensor, *,
                  device=None) -> float:
    """The cheap score of an allocation: held-out loss after Wanda masks at ``targets`` from the **dense**
    activation norms (every matrix at once, no sequential pass, no solver) — one forward over ``held``. The
    weights are restored before returning."""
    from .allocation import prunable_matrices
    arch = arch or get_arch(model)
    saved = []
    try:
        for name, bi, sub, mod in prunable_matrices(model, arch):
            s = float(targets[name])
            W = linear_weight(mod, sub in arch.transposed)  # a view in (out, in) layout
            k = int(math.floor(s * W.shape[1] + 1e-9))
            if k <= 0:
                continue
            sc = W.detach().abs().to(torch.float32) * sq_norms[name].to(W.device, torch.float32).clamp_min(0).sqrt()
            ranks = sc.argsort(dim=1).argsort(dim=1)
            saved.append((W, W.detach().clone()))
            W.data.masked_fill_(ranks < k, 0)
        return heldout_loss(model, held, device=device)
    finally:
        for W, orig in saved:
            W.data.copy_(orig)


# ============================================================================================ held-out score
def heldout_loss(model: nn.Module, ids: torch.Tensor, *, device=None) -> float:
    """Mean token NLL (nats) of ``model`` on the held-out calibration sequences (each row its own window)."""
    from .evaluation import perplexity
    ids = torch.as_tensor(ids)
    orig = model_device(model)
    dev = torch.device(device) if device is not None else orig
    model.to(dev)
    try:
        r = perplexity(model, ids.reshape(-1), int(ids.shape[1]), device=dev, progress=False)
    finally:
        model.to(orig)
    return float(r["nll"])


# ============================================================================================ candidates
def selection_candidates(sparsity: float, eps: Optional[float] = None) -> list:
    """The candidate set: ``[(label, rule, params)]``; uniform first. ``eps`` fixes alpha's ε to one value."""
    out = [("uniform", "uniform", {})]
    for agg in AGGREGATES:
        for e in ((eps,) if eps is not None else ALPHA_EPS):
            out.append((f"alpha:{agg}:eps={e:g}", "alpha", {"aggregate": agg, "eps": float(e)}))
    for lam in OWL_LAMBDAS:
        if lam < sparsity:
            out.append((f"owl:lam={lam:g}", "owl", {"lam": float(lam)}))
    return out


def _records(model, arch, spectra, sq_norms) -> dict:
    from .allocation import OWL_M, owl_outlier_ratios, prunable_matrices
    by = {s.name: s for s in spectra}
    D = owl_outlier_ratios(model, arch, sq_norms, M=OWL_M, granularity="block")
    rec = {}
    for name, bi, sub, mod in prunable_matrices(model, arch):
        W = linear_weight(mod, sub in arch.transposed)
        sp = by[name]
        rec[name] = {"block": bi, "numel": int(W.numel()), "n_tail": int(sp.fit.n_tail), "outlier_ratio": D[bi],
                     **{m: sp.metric(m) for m in SHAPE_METRICS}}
    return rec


def select_allocation(model: nn.Module, arch: Optional[ArchSpec], sparsity: float, calib_ids: torch.Tensor,
                      prune_config, *, eps: Optional[float] = None, growth: Optional[float] = None,
                      finalists: int = DEFAULT_FINALISTS, holdout: Optional[int] = None,
                      rows: Optional[int] = None, progress: bool = False) -> tuple[dict, dict]:
    """``--allocation auto`` (module doc): per-sub-layer targets of the chosen candidate and the selection record."""
    from .allocation import model_spectra, prunable_matrices
    t0 = time.perf_counter()
    arch = arch or get_arch(model)
    ids = calib_ids
    train, held, train_f = _split_calibration(ids, holdout, rows)
    S = float(sparsity)
    # ---- cheap measurements on the pruning part: Grams → error curves, bounds; spectra; OWL ratios
    grams = input_grams(model, arch, train[: max(1, MAX_GRAM_TOKENS // max(1, train.shape[1]))])
    rule = curve_rule(getattr(prune_config, "method", None))
    curves = error_curves(model, arch, train, grams=grams, rule=rule, grid=curve_grid(rule, sparsity))
    upper, binfo = block_upper_bounds(curves, S, growth=growth)
    sq = {name: grams[name].diagonal().clone() for name in grams}
    records = _records(model, arch, model_spectra(model, arch), sq)
    del grams
    names = [name for name, *_ in prunable_matrices(model, arch)]
    seen: dict = {}
    cands = [_candidate(label, rule, params, S, curves, records, names, upper, seen)
             for label, rule, params in selection_candidates(S, eps)]
    held_proxy = held[: max(1, MAX_PROXY_TOKENS // max(1, held.shape[1]))]
    for c in cands:  # the cheap score: one forward with dense-input Wanda masks
        if "_targets" in c and "same_as" not in c:
            c["proxy"] = one_pass_loss(model, arch, sq, c["_targets"], held_proxy, device=prune_config.device)
    uni = cands[0]
    ranked = sorted((c for c in cands[1:] if "proxy" in c), key=lambda c: c["proxy"])
    chosen_final = [uni] + ranked[: max(0, int(finalists))]
    for c in cands:
        c["finalist"] = any(c is f for f in chosen_final)
    # ---- the finalists: prune a copy on the pruning part, score on the held-out part
    dense_loss = heldout_loss(model, held, device=prune_config.device)
    for c in chosen_final:
        _score_finalist(model, c, train_f, held, prune_config, progress)
    best = uni
    for c in chosen_final[1:]:
        if c["heldout_loss"] < best["heldout_loss"]:
            best = c
    targets = best["_targets"]
    ref = None
    if "_solved" in best:  # the chosen bounded program, solved again by the reference backend
        from .allocation import reference_check
        ref = reference_check(*best["_solved"])
    for c in cands:
        c.pop("_targets", None)
        c.pop("_solved", None)
    p = torch.tensor([records[nm]["numel"] for nm in names], dtype=torch.float64)
    s = torch.tensor([targets[nm] for nm in names], dtype=torch.float64)
    info = {"allocation": "auto", "spec": "auto", "sparsity": S, "granularity": "block", "chosen": best["label"],
            "chosen_rule": best["rule"], "chosen_params": best["params"], "chosen_score": best["heldout_loss"],
            "uniform_score": uni["heldout_loss"], "dense_score": dense_loss,
            "score": "mean token NLL of the held-out calibration sequences (nats), candidates pruned on the rest",
            "proxy": "held-out loss after one-shot Wanda masks from the dense activation norms (no solver, one "
                     "forward); error_sum: Σ over blocks of the relative Wanda reconstruction error at the block's "
                     "sparsity (error curves)",
            "calibration_split": {"pruning": int(train.shape[0]), "finalists_pruned_on": int(train_f.shape[0]),
                                  "heldout": int(held.shape[0]),
                                  "seqlen": int(ids.shape[1]), "proxy_rows": int(held_proxy.shape[0])},
            "candidates": cands, "bounds": binfo, "error_curves": curves, "reference_check": ref,
            "units": list(best["unit_sparsities"]), "unit_sparsities": list(best["unit_sparsities"].values()),
            "targets": targets, "weighted_mean": float((p * s).sum() / p.sum()), "min": float(s.min()),
            "max": float(s.max()), "time_s": time.perf_counter() - t0}
    return targets, to_json(info, string_keys=False)


def _split_calibration(ids: torch.Tensor, holdout: Optional[int], rows: Optional[int]) -> tuple:
    """(pruning sequences, held-out sequences, the finalists' pruning sequences) of the calibration set."""
    n = int(ids.shape[0])
    h = int(holdout) if holdout is not None else max(1, n // 4)
    if n < 2 or not (1 <= h < n):
        raise AllocationError(f"the auto allocation splits the calibration set into pruning and held-out sequences: "
                              f"it needs ≥ 2 sequences and 1 ≤ holdout < {n} (got {n} sequences, holdout {h})")
    train, held = ids[: n - h], ids[n - h:]
    if rows is not None and not (1 <= int(rows)):
        raise AllocationError(f"the auto allocation's rows (sequences the finalists are pruned on) must be ≥ 1, "
                              f"got {rows}")
    return train, held, (train[: int(rows)] if rows is not None else train)


def _candidate(label: str, rule: str, params: dict, S: float, curves: dict, records: dict, names: list,
               upper: dict, seen: dict) -> dict:
    """One candidate allocation: its block sparsities (solved under the measured upper bounds), per-matrix
    targets and error-curve proxy; a candidate with the block sparsities of an earlier one (``seen``) is marked
    ``same_as`` it, one whose program fails carries the ``error``."""
    c = {"label": label, "rule": rule, "params": dict(params)}
    if rule == "uniform":
        unit_s = {b: S for b in curves["blocks"]}
        targets = {nm: S for nm in names}
    else:
        p = dict(params)
        e = p.pop("eps", None)
        p["upper"] = upper
        try:
            res = allocate(rule, records, S, eps=e, params=p)
        except AllocationError as err:
            c.update(error=str(err))
            return c
        unit_s = dict(zip(res.units, res.sparsities))
        targets = dict(res.per_matrix)
        c["_solved"] = (res.program, list(res.sparsities))
    c["unit_sparsities"] = unit_s
    c["error_sum"] = proxy_error(curves, unit_s)
    sig = tuple(round(float(unit_s[b]), 6) for b in sorted(unit_s))
    if sig in seen:  # the same block sparsities as an earlier candidate: scored once
        c["same_as"] = seen[sig]
    else:
        seen[sig] = label
    c["_targets"] = targets
    return c


def _score_finalist(model: nn.Module, c: dict, train: torch.Tensor, held: torch.Tensor, prune_config,
                    progress: bool) -> None:
    """Prune a copy of the model to the candidate's targets on ``train`` and record its held-out loss."""
    from .pipeline import prune_model
    t1 = time.perf_counter()
    m = copy.deepcopy(model)
    cfg = dataclasses.replace(prune_config, layer_sparsity=None if c["rule"] == "uniform" else dict(c["_targets"]))
    prune_model(m, train, cfg, progress=False)
    c["heldout_loss"] = heldout_loss(m, held, device=prune_config.device)
    c["time_s"] = time.perf_counter() - t1
    del m
    if progress:
        import sys
        print(f"[optprune] auto allocation: {c['label']}: proxy {c['proxy']:.4f}, held-out loss "
              f"{c['heldout_loss']:.4f}", file=sys.stderr, flush=True)


# ============================================================================================ plot
def plot_selection(info: dict, path) -> str:
    """Candidates of an ``auto`` selection: proxy (bars) and held-out loss of the finalists (dots), chosen and
    uniform marked; PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cands = [c for c in info.get("candidates", []) if c.get("proxy") is not None]
    if not cands:
        raise AllocationError("no scored candidates to plot")
    labels = [c["label"] for c in cands]
    x = list(range(len(cands)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cands)), 4.2))
    ax.plot(x, [c["proxy"] for c in cands], "s", color="#888", label="proxy: one-shot Wanda, held-out loss")
    fx = [i for i, c in enumerate(cands) if c.get("heldout_loss") is not None]
    ax.plot(fx, [cands[i]["heldout_loss"] for i in fx], "o", color="#c33", label="finalist: pruned, held-out loss")
    ch = [i for i, c in enumerate(cands) if c["label"] == info.get("chosen")]
    if ch:
        ax.plot(ch, [cands[ch[0]]["heldout_loss"]], "o", ms=12, mfc="none", mec="#2a7", mew=2, label="chosen")
    if info.get("uniform_score") is not None:
        ax.axhline(float(info["uniform_score"]), color="#c33", ls="--", lw=0.8, label="uniform, held-out loss")
    ax.set_ylabel("held-out calibration loss (nats)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.legend(loc="best", fontsize=7)
    ax.set_title(f"auto allocation at {100 * float(info['sparsity']):.0f}%: chosen {info.get('chosen')}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
