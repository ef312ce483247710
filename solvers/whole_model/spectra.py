"""Heavy-tailed spectral analysis of weight matrices (docs/methods.md §3, AlphaPruning / HT-SR theory).

For a weight matrix ``W`` (out × in) the empirical spectral density (ESD) is the set of eigenvalues of
``WᵀW``, i.e. ``λ = σ(W)²`` — the ``min(m, n)`` squared singular values (the structural zeros of a
rectangular ``WᵀW`` are left out, as in the public code). They are computed here in **float64** from the
stored weights (``torch.linalg.svdvals``), batched over matrices of equal shape, on CPU or GPU.

Power-law fit of the tail (continuous Hill / maximum-likelihood estimator, Clauset–Shalizi–Newman)::

    α(x_min) = 1 + n / (Σ_{λ_j ≥ x_min} ln λ_j − n ln x_min),      n = #{λ_j ≥ x_min}

``x_min`` is chosen among the eigenvalues by minimising the Kolmogorov–Smirnov distance between the empirical
tail and the fitted law ``F(x) = 1 − (x/x_min)^{1−α}``. The public AlphaPruning code (and WeightWatcher's
``fix_fingers='xmin_peak'``) restricts the candidates to ``x_min ≤ 1.5 · 10^{e}``, ``e`` the left edge of the
fullest of 100 equal bins of ``log10 λ`` (``peak_limit=True``, the default). That code also skips candidates
below ``log10(0.95·peak)`` — a comparison of an eigenvalue with a *logarithm*, inherited from WeightWatcher;
it is reproduced only on request (``legacy_lower_bound=True``) and is reported when it would have mattered.

KS convention: ``D = max_k |F(λ_{i+k}) − k/n|`` (empirical CDF just below each point), which is what the
public code, WeightWatcher and ``powerlaw`` 2.x compute; ``ks='two-sided'`` takes the max with ``(k+1)/n`` too.

Every fit records the tail size ``n_tail`` and the KS distance; shape metrics besides α: spectral norm
(``λ_max = σ_max²``, WeightWatcher's convention), log spectral norm (``log10 λ_max``), alpha-weighted
(``α·log10 λ_max``), stable rank (``Σλ / λ_max``) and log norm (``log10 Σλ = 2 log10 ‖W‖_F``).

This module has no knowledge of models: it takes named matrices (see
:mod:`optprune.llm_adapters.allocation` for the model side).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

import torch

__all__ = ["PowerLawFit", "MatrixSpectrum", "SHAPE_METRICS", "eigenvalues", "hill_alpha", "ks_distance",
           "fit_power_law", "histogram_peak", "matrix_spectra", "block_metric", "aggregate_metric", "AGGREGATES",
           "MIN_TAIL", "SpectraError"]

#: metrics a layer can be ranked by (larger α ⇒ lighter tail ⇒ less well trained ⇒ pruned more)
SHAPE_METRICS = ("alpha", "alpha_weighted", "stable_rank", "spectral_norm", "log_spectral_norm", "log_norm")

#: how a block's value is formed from its matrices' values: ``mean`` (AlphaPruning), ``median``, or ``weighted``
#: (mean weighted by the tail size ``n_tail``; tails shorter than ``MIN_TAIL`` eigenvalues get weight 0)
AGGREGATES = ("mean", "median", "weighted")
MIN_TAIL = 10  # a power-law fit on fewer tail eigenvalues is flagged ``small_tail``


class SpectraError(ValueError):
    """Bad input to the spectral analysis (empty matrix, NaN/Inf weights, too few eigenvalues)."""


# --------------------------------------------------------------------------------------------- eigenvalues
@torch.no_grad()
def eigenvalues(mats: Sequence[torch.Tensor], *, device=None, batch_bytes: int = 512 << 20,
                method: str = "svd") -> list[torch.Tensor]:
    """Eigenvalues of ``WᵀW`` (= σ(W)², float64, ascending) for each matrix, batched where shapes agree.

    ``device``: where they are computed (default: each matrix's own device); results stay there.
    ``method``: ``"svd"`` (default) squares ``torch.linalg.svdvals`` in float64 — every eigenvalue to relative
    accuracy; ``"gram"`` takes ``eigvalsh`` of the smaller Gram matrix (``WᵀW`` or ``WWᵀ``) in float64 — several
    times faster on a CPU, exact to ~1e-16·λ_max absolute (so the large eigenvalues, where the tail fit lives,
    to full relative accuracy; eigenvalues below ~1e-10·λ_max lose digits).
    """
    if method not in ("svd", "gram"):
        raise SpectraError(f"eigenvalue method must be 'svd' or 'gram', got {method!r}")
    mats = list(mats)
    out: list[Optional[torch.Tensor]] = [None] * len(mats)
    by_shape: dict = {}
    for i, W in enumerate(mats):
        if W.dim() != 2 or W.numel() == 0:
            raise SpectraError(f"matrix {i}: expected a non-empty 2-D weight, got shape {tuple(W.shape)}")
        by_shape.setdefault((tuple(W.shape), str(device or W.device)), []).append(i)
    for (shape, dev), idx in by_shape.items():
        per = shape[0] * shape[1] * 8 * 3  # float64 copy + LAPACK workspace, roughly
        step = max(1, batch_bytes // per)
        for j in range(0, len(idx), step):
            chunk = idx[j:j + step]
            A = torch.stack([mats[i].detach().to(device=dev, dtype=torch.float64) for i in chunk])
            if not torch.isfinite(A).all():
                bad = [i for i, a in zip(chunk, A) if not torch.isfinite(a).all()]
                raise SpectraError(f"matrices {bad}: weights contain NaN/Inf")
            if method == "svd":
                sv = torch.linalg.svdvals(A)  # (b, min(m, n)), descending
                ev = (sv * sv).flip(-1)       # ascending
            else:
                G = A.transpose(-1, -2) @ A if shape[0] >= shape[1] else A @ A.transpose(-1, -2)
                ev = torch.linalg.eigvalsh(G).clamp_min(0.0)  # ascending
            for k, i in enumerate(chunk):
                out[i] = ev[k].contiguous()
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- power law
@dataclass
class PowerLawFit:
    alpha: float
    xmin: float
    n_tail: int           # eigenvalues in the fitted tail (λ ≥ x_min)
    ks: float             # KS distance of the chosen fit
    n_eigs: int           # eigenvalues considered (numerical zeros removed)
    xmin_index: int       # index of x_min in the ascending eigenvalues
    n_candidates: int     # x_min candidates searched (1 for a fixed x_min)
    sigma: float          # standard error of the MLE, (α − 1)/√n_tail
    peak: Optional[float] = None       # 10^(left edge of the histogram peak bin), when the peak limit is used
    xmin_max: Optional[float] = None   # candidate limit 1.5·peak
    legacy_lower_would_bind: Optional[bool] = None  # would the public code's log10 lower bound have changed α?
    alpha_unlimited: Optional[float] = None   # α of the unrestricted KS search (for comparison), if computed

    @property
    def small_tail(self) -> bool:
        return self.n_tail < MIN_TAIL

    def to_dict(self) -> dict:
        d = asdict(self)
        d["small_tail"] = self.small_tail
        return d


def _clean(eigs: torch.Tensor, zero_tol: float) -> torch.Tensor:
    ev = torch.as_tensor(eigs).detach().to(torch.float64).reshape(-1)
    if not torch.isfinite(ev).all():
        raise SpectraError("eigenvalues contain NaN/Inf")
    ev, _ = torch.sort(ev)
    top = float(ev[-1]) if ev.numel() else 0.0
    if top <= 0:
        raise SpectraError("all eigenvalues are zero: the matrix is zero")
    return ev[ev > zero_tol * top]


def hill_alpha(eigs: torch.Tensor, xmin: float) -> tuple[float, int]:
    """Closed-form MLE ``α = 1 + n / Σ ln(λ_j / x_min)`` over ``λ_j ≥ x_min``; returns ``(α, n)``."""
    ev = torch.as_tensor(eigs, dtype=torch.float64).reshape(-1)
    tail = ev[ev >= xmin]
    n = int(tail.numel())
    if n < 2:
        raise SpectraError(f"x_min={xmin:g} leaves {n} eigenvalue(s); need at least 2")
    s = float(torch.log(tail / xmin).sum())
    return (1.0 + n / s if s > 0 else math.inf), n


def ks_distance(tail: torch.Tensor, alpha: float, xmin: float, *, ks: str = "lower") -> float:
    """KS distance between the sorted tail (all ≥ x_min) and ``F(x) = 1 − (x/x_min)^{1−α}``."""
    t, _ = torch.sort(torch.as_tensor(tail, dtype=torch.float64).reshape(-1))
    n = t.numel()
    F = 1.0 - torch.exp((1.0 - alpha) * torch.log(t / xmin))
    k = torch.arange(n, dtype=torch.float64, device=t.device)
    D = (F - k / n).abs().max()
    if ks == "two-sided":
        D = torch.maximum(D, (F - (k + 1) / n).abs().max())
    return float(D)


def histogram_peak(eigs: torch.Tensor, bins: int = 100) -> float:
    """``10^e`` with ``e`` the left edge of the fullest of ``bins`` equal bins of ``log10 λ`` (first on ties)."""
    le = torch.log10(torch.as_tensor(eigs, dtype=torch.float64))
    lo, hi = float(le.min()), float(le.max())
    if hi <= lo:
        return 10.0 ** lo
    width = (hi - lo) / bins
    idx = ((le - lo) / width).floor().clamp(0, bins - 1).long()  # the top value goes in the last bin
    counts = torch.bincount(idx, minlength=bins)
    ih = int(torch.argmax(counts))
    return 10.0 ** (lo + ih * width)


def _scan(ev: torch.Tensor, cand: torch.Tensor, ks: str, chunk_elems: int = 1 << 22):
    """α and KS distance for every candidate index in ``cand`` (ascending ``ev``), vectorised in chunks."""
    N = ev.numel()
    logs = torch.log(ev)
    suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # suffix[i] = Σ_{j≥i} ln λ_j
    n = (N - cand).to(torch.float64)
    denom = suffix[cand] - n * logs[cand]
    alphas = torch.where(denom > 0, 1.0 + n / denom.clamp_min(1e-300), torch.full_like(n, math.inf))
    Ds = torch.ones_like(alphas)
    j = torch.arange(N, device=ev.device)
    step = max(1, chunk_elems // max(N, 1))
    for a in range(0, cand.numel(), step):
        ci = cand[a:a + step]
        al = alphas[a:a + step]
        nn_ = n[a:a + step]
        k = (j.unsqueeze(0) - ci.unsqueeze(1)).to(torch.float64)    # (c, N): position inside the tail
        valid = k >= 0
        expo = (1.0 - al).unsqueeze(1) * (logs.unsqueeze(0) - logs[ci].unsqueeze(1))
        F = 1.0 - torch.exp(expo.clamp(max=700.0))
        D = (F - k / nn_.unsqueeze(1)).abs()
        if ks == "two-sided":
            D = torch.maximum(D, (F - (k + 1) / nn_.unsqueeze(1)).abs())
        D = torch.where(valid, D, torch.zeros_like(D)).amax(1)
        ok = torch.isfinite(al) & (al > 1)  # as the public code: α ≤ 1 keeps D = 1 (never preferred)
        Ds[a:a + step] = torch.where(ok, D, torch.ones_like(D))
    return alphas, Ds


def fit_power_law(eigs: torch.Tensor, *, xmin: Optional[float] = None, peak_limit: bool = True,
                  bins: int = 100, peak_factor: float = 1.5, min_tail: int = 2, ks: str = "lower",
                  legacy_lower_bound: bool = False, zero_tol: float = 1e-24,
                  compare_unlimited: bool = False) -> PowerLawFit:
    """Hill/MLE power-law exponent of the eigenvalue tail with the KS-chosen ``x_min``.

    ``xmin``: fix the lower cut-off instead of searching. ``peak_limit``: restrict candidates to
    ``≤ peak_factor · histogram_peak`` (public code, default). ``min_tail``: smallest tail searched (the public
    code allows 2). ``compare_unlimited``: also record α of the unrestricted search. ``zero_tol``: eigenvalues
    ``≤ zero_tol·λ_max`` are numerical zeros of a rank-deficient matrix (float64 SVD resolves σ only down to
    ~1e-16·σ_max, i.e. λ down to ~1e-32·λ_max) and are dropped.
    """
    if ks not in ("lower", "two-sided"):
        raise SpectraError(f"ks must be 'lower' or 'two-sided', got {ks!r}")
    ev = _clean(eigs, zero_tol)
    N = ev.numel()
    if N < max(2, min_tail):
        raise SpectraError(f"{N} nonzero eigenvalue(s): too few to fit a power law (need ≥ {max(2, min_tail)})")
    if xmin is not None:
        x0 = float(xmin)
        a, n = hill_alpha(ev, x0)
        i0 = N - n
        return PowerLawFit(a, x0, n, ks_distance(ev[i0:], a, x0, ks=ks), N, i0, 1, (a - 1) / math.sqrt(n))
    last = N - max(2, min_tail)  # candidates 0..last (tail ≥ min_tail)
    allc = torch.arange(0, last + 1, device=ev.device)
    peak = xmax = None
    cand = allc
    if peak_limit:
        peak = histogram_peak(ev, bins)
        xmax = peak_factor * peak
        cand = allc[ev[allc] <= xmax]
        if cand.numel() == 0:  # cannot happen (the smallest eigenvalue is below the peak edge); be safe
            cand = allc[:1]
    alphas, Ds = _scan(ev, cand, ks)
    b = int(torch.argmin(Ds))  # first minimum, as torch.argmin in the public code
    would_bind = None
    if peak_limit:
        # the public code also skips candidates λ < log10(0.95·peak) (an eigenvalue against a logarithm)
        keep = ev[cand] >= math.log10(0.95 * peak)
        if keep.any():
            sub = torch.nonzero(keep).reshape(-1)
            b_legacy = int(sub[int(torch.argmin(Ds[sub]))])
            would_bind = b_legacy != b
            if legacy_lower_bound:
                b = b_legacy
    i0 = int(cand[b])
    a, D = float(alphas[b]), float(Ds[b])
    n = N - i0
    fit = PowerLawFit(a, float(ev[i0]), n, D, N, i0, int(cand.numel()), (a - 1) / math.sqrt(n), peak, xmax,
                      would_bind)
    if compare_unlimited:
        if peak_limit:
            au, du = _scan(ev, allc, ks)
            fit.alpha_unlimited = float(au[int(torch.argmin(du))])
        else:
            fit.alpha_unlimited = a
    return fit


# --------------------------------------------------------------------------------------------- per matrix
@dataclass
class MatrixSpectrum:
    name: str
    shape: tuple
    fit: PowerLawFit
    spectral_norm: float        # λ_max = σ_max²
    stable_rank: float          # Σλ / λ_max
    log_norm: float             # log10 Σλ
    block: Optional[int] = None
    eigs: Optional[torch.Tensor] = field(default=None, repr=False)  # ascending float64 (kept on request)

    @property
    def numel(self) -> int:
        return int(self.shape[0]) * int(self.shape[1])

    @property
    def alpha(self) -> float:
        return self.fit.alpha

    @property
    def log_spectral_norm(self) -> float:
        return math.log10(self.spectral_norm)

    @property
    def alpha_weighted(self) -> float:
        return self.fit.alpha * math.log10(self.spectral_norm)

    def metric(self, name: str) -> float:
        if name not in SHAPE_METRICS:
            raise SpectraError(f"unknown shape metric {name!r}; choose from {', '.join(SHAPE_METRICS)}")
        return float(getattr(self, name))

    def to_dict(self) -> dict:
        d = {"name": self.name, "block": self.block, "shape": list(self.shape), "numel": self.numel}
        d.update({m: self.metric(m) for m in SHAPE_METRICS})
        d.update({k: v for k, v in self.fit.to_dict().items() if k != "alpha"})
        return d


def matrix_spectra(named: Iterable, *, device=None, keep_eigs: bool = False, eig_method: str = "svd",
                   **fit_options) -> list[MatrixSpectrum]:
    """Spectra and power-law fits of named matrices.

    ``named``: iterable of ``(name, W)`` or ``(name, block, W)`` with ``W`` in (out, in) layout (any dtype;
    converted to float64). Eigenvalues are computed batched by shape on ``device`` (``eig_method``: see
    :func:`eigenvalues`).
    """
    items = []
    for it in named:
        if len(it) == 2:
            items.append((it[0], None, it[1]))
        else:
            items.append(tuple(it))
    if not items:
        raise SpectraError("no matrices given")
    evs = eigenvalues([W for _, _, W in items], device=device, method=eig_method)
    out = []
    for (name, block, W), ev in zip(items, evs):
        try:
            fit = fit_power_law(ev, **fit_options)
        except SpectraError as e:
            raise SpectraError(f"matrix {name!r}: {e}") from None
        top = float(ev[-1])
        tot = float(ev.sum())
        out.append(MatrixSpectrum(name, tuple(W.shape), fit, top, tot / top, math.log10(tot), block,
                                  ev.cpu() if keep_eigs else None))
    return out


def aggregate_metric(values: Sequence[float], tails: Optional[Sequence[int]] = None, how: str = "mean",
                     min_tail: int = MIN_TAIL) -> float:
    """One block value from its matrices' values.

    ``mean``: AlphaPruning's plain mean. ``median``: the median (mean of the two middle values for an even count) —
    one outlying matrix cannot move it. ``weighted``: ``Σ n_tail·v / Σ n_tail`` over the matrices whose fitted tail
    has at least ``min_tail`` eigenvalues (an α from a handful of eigenvalues is mostly noise: its standard error
    is ``(α − 1)/√n_tail``); when no matrix of the block has such a tail, all are weighted by ``n_tail``.
    """
    if how not in AGGREGATES:
        raise SpectraError(f"unknown aggregate {how!r}; choose from {', '.join(AGGREGATES)}")
    v = torch.as_tensor([float(x) for x in values], dtype=torch.float64)
    if v.numel() == 0:
        raise SpectraError("no values to aggregate")
    if how == "mean":
        return float(v.mean())
    if how == "median":
        sv, _ = torch.sort(v)
        k = sv.numel()
        return float(sv[k // 2]) if k % 2 else float((sv[k // 2 - 1] + sv[k // 2]) / 2)
    if tails is None:
        raise SpectraError("the weighted aggregate needs each matrix's tail size (n_tail)")
    n = torch.as_tensor([float(x) for x in tails], dtype=torch.float64)
    if n.numel() != v.numel() or (n <= 0).any():
        raise SpectraError("the weighted aggregate needs one positive tail size per value")
    w = torch.where(n >= min_tail, n, torch.zeros_like(n))
    if float(w.sum()) <= 0:
        w = n
    return float((w * v).sum() / w.sum())


def block_metric(spectra: Sequence[MatrixSpectrum], metric: str = "alpha", aggregate: str = "mean") -> dict:
    """``metric`` of each block from its matrices (:func:`aggregate_metric`; ``mean`` is AlphaPruning's
    block-wise α): ``{block: value}``."""
    acc: dict = {}
    for s in spectra:
        acc.setdefault(s.block, []).append((s.metric(metric), s.fit.n_tail))
    return {b: aggregate_metric([x for x, _ in v], [n for _, n in v], aggregate) for b, v in acc.items()}
