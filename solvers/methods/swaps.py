"""Swap search: polish any method's mask by exact 1-swaps until no swap improves (docs/methods.md §9).

**The objective certified** is the L0 program's own: the value of a mask is the layer error after the *exact
least-squares refit* of its kept weights, row by row::

    F(S) = min_{supp W ⊆ S} f(W) = Σ_i [ c_i − ½ b_{i,S_i} (Ĥ_{S_i S_i})⁻¹ b_{i,S_i}ᵀ ],   b = W0 C,  c_i = f_i(0)

(with ``Ĥ`` replaced by ``Ĥ + ε·mean(diag Ĥ)·I``, ε = ``ridge`` = 1e-9 by default, so that every kept set is
invertible; ε shifts values by a relative ~1e-9). Rows are independent once each row's kept set is fixed.

**Exact swap values.** For one row with kept set S, let ``G = (Ĥ_SS)⁻¹``, ``w = b_S G`` (the refitted kept
weights), ``U = G Ĥ_{S,:}`` (regression of every column on the kept ones), ``g = b − w Ĥ_{S,:}`` (minus the
gradient; 0 on S) and ``s_q = Ĥ_qq − Ĥ_{qS} U_{:,q}`` (Schur complement of adding q). Removing p ∈ S costs
``½ w_p² / G_pp`` (OBS); after it, column q's gradient and Schur complement are ``g_q + w_p U_pq / G_pp`` and
``s_q + U_pq² / G_pp``, and adding q gains ``½ (new g_q)² / (new s_q)``. So the change of swapping p out and
q in is, exactly,

    Δ(p, q) = ½ w_p²/G_pp − ½ (g_q + w_p U_pq/G_pp)² / (s_q + U_pq²/G_pp),

for all (p, q) at once from (G, U, w, g, s): an elementwise (rows × k × candidates) tensor. A swap updates
(G, U, w, g, s) by one rank-1 downdate and one rank-1 update, O(k·n) per row; the state is rebuilt from a
fresh factorisation every ``refresh`` swaps and always before the final check.

**Moves.** A swap keeps the pattern feasible: per-row and per-matrix unstructured swap within a row (any
pruned column); N:M and expander N:M within the N:M group of the removed weight; expander N:M only removes a
weight whose tile column keeps more than B (conflicting swaps of one tile in one round are accepted greedily
in order of gain). Per-matrix unstructured adds **moves between rows** (remove p from row i, add q to row
i' ≠ i; exact because the rows are independent: Δ = removal cost of row i − addition gain of row i'), each
row taking part in at most one move per round. A start mask that keeps fewer weights than the pattern allows
is first filled up (additions never increase F).

**What is returned.** The mask, certified **1-swap locally optimal** for F — the last check, on a freshly
factorised state, found no feasible swap (nor, per matrix, move) improving F by more than ``tol``·f_i(0) —
unless ``max_swaps`` stopped it first (``certified: False``); the number of improving swaps and moves; and
the exact least-squares refit of the kept weights on the final mask. All rows of a chunk search at once (one
swap per row per iteration), in float64 by default.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ...formulations.patterns import NM, ExpanderNM, Pattern, PatternError, Unstructured
from ...formulations.problem import LayerProblem, NumericalError
from ...formulations.programs import l0_program
from ..base import LayerResult, Timer, torch_threads
from ..registry import get_method, register_method

__all__ = ["swap_search", "polish", "SwapState", "swap_values"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def swap_values(G: torch.Tensor, U: torch.Tensor, w: torch.Tensor, g: torch.Tensor, s: torch.Tensor):
    """``Δ(p, q)`` for every kept slot p and every column q of each row (module docstring): (c, K, n) from
    ``G`` (c, K, K), ``U`` (c, K, n), ``w`` (c, K), ``g`` (c, n), ``s`` (c, n). Entries for q ∈ S or a padding
    slot are meaningless and must be masked by the caller."""
    Gd = G.diagonal(dim1=1, dim2=2).clamp_min(1e-300).unsqueeze(2)
    t = U / Gd                                                  # U_pq / G_pp
    den = torch.addcmul(s.unsqueeze(1), U, t).clamp_min_(1e-300)  # s_q + U_pq² / G_pp
    num = t.mul_(w.unsqueeze(2)).add_(g.unsqueeze(1))           # g_q + w_p U_pq / G_pp (in t's memory)
    return num.square_().div_(den).mul_(-0.5).add_(0.5 * w.pow(2).unsqueeze(2) / Gd)


class SwapState:
    """The swap-search state of a chunk of rows with kept sets of at most K columns (padding slots point at a
    dummy column n: unit rows of G, zero rows of U), built from a fresh batched Cholesky factorisation."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor):
        self.A, self.n = A, A.shape[0]
        n = self.n
        dt, dev = A.dtype, A.device
        c = mask.shape[0]
        cnt = mask.sum(1)
        K = max(int(cnt.max()) if c else 0, 1)
        # kept columns first (in column order), then padding slots pointing at column n
        key = torch.where(mask, torch.arange(n, device=dev).expand(c, n), torch.full((c, n), n, device=dev))
        idx = key.sort(1).values[:, :K]
        self.mask = mask.clone()
        self.idx = idx
        Aext = torch.zeros(n + 1, n + 1, dtype=dt, device=dev)
        Aext[:n, :n] = A
        self.Hs_rows = Aext[idx][:, :, :n]                               # (c, K, n) Ĥ_{S,:}; 0 on padding
        Hss = Aext[idx.unsqueeze(2), idx.unsqueeze(1)]                   # (c, K, K)
        pad = idx >= n
        Hss = Hss.masked_fill(pad.unsqueeze(2) | pad.unsqueeze(1), 0.0) + torch.diag_embed(pad.to(dt))
        L, info = torch.linalg.cholesky_ex(Hss)
        if int(info.max()) != 0:
            raise NumericalError("swap search: a kept set's Gram is not positive definite (raise ridge)")
        eye = torch.eye(K, dtype=dt, device=dev).expand(c, K, K)
        self.G = torch.cholesky_solve(eye, L)
        self.U = self.G @ self.Hs_rows
        Bext = torch.cat([B, torch.zeros(c, 1, dtype=dt, device=dev)], 1)
        bS = Bext.gather(1, idx)
        self.w = (self.G @ bS.unsqueeze(2)).squeeze(2)
        self.b = B
        self.g = B - (self.w.unsqueeze(1) @ self.Hs_rows).squeeze(1)
        self.s = A.diagonal().unsqueeze(0) - (self.Hs_rows * self.U).sum(1)
        self.bS = bS

    @property
    def real(self) -> torch.Tensor:
        return self.idx < self.n

    def row_values(self, const: torch.Tensor) -> torch.Tensor:
        """F_i = c_i − ½ w·b_S per row (the refitted row errors)."""
        return const - 0.5 * (self.w * self.bS).sum(1)

    def removal_costs(self) -> torch.Tensor:
        """½ w_p²/G_pp per slot (+inf on padding)."""
        Gd = self.G.diagonal(dim1=1, dim2=2).clamp_min(1e-300)
        r = 0.5 * self.w.pow(2) / Gd
        return torch.where(self.real, r, torch.full_like(r, float("inf")))

    def addition_gains(self) -> torch.Tensor:
        """½ g_q²/s_q per column (−inf on kept columns)."""
        a = 0.5 * self.g.pow(2) / self.s.clamp_min(1e-300)
        return torch.where(self.mask, torch.full_like(a, -float("inf")), a)

    def apply(self, rows: torch.Tensor, slots: torch.Tensor, cols: torch.Tensor) -> None:
        """Swap the kept column in ``slots`` out and column ``cols`` in, for the chunk rows ``rows`` (distinct)."""
        ar = torch.arange(rows.numel(), device=rows.device)
        G, U, w, g, s = self.G[rows], self.U[rows], self.w[rows], self.g[rows], self.s[rows]
        Hr = self.Hs_rows[rows]
        # remove slot p: rank-1 downdate
        Gp = G[ar, :, slots]                                              # (a, K)
        gpp = Gp[ar, slots].unsqueeze(1)
        Up = U[ar, slots]                                                 # (a, n)
        wp = w[ar, slots].unsqueeze(1)
        U = U - (Gp / gpp).unsqueeze(2) * Up.unsqueeze(1)
        G = G - Gp.unsqueeze(2) * (Gp / gpp).unsqueeze(1)
        w = w - wp * Gp / gpp
        g = g + (wp / gpp) * Up
        s = s + Up.pow(2) / gpp
        G[ar, slots, :] = 0.0
        G[ar, :, slots] = 0.0
        U[ar, slots] = 0.0
        w[ar, slots] = 0.0
        Hr[ar, slots] = 0.0
        # add column q into the freed slot: rank-1 update
        u = U[ar, :, cols]                                                # (a, K)
        sq = s[ar, cols].clamp_min(1e-300).unsqueeze(1)
        gq = g[ar, cols].unsqueeze(1)
        hq = self.A[cols]                                                 # (a, n)
        r = (hq - (u.unsqueeze(1) @ Hr).squeeze(1)) / sq                  # (a, n)
        U = U - u.unsqueeze(2) * r.unsqueeze(1)
        U[ar, slots] = r
        G = G + u.unsqueeze(2) * (u / sq).unsqueeze(1)
        G[ar, :, slots] = -u / sq
        G[ar, slots, :] = -u / sq
        G[ar, slots, slots] = (1.0 / sq).squeeze(1)
        wq = gq / sq
        w = w - u * wq
        w[ar, slots] = wq.squeeze(1)
        g = g - gq * r
        s = s - sq * r.pow(2)
        Hr[ar, slots] = hq
        self.G[rows], self.U[rows], self.w[rows], self.g[rows], self.s[rows] = G, U, w, g, s
        self.Hs_rows[rows] = Hr
        old = self.idx[rows, slots]
        self.mask[rows, old] = False
        self.mask[rows, cols] = True
        self.idx[rows, slots] = cols
        self.bS[rows, slots] = self.b[rows, cols]


class _Search:
    """Swap search over a whole layer, chunk by chunk (rows are independent given their kept counts)."""

    def __init__(self, problem: LayerProblem, pattern: Pattern, *, ridge: float, tol: float, dtype,
                 chunk_bytes: int, refresh: int):
        self.p, self.pat = problem, pattern
        self.dt = dtype
        Hh = problem.Hh.to(dtype)
        mu = float(Hh.diagonal().mean().clamp_min(1e-30))
        self.A = Hh + (ridge * mu) * torch.eye(problem.n, dtype=dtype, device=Hh.device)
        self.B = problem.target(dtype).to(Hh.device)
        W0 = problem.W0.to(dtype).to(Hh.device)
        self.const = 0.5 * ((W0 @ problem.H.to(dtype).to(Hh.device)) * W0).sum(1)
        self.thr = tol * self.const.clamp_min(1e-30)
        self.refresh = refresh
        self.group = pattern.M if isinstance(pattern, NM) else None
        self.expander = pattern if isinstance(pattern, ExpanderNM) else None
        m, n = problem.shape
        self.chunk_bytes = chunk_bytes
        self.swaps = 0
        self.moves = 0
        self.iterations = 0

    def _rows_per_chunk(self, K: int) -> int:
        m, n = self.p.shape
        per_row = max(1, K) * n * (8 if self.dt == torch.float64 else 4) * 8  # U, Hs_rows, Δ and temporaries
        c = max(1, int(self.chunk_bytes // per_row))
        if self.expander is not None:
            M = self.expander.M
            c = max(M, (c // M) * M)
        return min(c, m)

    def _best(self, st: SwapState, deg: Optional[torch.Tensor], r0: int, rows: torch.Tensor):
        """Best feasible swap of each chunk row in ``rows``: (Δ, slot, column), each of ``rows``' length."""
        idx, mask = st.idx[rows], st.mask[rows]
        G, U, w, g, s = st.G[rows], st.U[rows], st.w[rows], st.g[rows], st.s[rows]
        c, K = idx.shape
        n = st.n
        real = idx < n
        if self.group is None:
            D = swap_values(G, U, w, g, s)                                  # (c, K, n)
            D.masked_fill_(~(real.unsqueeze(2) & ~mask.unsqueeze(1)), float("inf"))
            best, flat = D.reshape(c, -1).min(1)
            return best, flat // n, flat % n
        M = self.group
        base = torch.where(real, (idx // M) * M, torch.zeros_like(idx))
        cols = base.unsqueeze(2) + torch.arange(M, device=idx.device)         # (c, K, M)
        Ug = U.gather(2, cols)
        fl = cols.reshape(c, -1)
        gg = g.gather(1, fl).reshape(c, K, M)
        sg = s.gather(1, fl).reshape(c, K, M)
        kept = mask.gather(1, fl).reshape(c, K, M)
        Gd = G.diagonal(dim1=1, dim2=2).clamp_min(1e-300).unsqueeze(2)
        t = Ug / Gd
        num = gg + w.unsqueeze(2) * t
        den = (sg + Ug * t).clamp_min(1e-300)
        D = 0.5 * w.pow(2).unsqueeze(2) / Gd - 0.5 * num.pow(2) / den
        ok = real.unsqueeze(2) & ~kept
        if deg is not None:  # expander: the removed weight's tile column must keep more than B
            tile = (r0 + rows) // self.expander.M
            dp = deg[tile.unsqueeze(1), idx.clamp_max(n - 1)]              # (c, K)
            ok = ok & (dp > self.expander.B).unsqueeze(2)
        D = torch.where(ok, D, torch.full_like(D, float("inf")))
        best, flat = D.reshape(c, -1).min(1)
        slot = flat // M
        return best, slot, cols.reshape(c, -1).gather(1, flat.unsqueeze(1)).squeeze(1)

    def polish_chunk(self, mask: torch.Tensor, r0: int, deg: Optional[torch.Tensor], budget: int) -> tuple:
        """Swap until no row of the chunk improves (certified on a fresh state) or ``budget`` swaps are made."""
        r1 = r0 + mask.shape[0]
        A, B = self.A, self.B[r0:r1]
        thr = self.thr[r0:r1]
        made = 0
        while True:
            st = SwapState(A, B, mask)
            since = 0
            clean = True  # no swap made on this state yet: its check is a fresh one
            rows = torch.arange(mask.shape[0], device=mask.device)
            while True:
                best, slot, col = self._best(st, deg, r0, rows)
                hit = torch.nonzero(best < -thr[rows]).reshape(-1)
                if hit.numel() == 0:
                    break
                if made >= budget:
                    return st.mask, made, False
                best, slot, col = best[hit], slot[hit], col[hit]
                act = rows[hit]
                if deg is not None:
                    keep = self._accept_expander(act, best, slot, col, st, deg, r0)
                    act, slot, col = act[keep], slot[keep], col[keep]
                else:
                    # a row without an improving swap keeps its state until the next rebuild: it is done
                    rows = act
                act, slot, col = act[: max(1, budget - made)], slot[: max(1, budget - made)], col[: max(1, budget - made)]
                st.apply(act, slot, col)
                made += int(act.numel())
                since += 1
                clean = False
                self.iterations += 1
                if since >= self.refresh:
                    break
            mask = st.mask
            if clean:
                return mask, made, True

    def _accept_expander(self, act, best, slot, col, st, deg, r0):
        """Greedy, in order of gain: a swap is kept while the removed weight's tile column stays above B.
        Returns positions into ``act``."""
        M, Bmin = self.expander.M, self.expander.B
        keep = []
        for k in torch.argsort(best).tolist():
            a = int(act[k])
            t = (r0 + a) // M
            p_col = int(st.idx[a, slot[k]])
            if int(deg[t, p_col]) > Bmin:
                deg[t, p_col] -= 1
                deg[t, int(col[k])] += 1
                keep.append(k)
        return torch.tensor(sorted(keep), dtype=torch.long, device=act.device)

    def run(self, mask: torch.Tensor, max_swaps: int) -> tuple[torch.Tensor, bool]:
        m, n = self.p.shape
        mask = mask.clone()
        deg = None
        if self.expander is not None:
            M = self.expander.M
            deg = mask.reshape(m // M, M, n).sum(1).to(torch.long)       # (row tiles, n) kept per tile column
        per_matrix = isinstance(self.pat, Unstructured) and self.pat.scope == "matrix"
        certified = False
        while True:
            K = int(mask.sum(1).max()) if m else 1
            rows = self._rows_per_chunk(K)
            certified = True
            for r0 in range(0, m, rows):
                sub, made, ok = self.polish_chunk(mask[r0:r0 + rows], r0, deg,
                                                  max(0, max_swaps - self.swaps))
                mask[r0:r0 + rows] = sub
                self.swaps += made
                certified &= ok
            if not certified or not per_matrix:
                return mask, certified
            moved = self._move_between_rows(mask, rows)
            if moved == 0:
                return mask, True
            self.moves += moved

    def _move_between_rows(self, mask: torch.Tensor, rows: int) -> int:
        """Per-matrix counts: pair rows whose cheapest removal costs less than another row's best addition
        gains (each row in at most one move); returns the number of moves made."""
        m, n = self.p.shape
        rem = torch.full((m,), float("inf"), dtype=self.dt)
        rem_col = torch.zeros(m, dtype=torch.long)
        add = torch.full((m,), -float("inf"), dtype=self.dt)
        add_col = torch.zeros(m, dtype=torch.long)
        for r0 in range(0, m, rows):
            st = SwapState(self.A, self.B[r0:r0 + rows], mask[r0:r0 + rows])
            rc = st.removal_costs()
            v, sl = rc.min(1)
            rem[r0:r0 + rows] = v.cpu()
            rem_col[r0:r0 + rows] = st.idx.gather(1, sl.unsqueeze(1)).squeeze(1).cpu()
            v, q = st.addition_gains().max(1)
            add[r0:r0 + rows] = v.cpu()
            add_col[r0:r0 + rows] = q.cpu()
        thr = self.thr.cpu()
        givers = torch.argsort(rem).tolist()
        takers = torch.argsort(add, descending=True).tolist()
        used = set()
        moves = []
        ti = 0  # first taker not used yet
        for i in givers:
            if i in used or rem[i] == float("inf"):
                continue
            while ti < len(takers) and takers[ti] in used:
                ti += 1
            tj, skipped = ti, False
            while tj < len(takers) and (takers[tj] in used or takers[tj] == i):
                skipped = True
                tj += 1
            if tj >= len(takers):
                break
            j = takers[tj]
            if not bool(rem[i] - add[j] < -torch.maximum(thr[i], thr[j])):
                if skipped:
                    continue  # row i was the best taker: a later giver may still pair with it
                break  # later givers cost more, and this was the best taker left
            used.update((i, j))
            moves.append((i, int(rem_col[i]), j, int(add_col[j])))
        for i, p, j, q in moves:
            mask[i, p] = False
            mask[j, q] = True
        return len(moves)


def _fill(pattern: Pattern, mask: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The start mask with free capacity filled (kept weights stay kept; the largest |W| of the rest join)."""
    if isinstance(pattern, ExpanderNM):
        return mask  # a feasible expander N:M mask keeps exactly N per group already
    a = W.abs().to(torch.float64)
    scores = mask.to(torch.float64) * 2.0 + a / (2.0 * float(a.max()) + 1e-300) * (~mask)
    full = pattern.project(scores)
    return full if bool((full | ~mask).all()) else mask  # a projection that dropped a kept weight: keep the start


def polish(problem: LayerProblem, pattern: Pattern, start: LayerResult, *, max_swaps: int = 1_000_000,
           ridge: float = 1e-9, tol: float = 1e-9, dtype: Union[str, torch.dtype] = "float64",
           chunk_mb: int = 256, refresh: int = 64, threads: Optional[int] = 1) -> LayerResult:
    """Swap search from ``start``'s mask (module docstring): the returned weights are the exact least-squares
    refit on the polished mask; ``info`` records the swaps made and whether 1-swap local optimality is
    certified. ``threads``: torch CPU threads for the search (default 1: it is many small elementwise
    kernels, and on a loaded 2-core machine two threads made a 64×64 layer's search 13× slower in CPU time,
    2.8 s against 0.21 s); ``None`` keeps the caller's setting."""
    from .baselines import refit_weights
    if not isinstance(pattern, (Unstructured, NM)):  # ExpanderNM is an NM
        raise PatternError(f"swap search does not handle the {pattern.name} pattern "
                           f"(unstructured, per-row, N:M or expander N:M)")
    pattern.validate(problem.shape)
    dt = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dt not in _DTYPES.values():
        raise ValueError(f"swaps: dtype must be float32 or float64, got {dtype!r}")
    if not (ridge > 0 and tol >= 0 and max_swaps >= 0 and refresh >= 1 and chunk_mb >= 1):
        raise ValueError("swaps: need ridge > 0, tol ≥ 0, max_swaps ≥ 0, refresh ≥ 1, chunk_mb ≥ 1")
    mask0 = start.mask.to(torch.bool).to(problem.Hh.device)
    if tuple(mask0.shape) != tuple(problem.shape) or not pattern.is_feasible(mask0):
        raise PatternError(f"swaps: the start mask is not a feasible {pattern.name} mask of this layer")
    with torch_threads(threads), Timer() as t:
        mask = _fill(pattern, mask0, start.W.to(mask0.device))
        filled = int(mask.sum() - mask0.sum())
        s = _Search(problem, pattern, ridge=float(ridge), tol=float(tol), dtype=dt,
                    chunk_bytes=int(chunk_mb) << 20, refresh=int(refresh))
        mask, certified = s.run(mask, int(max_swaps))
        if not pattern.is_feasible(mask):
            raise NumericalError(f"layer {problem.name!r}: swap search left the pattern (a bug)")
        W = refit_weights(problem, mask)
    err = problem.objective(W)
    start_err = start.info.get("error", problem.objective(start.W))
    info = dict(start.info)
    info.update(method=f"{start.info.get('method', 'start')}+swaps", error=err, error_before_swaps=start_err,
                swaps=s.swaps, moves_between_rows=s.moves, filled=filled, swap_iterations=s.iterations,
                certified_1swap=certified, swap_time_s=t.elapsed,
                time_s=float(start.info.get("time_s", 0.0)) + t.elapsed,
                sparsity=1.0 - float(mask.float().mean()))
    return LayerResult(W=W.to(problem.W0.dtype), mask=mask, info=info)


@register_method("swaps", needs="gram", patterns=("unstructured", "row", "nm", "expander"),
                 program=lambda problem, pattern, **_: l0_program(problem, pattern),
                 description="swap search: exact 1-swaps of a start method's mask (refitted objective) until "
                             "certified 1-swap locally optimal",
                 options={"start": "method whose mask is polished (auto: sparsegpt; eggs for expander N:M)",
                          "start_options": "options of the start method (dict; API, or -O start_options=...)",
                          "max_swaps": "stop after this many improving swaps per layer (then not certified)",
                          "ridge": "relative ridge ε·mean(diag Ĥ) keeping every kept set invertible",
                          "tol": "a swap improves when it lowers the row error by more than tol·f_i(0)",
                          "dtype": "float64 | float32", "chunk_mb": "memory per chunk of rows (MiB)",
                          "refresh": "rebuild the factorised state after this many swap rounds",
                          "threads": "torch CPU threads of the search"})
def swap_search(problem: LayerProblem, pattern: Pattern, *, start: str = "auto",
                start_options: Optional[dict] = None, max_swaps: int = 1_000_000, ridge: float = 1e-9,
                tol: float = 1e-9, dtype: str = "float64", chunk_mb: int = 256, refresh: int = 64,
                threads: Optional[int] = 1) -> LayerResult:
    name = str(start).strip().lower()
    if name == "auto":
        name = "eggs" if isinstance(pattern, ExpanderNM) else "sparsegpt"
    if name == "swaps":
        raise ValueError("swaps: start must be another method")
    spec = get_method(name)
    if pattern.kind not in spec.patterns:
        raise PatternError(f"swaps: start method {name!r} does not take the {pattern.name} pattern")
    res = spec(problem, pattern, **dict(start_options or {}))
    if not pattern.is_feasible(res.mask.to(torch.bool)):  # e.g. Wanda's per-row rule under a per-matrix target
        m = pattern.project(res.W.abs().to(torch.float64) * res.mask)
        res = LayerResult(res.W * m, m, dict(res.info))
    return polish(problem, pattern, res, max_swaps=max_swaps, ridge=ridge, tol=tol, dtype=dtype,
                  chunk_mb=chunk_mb, refresh=refresh, threads=threads)
