"""EGGS-PTP (docs/methods.md §5): N:M masks that stay expander graphs — the production torch solver.

**The mask problem** [reconstructed], solved independently per tile of M output rows × M input columns::

    max_{x ∈ {0,1}^{M×M}}  Σ_ij S_ij x_ij   s.t.  Σ_j x_ij = N  (every row keeps exactly N of its M)
                                               Σ_i x_ij ≥ B  (every column keeps at least B),  B ≤ N

It is a transportation problem (rows supply N, columns demand ≥ B): the constraint matrix is totally
unimodular, so the LP relaxation is integral and min-cost flow solves it exactly (``ref_flow.py``).
The declarative model is ``mask_program(scores, ExpanderNM(N, M, B))``.

**Production solver** (batched over all tiles of a layer, CPU or CUDA):

* ``ssp`` (default, exact for every M): start from the unconstrained optimum — per row the top-N (the N:M
  mask) — and repair only the tiles with a column below ``B`` by *successive shortest paths*. In flow terms
  the top-N mask is a min-cost flow for relaxed demands with no negative residual cycle (each row keeps its
  N best), the columns with degree > B hold the excess and the columns below B the deficit; augmenting one
  unit along a shortest residual path from an excess column to a deficit column keeps the flow optimal
  (the successive-shortest-path theorem), so after Σ_j max(0, B − deg_j) augmentations the mask is optimal
  for the constrained problem. A residual path alternates "row i drops column k, takes column j" (cost
  S_ik − S_ij ≥ 0 in total along the path); collapsing rows gives a dense M×M column graph, on which
  Bellman–Ford runs M−1 Jacobi sweeps as batched min-plus products. At most (M−N)·B rounds; each round works
  only on the tiles still short, in the scores' dtype (float64 in the reference tests).
* ``enum`` (exact, small M): every feasible tile mask is enumerated once (2:4 with B = 1: 978 of the 6⁴
  row-pattern combinations; B = 2: 90) and all tiles are scored in one matmul ``S_flat @ masksᵀ``; argmax.
  Available when C(M,N)^M ≤ 2·10⁵ (M ≤ 4 in practice).
* ``auto`` (default): ``enum`` when a tile has at most 256 feasible masks (2:4 with B = 2: 90; 1:4; 3:4 with
  B ≥ 2), else ``ssp`` (2:4 with B = 1: 978 masks, where both cost about the same on a CPU; every M > 4).
* ``greedy`` (heuristic, for comparison): the same repair but each round takes the cheapest *single* swap
  (one row moves from an excess to a deficit column), falling back to the exact repair for the rare tiles
  without one. Not optimal; its gap is measured in tests/benchmarks.

The projection is registered as ``"expander_nm"`` so ``ExpanderNM(N, M, B).project(scores)`` works.

**Method** ``eggs``: score = RIA (default; ``score=wanda|magnitude``), expander N:M mask, weights kept
(``W0 ⊙ mask``) or least-squares refitted on the mask (``refit=True``; ``info`` carries the error before and
after). With a plain N:M pattern, ``B = min_degree`` (default 1). ``info['graph']`` holds the layer's graph
metrics (degrees, components, spectral gap vs the Ramanujan bound; :mod:`.graph_metrics`).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Optional

import torch

from ..formulations.patterns import NM, ExpanderNM, Pattern, PatternError, register_projection
from ..formulations.problem import LayerProblem, NumericalError
from ..formulations.programs import mask_program
from .base import LayerResult, Timer, torch_threads
from .baselines import refit_result, ria_scores, wanda_scores
from .registry import register_method

__all__ = ["expander_nm_mask", "solve_tiles", "feasible_tile_masks", "tile_view", "untile", "tile_objective",
           "eggs", "eggs_scores", "as_expander", "ALGORITHMS"]

ALGORITHMS = ("auto", "ssp", "enum", "greedy")
ENUM_MAX_COMBOS = 200_000          # C(M,N)^M row-pattern combinations we are willing to enumerate
ENUM_AUTO_MAX_MASKS = 256          # 'auto' enumerates when a tile has at most this many feasible masks
_CHUNK_BYTES = 128 << 20           # working memory per batched step


# --------------------------------------------------------------------------------------------- tiles
def tile_view(x: torch.Tensor, M: int) -> torch.Tensor:
    """(m, n) → (T, M, M) tiles [row tile major, then column tile], rows × columns inside a tile."""
    m, n = x.shape
    return x.reshape(m // M, M, n // M, M).permute(0, 2, 1, 3).reshape(-1, M, M)


def untile(t: torch.Tensor, m: int, n: int) -> torch.Tensor:
    M = t.shape[-1]
    return t.reshape(m // M, n // M, M, M).permute(0, 2, 1, 3).reshape(m, n)


def tile_objective(S: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ S·x per tile, in float64."""
    return (S.to(torch.float64) * x.to(torch.float64)).sum((1, 2))


def _check_args(N: int, M: int, B: int, shape=None) -> None:
    ExpanderNM(N, M, B) if shape is None else ExpanderNM(N, M, B).validate(tuple(shape))


@functools.lru_cache(maxsize=32)
def _feasible_tile_masks_cpu(N: int, M: int, B: int) -> Optional[torch.Tensor]:
    pats = list(itertools.combinations(range(M), N))
    if len(pats) ** M > ENUM_MAX_COMBOS:
        return None
    P = torch.zeros(len(pats), M, dtype=torch.bool)
    for p, cols in enumerate(pats):
        P[p, list(cols)] = True
    idx = torch.cartesian_prod(*[torch.arange(len(pats))] * M) if M > 1 else torch.arange(len(pats))[:, None]
    masks = P[idx.reshape(-1, M)]                     # (K, M rows, M cols)
    return masks[masks.sum(1).min(1).values >= B].contiguous()


def feasible_tile_masks(N: int, M: int, B: int, device=None) -> Optional[torch.Tensor]:
    """All feasible M×M tile masks (C, M, M) bool, or None when there are too many to enumerate."""
    _check_args(N, M, B)
    t = _feasible_tile_masks_cpu(int(N), int(M), int(B))
    return None if t is None else t.to(device)


def _chunks(total: int, per_item_bytes: int):
    step = max(1, _CHUNK_BYTES // max(per_item_bytes, 1))
    for s in range(0, total, step):
        yield s, min(total, s + step)


# --------------------------------------------------------------------------------------------- backends
def _topn(S: torch.Tensor, N: int, with_degrees: bool = False):
    """Per row the N largest scores (the unconstrained optimum); optionally the column degrees (T, M)."""
    T, M, _ = S.shape
    x = torch.zeros_like(S, dtype=torch.bool)
    deg = torch.zeros(T, M, dtype=torch.int32, device=S.device)
    if N:
        idx = torch.topk(S, N, dim=2, sorted=False).indices
        x.scatter_(2, idx, True)
        if with_degrees:
            deg.scatter_add_(1, idx.reshape(T, M * N), torch.ones(1, 1, dtype=torch.int32,
                                                                   device=S.device).expand(T, M * N))
    return (x, deg) if with_degrees else x


def _enum(S: torch.Tensor, N: int, M: int, B: int) -> torch.Tensor:
    masks = feasible_tile_masks(N, M, B, device=S.device)
    if masks is None:
        raise PatternError(f"expander {N}:{M} has too many tile patterns to enumerate; use algorithm='ssp'")
    C = masks.shape[0]
    # on CUDA the matmul runs in float64: a TF32 setting (allow_tf32) must not change which mask wins
    dt = torch.float64 if S.is_cuda else S.dtype
    Mf = masks.reshape(C, M * M).to(dt).T.contiguous()   # (M², C)
    T = S.shape[0]
    Sf = S.reshape(T, M * M).to(dt)
    best = torch.empty(T, dtype=torch.long, device=S.device)
    for a, b in _chunks(T, C * S.element_size() * 2):
        best[a:b] = (Sf[a:b] @ Mf).argmax(1)
    return masks[best]


def _swap_costs(S: torch.Tensor, x: torch.Tensor):
    """Column graph of a tile: ``C[k, j] = min_i S_ik − S_ij`` over rows i with x_ik = 1, x_ij = 0 (row i drops
    column k and takes column j), ``+inf`` where no row can; and the minimising row ``R[k, j]``."""
    inf = float("inf")
    A = S.masked_fill(~x, inf)                 # S_ik where kept, +inf elsewhere
    Bm = S.masked_fill(x, -inf)                # S_ij where not kept, −inf elsewhere  (A − Bm = +inf if invalid)
    return (A.unsqueeze(3) - Bm.unsqueeze(2)).min(1)    # over rows i: (a, k, j)


def _tol(S: torch.Tensor) -> torch.Tensor:
    M = S.shape[-1]
    return (4 * M * torch.finfo(S.dtype).eps) * S.abs().amax((1, 2)).unsqueeze(1)


def _augment_exact(S: torch.Tensor, x: torch.Tensor, deg: torch.Tensor, B: int) -> None:
    """One successive-shortest-path augmentation on every tile of the batch (all have a deficit). In place."""
    a, M, _ = S.shape
    ar = torch.arange(a, device=S.device)
    Ckj, R = _swap_costs(S, x)
    inf = float("inf")
    src, dst = deg > B, deg < B
    dist = torch.zeros(a, M, dtype=S.dtype, device=S.device).masked_fill_(~src, inf)
    pred = torch.full((a, M), -1, dtype=torch.long, device=S.device)
    tol = _tol(S)
    for _ in range(M - 1):                                            # Bellman–Ford, Jacobi sweeps
        best, arg = (dist.unsqueeze(2) + Ckj).min(1)
        imp = best < dist - tol
        if not bool(imp.any()):
            break
        dist = torch.where(imp, best, dist)
        pred = torch.where(imp, arg, pred)
    dmin, cur = dist.masked_fill(~dst, inf).min(1)
    if not bool(torch.isfinite(dmin).all()):
        raise RuntimeError("expander N:M repair found no augmenting path (internal error: B ≤ N guarantees one)")
    deg[ar, cur] += 1
    for _ in range(M):                                                # trace back and apply the swaps
        p = pred[ar, cur]
        alive = p >= 0
        if not bool(alive.any()):
            break
        pa, ca, aa = p[alive], cur[alive], ar[alive]
        r = R[aa, pa, ca]
        x[aa, r, pa] = False
        x[aa, r, ca] = True
        cur = torch.where(alive, p, cur)
    deg[ar, cur] -= 1                                                 # the path's root: an excess column


def _augment_greedy(S: torch.Tensor, x: torch.Tensor, deg: torch.Tensor, B: int) -> torch.Tensor:
    """Cheapest single swap excess → deficit column per tile; returns the tiles that had none."""
    a, M, _ = S.shape
    Ckj, R = _swap_costs(S, x)
    pair_ok = (deg > B).unsqueeze(2) & (deg < B).unsqueeze(1)
    val, flat = Ckj.masked_fill(~pair_ok, float("inf")).reshape(a, -1).min(1)
    ok = torch.isfinite(val)
    k, j = (flat // M)[ok], (flat % M)[ok]
    aa = torch.arange(a, device=S.device)[ok]
    r = R[aa, k, j]
    x[aa, r, k] = False
    x[aa, r, j] = True
    deg[aa, k] -= 1
    deg[aa, j] += 1
    return ~ok


def _degrees(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int32).sum(1, dtype=torch.int32)


def _repair(S: torch.Tensor, x: torch.Tensor, N: int, B: int, exact: bool = True,
            deg: Optional[torch.Tensor] = None) -> dict:
    """Repair every tile of ``x`` (the top-N start) whose columns fall below B. In place; returns stats.

    Works in the scores' dtype (ties closer than ~4·M·eps·max|S| may be broken either way).
    """
    T, M, _ = S.shape
    deg = _degrees(x) if deg is None else deg
    deficit = (B - deg).clamp_min(0).sum(1)
    active = torch.nonzero(deficit > 0).squeeze(1)
    stats = {"tiles_repaired": int(active.numel()), "deficit_units": int(deficit.sum()), "rounds": 0,
             "greedy_fallback_tiles": 0}
    if not active.numel():
        return stats
    Sa, xa, da = S[active], x[active], deg[active]
    live = torch.arange(active.numel(), device=S.device)
    max_rounds = (M - N) * B + 1
    fallback = torch.zeros(active.numel(), dtype=torch.bool, device=S.device)
    while live.numel():
        if stats["rounds"] >= max_rounds:
            raise RuntimeError(f"expander N:M repair did not finish in {max_rounds} rounds (internal error)")
        stats["rounds"] += 1
        for s, e in _chunks(live.numel(), M ** 3 * S.element_size() * 3):
            idx = live[s:e]
            Sc, xc, dc = Sa[idx], xa[idx], da[idx]
            if exact:
                _augment_exact(Sc, xc, dc, B)
            else:
                stuck = _augment_greedy(Sc, xc, dc, B)
                if bool(stuck.any()):  # no single swap: solve those tiles exactly from their top-N start
                    st = idx[stuck]
                    fallback[st] = True
                    xs = _topn(Sa[st], N)
                    _repair(Sa[st], xs, N, B, exact=True)
                    xc[stuck] = xs
                    dc[stuck] = _degrees(xs)
            xa[idx], da[idx] = xc, dc
        live = live[(da[live] < B).any(1)]
    stats["greedy_fallback_tiles"] = int(fallback.sum())
    x[active] = xa
    return stats


def solve_tiles(S: torch.Tensor, N: int, M: int, B: int, algorithm: str = "auto") -> tuple[torch.Tensor, dict]:
    """Optimal (or, for ``greedy``, heuristic) masks of a batch of tiles ``S`` (T, M, M). Returns (x, stats)."""
    _check_args(N, M, B)
    if S.dim() != 3 or S.shape[1] != M or S.shape[2] != M:
        raise PatternError(f"tiles must have shape (T, {M}, {M}), got {tuple(S.shape)}")
    if not bool(torch.isfinite(S).all()):
        raise NumericalError("expander N:M scores contain NaN/Inf")
    alg = (algorithm or "auto").lower()
    if alg not in ALGORITHMS:
        raise ValueError(f"unknown expander N:M algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if alg == "auto":  # measured (benchmarks/solvers/bench_eggs.py): enumeration wins when the tile has few masks
        masks = _feasible_tile_masks_cpu(int(N), int(M), int(B))
        alg = "enum" if masks is not None and masks.shape[0] <= ENUM_AUTO_MAX_MASKS else "ssp"
    stats = {"algorithm": alg, "tiles": int(S.shape[0]), "exact": alg != "greedy"}
    if alg == "enum":
        x = _enum(S, N, M, B)
    else:
        x, deg = _topn(S, N, with_degrees=True)
        if B > 0:
            stats.update(_repair(S, x, N, B, exact=(alg == "ssp"), deg=deg))
    deg = x.sum(1)
    if not (bool((x.sum(2) == N).all()) and bool((deg >= B).all())):
        raise RuntimeError("expander N:M solver produced an infeasible mask (internal error)")
    return x, stats


def expander_nm_mask(scores: torch.Tensor, N: int, M: int, B: int, *, algorithm: str = "auto",
                     return_stats: bool = False, num_threads: Optional[int] = None):
    """The feasible expander N:M mask of largest total score of a (m, n) score matrix (m, n divisible by M).

    ``num_threads``: torch CPU threads while solving (restored afterwards); default 1 for CPU tensors — the
    batched ops are many medium-sized element-wise kernels where thread synchronisation dominates: on the
    shared 2-core machine one thread was 1.5–3.5× faster than two (1536×576: 0.10 s vs 0.36 s; 4096²: 1.3 s
    vs 2.0–2.5 s, 2:4 B=1).
    """
    if scores.dim() != 2:
        raise PatternError(f"a weight matrix is 2-D, got shape {tuple(scores.shape)}")
    _check_args(N, M, B, scores.shape)
    m, n = scores.shape
    want = num_threads if num_threads is not None else (1 if scores.device.type == "cpu" else None)
    with torch_threads(want):
        x, stats = solve_tiles(tile_view(scores, M), N, M, B, algorithm)
        mask = untile(x, m, n)
    return (mask, stats) if return_stats else mask


register_projection("expander_nm", lambda scores, N, M, B: expander_nm_mask(scores, N, M, B))


# --------------------------------------------------------------------------------------------- method
def _work_dtype(problem: LayerProblem) -> torch.dtype:
    return torch.float64 if problem.H.dtype == torch.float64 else torch.float32


def eggs_scores(problem: LayerProblem, score: str = "ria", a: float = 0.5) -> torch.Tensor:
    s = (score or "ria").lower()
    if s == "ria":
        return ria_scores(problem, a)
    if s == "wanda":
        return wanda_scores(problem)
    if s == "magnitude":
        return problem.W0.to(_work_dtype(problem)).abs()
    raise ValueError(f"eggs: unknown score {score!r}; choose ria, wanda or magnitude")


def as_expander(pattern: Pattern, min_degree: Optional[int] = None) -> ExpanderNM:
    """An expander N:M pattern: itself, or a plain N:M with ``B = min_degree`` (default 1)."""
    if isinstance(pattern, ExpanderNM):
        return pattern
    if isinstance(pattern, NM):
        return ExpanderNM(pattern.N, pattern.M, 1 if min_degree is None else int(min_degree))
    raise PatternError(f"method 'eggs' needs an N:M pattern such as 2:4 (optionally with --min-degree), "
                       f"got {pattern.name}")


def _program(problem, pattern, *, score="ria", a=0.5, min_degree=None, **_):
    return mask_program(eggs_scores(problem, score, a), as_expander(pattern, min_degree))


@register_method("eggs", needs="diag", patterns=("expander", "nm"), program=_program,
                 description="EGGS-PTP: RIA scores, N:M mask with ≥ B kept per column in every M×M tile "
                             "(exact transportation problem per tile), optional least-squares refit",
                 options={"score": "ria | wanda | magnitude", "a": "RIA exponent of the input norm",
                          "min_degree": "B for a plain N:M pattern (default 1)", "refit": "least-squares refit",
                          "algorithm": "tile solver: auto | ssp | enum | greedy", "graph": "record graph metrics"})
def eggs(problem: LayerProblem, pattern: Pattern, *, score: str = "ria", a: float = 0.5,
         min_degree: Optional[int] = None, refit: bool = False, algorithm: str = "auto", graph: bool = True
         ) -> LayerResult:
    pat = as_expander(pattern, min_degree)
    pat.validate(problem.shape)
    with Timer() as t:
        S = eggs_scores(problem, score, a)
        with Timer() as tm:
            mask, stats = expander_nm_mask(S, pat.N, pat.M, pat.B, algorithm=algorithm, return_stats=True)
        W = problem.W0.to(S.dtype) * mask
    if not bool(torch.isfinite(W).all()):
        raise NumericalError(f"layer {problem.name!r}: the pruned weights contain NaN/Inf")
    kept = float((S.to(torch.float64) * mask).sum())
    kept_nm = float((S.to(torch.float64) * NM(pat.N, pat.M).project(S)).sum())
    info = {"method": "eggs", "score": score, "N": pat.N, "M": pat.M, "min_degree": pat.B,
            "time_s": t.elapsed, "mask_time_s": tm.elapsed, "score_kept": kept, "score_kept_nm": kept_nm,
            "score_loss_rel": (kept_nm - kept) / kept_nm if kept_nm > 0 else 0.0,
            "error": problem.objective(W), "sparsity": 1.0 - float(mask.float().mean())}
    info.update({f"solver_{k}": v for k, v in stats.items()})
    res = LayerResult(W=W.to(problem.W0.dtype), mask=mask, info=info)
    if refit:
        res = refit_result(problem, res)
        res.info["error_mask_only"] = res.info["error_before_refit"]
        res.info["time_s"] = res.info["time_s"] + res.info["refit_time_s"]
    if graph:
        from .graph_metrics import graph_metrics
        with Timer() as tg:
            res.info["graph"] = graph_metrics(res.mask, M=pat.M)
        res.info["graph_time_s"] = tg.elapsed
    return res
