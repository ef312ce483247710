"""EGGS-PTP (docs/methods.md §5): N:M masks that stay expander graphs — the production torch solver.

**The mask problem** [reconstructed], solved independently per tile of M output rows × M input columns::

    max_{x ∈ {0,1}^{M×M}}  Σ_ij S_ij x_ij   s.t.  Σ_j x_ij = N  (every row keeps exactly N of its M)
                                               Σ_i x_ij ≥ B  (every column keeps at least B),  B ≤ N

It is a transportation problem (rows supply N, columns demand ≥ B): the constraint matrix is totally
unimodular, so the LP relaxation is integral and min-cost flow solves it exactly (the ``flow`` backend, ``solvers/backends/flow.py``).
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

**Mask for the layer objective** (``mask=error``, still mask-only): :func:`mask_search` starts from the
score-driven mask and minimises ``f(W0 ⊙ mask)`` over expander masks (the program ``mask_only_program``) by exact
block-coordinate descent over the column groups — per group, every tile takes its best feasible tile mask given
the other groups (row costs from ``∇f`` and the group's block of Ĥ; the feasible tile masks enumerated by one
matmul where they are few). Never increases f, never leaves the expander set; a heuristic of the MIQP, whose
gap ``optprune verify`` measures against Gurobi/SCIP.

**Method** ``eggs``: score = RIA (default; ``score=wanda|magnitude``), expander N:M mask, weights kept
(``W0 ⊙ mask``) or least-squares refitted on the mask (``refit=True``; ``info`` carries the error before and
after). With a plain N:M pattern, ``B = min_degree`` (default 1). ``info['graph']`` holds the layer's graph
metrics (degrees, components, spectral gap vs the Ramanujan bound; :mod:`.graph_metrics`).

**Weight update** (``update=``; method ``eggs_update`` = ``update=admm``, which needs the Gram matrices):
``obs`` chooses the expander mask *inside* SparseGPT's OBS column sweep — at each group of M columns the scores
``w²/[H⁻¹]²`` of the already-updated weights are projected on the expander set tile by tile, and the pruned
weights' error is propagated to the remaining columns; ``admm`` then runs the ADMM L0 solver (:mod:`.admm`) with
the expander projection as its D-step, warm-started from the obs result (the mask-only point, refitted by PCG,
stays a candidate). Every mask stays expander-feasible; the L0 program over expander masks is the declared model.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Optional

import torch

from ...formulations.patterns import NM, ExpanderNM, Pattern, PatternError, register_projection
from ...formulations.problem import LayerProblem, NumericalError
from ...formulations.programs import l0_program, mask_only_program, mask_program
from ..base import LayerResult, Timer, torch_threads
from ..registry import Option, register_method
from .baselines import SparseGPT, refit_result, ria_scores, wanda_scores

__all__ = ["expander_nm_mask", "solve_tiles", "feasible_tile_masks", "tile_view", "untile", "tile_objective",
           "eggs", "eggs_update", "eggs_scores", "as_expander", "mask_search", "ALGORITHMS", "UPDATES", "MASKS"]

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


# --------------------------------------------------------------------------------------------- mask search
SEARCH_MAX_ROW_PATTERNS = 1024     # mask='error' enumerates the C(M,N) row patterns of a group


@functools.lru_cache(maxsize=32)
def _row_patterns(N: int, M: int) -> torch.Tensor:
    """All C(M,N) row patterns of one group of M columns, (P, M) bool."""
    pats = list(itertools.combinations(range(M), N))
    P = torch.zeros(len(pats), M, dtype=torch.bool)
    for p, cols in enumerate(pats):
        P[p, list(cols)] = True
    return P


@functools.lru_cache(maxsize=32)
def _tile_selector(N: int, M: int, B: int) -> Optional[torch.Tensor]:
    """``(M·P, K)`` 0/1 matrix: column k sums, over the M rows of a tile, the cost of the row pattern that the
    k-th feasible tile mask gives each row — so ``cost (T, M·P) @ A`` is every feasible tile mask's cost.
    None when the tile masks are too many to enumerate (then rows are chosen one at a time)."""
    masks = _feasible_tile_masks_cpu(N, M, B)
    if masks is None or masks.shape[0] > ENUM_MAX_COMBOS // 10:
        return None
    P = _row_patterns(N, M)
    code = (P.long() << torch.arange(M)).sum(1)                      # pattern → bit code
    lookup = torch.full((1 << M,), -1, dtype=torch.long)
    lookup[code] = torch.arange(P.shape[0])
    idx = lookup[(masks.long() << torch.arange(M)).sum(2)]           # (K, M rows) pattern index per row
    K, Pc = masks.shape[0], P.shape[0]
    A = torch.zeros(M * Pc, K, dtype=torch.float64)
    A[(torch.arange(M) * Pc).unsqueeze(0) + idx, torch.arange(K).unsqueeze(1)] = 1.0
    return A


def _best_tile_masks(cost: torch.Tensor, cur: torch.Tensor, P: torch.Tensor, A: Optional[torch.Tensor], tiles,
                     B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For one group of M columns: the new (m × M) mask and each tile's change of f, given every row's cost of
    every row pattern (m × P). With the tile selector ``A``: each row's best pattern, and the best of all feasible
    tile masks for the tiles that leaves short of B; without it: each row of a tile in turn takes its best
    pattern that keeps every column at ≥ B."""
    m, Pc = cost.shape
    M = P.shape[1]
    T = m // M
    if A is not None:
        v, j = cost.min(1)                  # each row's best pattern; tiles left short enumerate
        new = P[j]
        best = v.reshape(T, M).sum(1)
        short = (new.reshape(T, M, M).sum(1, dtype=torch.int32) < B).any(1)
        if bool(short.any()):
            si = torch.nonzero(short).squeeze(1)
            bb, k = (cost.reshape(T, M * Pc)[si] @ A).min(1)
            best[si] = bb
            new = new.reshape(T, M, M)
            new[si] = P[tiles[k]]
            new = new.reshape(m, M)
        return new, best
    xt = cur.reshape(T, M, M).clone()
    best = torch.zeros(T, dtype=cost.dtype, device=cost.device)
    ct = cost.reshape(T, M, Pc)
    for i in range(M):
        other = xt.sum(1, dtype=torch.int32) - xt[:, i].to(torch.int32)  # (T, M columns)
        ok = ((other.unsqueeze(1) + P.unsqueeze(0).to(torch.int32)) >= B).all(2)
        v, j = ct[:, i].masked_fill(~ok, float("inf")).min(1)
        xt[:, i] = P[j]
        best = best + v
    return xt.reshape(m, M), best


def _check_search(pattern: ExpanderNM, mask: torch.Tensor, sweeps: int, rtol: float) -> None:
    pattern.validate(tuple(mask.shape))
    N, M = pattern.N, pattern.M
    Pc = math.comb(M, N)
    if Pc > SEARCH_MAX_ROW_PATTERNS:
        raise PatternError(f"eggs mask='error' enumerates the C(M,N) row patterns of a group; {N}:{M} has {Pc} "
                           f"(limit {SEARCH_MAX_ROW_PATTERNS}); use mask='score'")
    if int(sweeps) < 0 or not rtol >= 0:
        raise ValueError(f"eggs: sweeps must be ≥ 0 and rtol ≥ 0, got sweeps={sweeps}, rtol={rtol}")


def mask_search(problem: LayerProblem, pattern: ExpanderNM, mask: torch.Tensor, *, sweeps: int = 5,
                rtol: float = 1e-3, blocksize: int = 128) -> tuple[torch.Tensor, dict]:
    """Improve an expander N:M mask for the **mask-only** objective ``f(W0 ⊙ mask)`` (kept weights unchanged;
    the program ``mask_only_program``) by exact block-coordinate descent over the column groups.

    One step takes the M columns of one group and, for every tile of M rows at once, the best feasible tile
    mask given every other group: row i's cost of row pattern p is ``δᵀg_i + ½ δᵀ Ĥ_gg δ`` with ``δ`` the
    change of its weights on the group (``W0 ⊙ (p − current)``) and ``g = ∇f`` — exact, since f is quadratic.
    Tiles whose rows' best patterns keep every column at ≥ B take them; the others get the best of all feasible
    tile masks (one matmul with :func:`_tile_selector`), or, when those are too many to enumerate, each row of
    the tile in turn takes its best pattern that keeps every column at ≥ B. A step never increases f and never
    leaves the expander set. ``∇f`` is updated lazily, as in SparseGPT: inside a block of ``blocksize``
    columns by rank-M updates of the block's columns, then once per block for the rest (changed rows only).
    Stops after ``sweeps`` sweeps or when a sweep lowers f by less than ``rtol``·f. Runs in float64 on the
    problem's device. Returns ``(mask, stats)``.
    """
    N, M, B = pattern.N, pattern.M, pattern.B
    _check_search(pattern, mask, sweeps, rtol)
    dt, dev = torch.float64, problem.W0.device
    problem = problem if problem.H.dtype == dt else problem.to(dt)
    W0, Hh = problem.W0.to(dt), problem.Hh.to(dt)
    x = mask.to(torch.bool).clone()
    m, n = x.shape
    T = m // M
    bs = max(M, (int(blocksize) // M) * M)
    P = _row_patterns(N, M).to(dev)
    Pf = P.to(dt)
    A = _tile_selector(N, M, B)
    A = None if A is None else A.to(dev)
    tiles = None if A is None else _tile_rows(N, M, B, dev)
    f_start = problem.objective(W0 * x)
    f = f_start
    tol = 1e-13 * max(abs(problem.constant()), 1e-300)
    stats = {"sweeps": 0, "moves": 0, "error_start": f_start}
    G = problem.gradient(W0 * x) if int(sweeps) else None
    for _ in range(int(sweeps)):
        moves, dec = 0, 0.0
        for b0 in range(0, n, bs):
            b1 = min(n, b0 + bs)
            Gb = G[:, b0:b1].clone()
            D = torch.zeros(m, b1 - b0, dtype=dt, device=dev)
            for c in range(b0, b1, M):
                lc = c - b0
                w = W0[:, c:c + M]
                cur = x[:, c:c + M]
                curf = cur.to(dt)
                delta = w.unsqueeze(1) * (Pf.unsqueeze(0) - curf.unsqueeze(1))         # (m, P, M)
                cost = (delta * Gb[:, lc:lc + M].unsqueeze(1)).sum(2) \
                    + 0.5 * ((delta @ Hh[c:c + M, c:c + M]) * delta).sum(2)              # (m, P)
                new, best = _best_tile_masks(cost, cur, P, A, tiles, B)
                good = best < -tol                                                        # tiles that improve
                if not bool(good.any()):
                    continue
                rows = torch.nonzero(good.repeat_interleave(M)).squeeze(1)
                d = w[rows] * (new[rows].to(dt) - curf[rows])
                moves += int((new[rows] != cur[rows]).any(1).sum())
                dec -= float(best[good].sum())
                x[rows, c:c + M] = new[rows]
                D[rows, lc:lc + M] = d
                Gb[rows] += d @ Hh[c:c + M, b0:b1]
            changed = torch.nonzero(D.any(1)).squeeze(1)
            if changed.numel():
                G[changed] += D[changed] @ Hh[b0:b1]
        stats["sweeps"] += 1
        stats["moves"] += moves
        f -= dec
        if moves == 0 or dec <= rtol * max(f, 1e-300):
            break
    f_end = problem.objective(W0 * x)
    if f_end > f_start * (1 + 1e-9) + tol:  # exact steps cannot increase f
        raise RuntimeError(f"eggs mask search increased the objective ({f_start:.6g} → {f_end:.6g}; internal error)")
    stats["error_end"] = f_end
    if not pattern.is_feasible(x):
        raise RuntimeError("eggs mask search left the expander set (internal error)")
    return x, stats


@functools.lru_cache(maxsize=32)
def _tile_rows_cpu(N: int, M: int, B: int) -> torch.Tensor:
    A = _tile_selector(N, M, B)
    Pc = math.comb(M, N)
    return torch.nonzero(A.T)[:, 1].reshape(A.shape[1], M) - (torch.arange(M) * Pc)  # (K, M) pattern index


def _tile_rows(N: int, M: int, B: int, device) -> torch.Tensor:
    return _tile_rows_cpu(N, M, B).to(device)


# --------------------------------------------------------------------------------------------- method
def _work_dtype(problem: LayerProblem) -> torch.dtype:
    return torch.float64 if problem.H.dtype == torch.float64 else torch.float32


SCORES = ("ria", "wanda", "magnitude")


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


UPDATES = ("none", "refit", "obs", "admm")


MASKS = ("score", "error")


def _program(problem, pattern, *, score="ria", a=0.5, min_degree=None, update="none", mask="score", **_):
    if str(update).strip().lower() != "none":  # weights updated: the L0 program over expander masks
        return l0_program(problem, as_expander(pattern, min_degree))
    if str(mask).strip().lower() == "error":  # kept weights fixed, mask chosen for the layer objective
        return mask_only_program(problem, as_expander(pattern, min_degree))
    return mask_program(eggs_scores(problem, score, a), as_expander(pattern, min_degree))


def _needs(options: dict) -> str:
    """Statistics by options: the Gram matrices for a weight update or the error-driven mask, else ‖X_j‖."""
    up = str(options.get("update") or "none").strip().lower()
    full = up in ("obs", "admm") or str(options.get("mask") or "score").strip().lower() == "error"
    return "gram" if full else "diag"


class _ExpanderOBS(SparseGPT):
    """SparseGPT's OBS sweep with the N:M choice of each M-column group made under the expander constraint
    (``ExpanderNM.project`` of the OBS scores ``w²/[H⁻¹]²`` on the updated weights, tile by tile)."""

    def __init__(self, problem: LayerProblem, pattern: ExpanderNM, **kw):
        super().__init__(problem, NM(pattern.N, pattern.M), **kw)
        self.pattern = pattern


def _eggs_update(problem: LayerProblem, pat: ExpanderNM, update: str, mask_only: LayerResult,
                 admm_options: Optional[dict]) -> LayerResult:
    """Weights (and, for obs/admm, the mask) chosen with a weight update, under the expander constraint."""
    if update == "refit":
        res = refit_result(problem, mask_only)
        return LayerResult(res.W, res.mask, {"error": res.info["error"], "update": "refit"})
    obs = _ExpanderOBS(problem, pat).run()
    obs.info["update"] = "obs"
    if update == "obs":
        return obs
    from .admm import admm
    # warm start: the OBS point; the mask-only point stays a candidate (as it is and PCG-refitted)
    res = admm(problem, pat, **{**(admm_options or {}), "warm_start": obs, "candidates": [mask_only]})
    res.info["update"] = "admm"
    return res


_OPTIONS = {"score": Option("score", help="ria | wanda | magnitude", choices=SCORES),
            "mask": Option("mask", help="score (largest total score) | error (then improved for the "
                           "layer objective with the kept weights fixed: exact block-coordinate "
                           "descent; needs the Grams)", choices=MASKS),
            "a": Option(help="RIA exponent of the input norm", range="[0, inf)"),
            "sweeps": Option(help="mask=error: at most this many sweeps over the column groups", range="[0, inf)"),
            "min_degree": Option(help="B for a plain N:M pattern (default 1)", range="[0, inf)"), "refit": "least-squares refit",
            "algorithm": Option("algorithm", help="tile solver: auto | ssp | enum | greedy",
                                choices=ALGORITHMS), "graph": "record graph metrics",
            "update": Option("update", help="weight update: none (mask only) | refit | obs (mask "
                             "inside the OBS sweep) | admm", choices=UPDATES),
            "admm_options": "options of the admm method for update=admm"}


@register_method("eggs", needs="diag", needs_for=_needs, patterns=("expander", "nm"), program=_program,
                 verify_options=({"mask": "score"}, {"mask": "error"}),
                 description="EGGS-PTP: RIA scores, N:M mask with ≥ B kept per column in every M×M tile "
                             "(exact transportation problem per tile); mask=score|error; update=none|refit|obs|admm",
                 options=_OPTIONS)
def eggs(problem: LayerProblem, pattern: Pattern, *, score: str = "ria", a: float = 0.5,
         min_degree: Optional[int] = None, refit: bool = False, algorithm: str = "auto", graph: bool = True,
         update: str = "none", admm_options: Optional[dict] = None, mask: str = "score",
         sweeps: int = 5) -> LayerResult:
    """``update``: ``none`` (mask only, W0 kept), ``refit`` (= ``refit=True``), ``obs`` (the expander mask chosen
    inside SparseGPT's OBS sweep, group by group, on the updated weights), ``admm`` (ADMM on the L0 program over
    expander masks, warm-started from obs, the PCG-refitted mask-only point a candidate; ``admm_options`` go to
    the admm method). ``mask``: ``score`` (the feasible mask of largest total score) or ``error`` (that mask
    improved for ``f(W0 ⊙ mask)`` by :func:`mask_search`, at most ``sweeps`` sweeps). With ``mask=error`` or an
    obs/admm update the method needs the Gram matrices; it declares them from its options (``needs_for``), so
    the pipeline collects them."""
    up = str(update or "none").strip().lower()
    if up not in UPDATES:
        raise ValueError(f"eggs: unknown update {update!r}; choose one of {', '.join(UPDATES)}")
    if up == "refit":
        up, refit = "none", True
    how = str(mask or "score").strip().lower()
    if how not in MASKS:
        raise ValueError(f"eggs: unknown mask {mask!r}; choose one of {', '.join(MASKS)}")
    pat = as_expander(pattern, min_degree)
    pat.validate(problem.shape)
    if (up != "none" or how == "error") and problem.n > 1 and \
            not bool((problem.Hh - torch.diag(problem.Hh.diagonal())).any()):
        raise ValueError(f"eggs: {'update=' + up if up != 'none' else 'mask=error'} needs the full Gram matrix, "
                         "but the layer problem holds only its diagonal (a pipeline collects it when the method "
                         "declares it: 'eggs_update', or 'eggs' with these options)")
    search = None
    with Timer() as t:
        S = eggs_scores(problem, score, a)
        with Timer() as tm:
            mask, stats = expander_nm_mask(S, pat.N, pat.M, pat.B, algorithm=algorithm, return_stats=True)
            if how == "error":
                mask, search = mask_search(problem, pat, mask, sweeps=sweeps)
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
    info["mask"] = how
    if search is not None:
        info.update({f"search_{k}": v for k, v in search.items()})
    res = LayerResult(W=W.to(problem.W0.dtype), mask=mask, info=info)
    if refit:
        res = refit_result(problem, res)
        res.info["error_mask_only"] = res.info["error_before_refit"]
        res.info["time_s"] = res.info["time_s"] + res.info["refit_time_s"]
    if up != "none":
        with Timer() as tu:
            upd = _eggs_update(problem, pat, up, res, admm_options)
        if not pat.is_feasible(upd.mask):
            raise RuntimeError("eggs: the weight update left the expander set (internal error)")
        info = dict(res.info)
        info.update(error_mask_only=res.info.get("error_mask_only", res.info["error"]), update=up,
                    error=upd.info.get("error", problem.objective(upd.W)), update_time_s=tu.elapsed,
                    update_info={k: v for k, v in upd.info.items() if k in ("chosen", "iterations", "stop",
                                                                           "warm_error", "error_admm")})
        info["time_s"] = info["time_s"] + tu.elapsed
        res = LayerResult(W=upd.W.to(problem.W0.dtype), mask=upd.mask, info=info)
    if graph:
        from .graph_metrics import graph_metrics
        with Timer() as tg:
            res.info["graph"] = graph_metrics(res.mask, M=pat.M)
        res.info["graph_time_s"] = tg.elapsed
    return res


@register_method("eggs_update", needs="gram", patterns=("expander", "nm"),
                 program=lambda problem, pattern, min_degree=None, **_: l0_program(problem,
                                                                                  as_expander(pattern, min_degree)),
                 description="EGGS with a weight update: expander N:M mask chosen inside an OBS sweep, then ADMM "
                             "on the L0 program over expander masks (eggs -O update=admm)",
                 options_from="eggs", options=_OPTIONS, defaults={"update": "admm"})
def eggs_update(problem: LayerProblem, pattern: Pattern, *, update: str = "admm", **options) -> LayerResult:
    if str(update).strip().lower() == "none":
        raise ValueError("eggs_update: update=none is the mask-only method 'eggs'; choose refit, obs or admm")
    return eggs(problem, pattern, update=update, **options)
