"""Sparse plus low-rank, ``W ≈ S + L``: alternating exact low-rank steps and pattern solves (docs/methods.md §14).

The program is :func:`~optprune.formulations.lowrank.sparse_lowrank_program` (``min f(S + L)``, S under the
pattern, ``rank L ≤ r``). OATS alternates a truncated SVD and a hard threshold of activation-scaled weights; here
both steps use the layer objective itself:

1. ``S`` ← the ``inner`` method (default SparseGPT) on the layer, refitted on its support;
2. repeat ``iters`` times: ``L`` ← the exact rank-r step given S (reduced-rank regression, a truncated SVD in
   Ĥ^{1/2} coordinates); ``S`` ← ``inner`` on the shifted problem (target ``W* − L``), refitted on its support,
   kept only if it lowers ``f(S + L)`` against the refit of the previous support (so f never rises);
3. on the final support, ``polish`` rounds of the two exact block steps (refit of S, rank-r L): block
   coordinate descent, which leaves S optimal for its support given L and L optimal given S up to its
   convergence (``info['block_gaps']`` measures both).

``equal_params=true`` tightens S's pattern so that ``nnz(S) + r(m + n)`` ≤ the kept count of the plain pattern
(unstructured, per matrix or per row; N:M fixes its count and is refused). The result is folded into one dense
matrix ``W = S + L`` (``info['folded_lowrank']``; ``mask`` is S's support): no stock loader reads two matrices
(docs/deployment.md).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...formulations.lowrank import best_lowrank, gram_half, lowrank_params, shifted_problem, sparse_lowrank_program
from ...formulations.patterns import NM, Pattern, PatternError, Unstructured
from ...formulations.problem import LayerProblem
from ..backends.common import unconstrained_rows
from ..base import LayerResult, Timer, torch_threads
from ..registry import get_method, register_method
from .baselines import refit_weights

__all__ = ["sparse_lowrank", "equal_param_pattern"]


def equal_param_pattern(pattern: Pattern, shape, rank: int) -> Pattern:
    """The pattern for S at an equal parameter count: ``r(m + n)`` more weights pruned (per matrix), or
    ``⌈r(m + n)/m⌉`` more per row."""
    m, n = shape
    extra = lowrank_params(shape, rank)
    if isinstance(pattern, NM) or not isinstance(pattern, Unstructured):
        raise PatternError(f"sparse-lowrank: equal_params needs unstructured sparsity (per matrix or row); "
                           f"{pattern.name} fixes its own count")
    if pattern.scope == "row":
        pruned, count = pattern.prune_count(n) + math.ceil(extra / m), n
    else:
        pruned, count = pattern.prune_count(m * n) + extra, m * n
    if pruned >= count:
        raise PatternError(f"sparse-lowrank: rank {rank} costs {extra} parameters, more than the "
                           f"{pattern.kept_count(shape)} the {pattern.name} pattern keeps")
    return Unstructured((pruned + 0.5) / count, pattern.scope)


def _program(problem, pattern, rank: int = 8, equal_params: bool = False, **_):
    if equal_params:
        pattern = equal_param_pattern(pattern, problem.shape, rank)
    return sparse_lowrank_program(problem, pattern, min(int(rank), min(problem.shape)))


@register_method("sparse-lowrank", needs="gram", patterns=("unstructured", "row", "nm"), program=_program,
                 description="W ≈ S + L (S under the pattern, rank L ≤ r): exact rank-r steps alternated with "
                             "pattern solves on the layer objective (OATS-style); folded into one dense matrix",
                 options={"rank": "rank r of the low-rank part",
                          "equal_params": "count r(m + n) against the kept weights (S pruned further)",
                          "iters": "alternations of (L step, S step)",
                          "inner": "method solving the S step on the shifted problem",
                          "polish": "final rounds of exact block steps on the last support",
                          "threads": "torch CPU threads"},
                 verify_options=({"rank": 1, "iters": 3},))
def sparse_lowrank(problem: LayerProblem, pattern: Pattern, *, rank: int = 8, equal_params: bool = False,
                   iters: int = 5, inner: str = "sparsegpt", polish: int = 20,
                   threads: Optional[int] = None) -> LayerResult:
    m, n = problem.shape
    if not 0 <= int(rank) <= min(m, n):
        raise ValueError(f"sparse-lowrank: rank must be in 0..{min(m, n)}, got {rank}")
    if iters < 0 or polish < 0:
        raise ValueError("sparse-lowrank: iters and polish must be ≥ 0")
    if str(inner).strip().lower() == "sparse-lowrank":
        raise ValueError("sparse-lowrank: inner must be another method")
    spec = get_method(str(inner))
    pat_S = equal_param_pattern(pattern, (m, n), int(rank)) if equal_params else pattern
    pat_S.validate((m, n))
    if pat_S.kind not in spec.patterns:
        raise PatternError(f"sparse-lowrank: inner method {spec.name!r} does not take the {pat_S.name} pattern")
    r = int(rank)
    with torch_threads(threads), Timer() as t:
        p64 = problem.to(torch.float64)
        Wst, fst = unconstrained_rows(p64)
        half = gram_half(p64.Hh)

        def value(S, L):
            return fst + 0.5 * float(((S + L - Wst) @ half[0]).pow(2).sum())

        res = spec(problem, pat_S)
        mask = res.mask.to(torch.bool).cpu()
        S = refit_weights(p64, mask) * mask
        L = torch.zeros_like(S)
        hist = [value(S, L)]
        accepted = 0
        for _ in range(iters if r > 0 else 0):
            L = best_lowrank(Wst - S, half, r)
            sub = shifted_problem(problem, Wst - L)
            S_old = refit_weights(sub, mask) * mask
            cand = spec(sub.to(problem.H.dtype), pat_S)
            mk = cand.mask.to(torch.bool).cpu()
            S_new = refit_weights(sub, mk) * mk
            if value(S_new, L) < value(S_old, L):
                S, mask = S_new, mk
                accepted += 1
            else:
                S = S_old
            hist.append(value(S, L))
        for _ in range(polish if r > 0 else 0):
            L = best_lowrank(Wst - S, half, r)
            S = refit_weights(shifted_problem(problem, Wst - L), mask) * mask
        if r > 0:
            L = best_lowrank(Wst - S, half, r)
        f = value(S, L)
        # how far each block is from its exact optimum given the other (0 at a block-coordinate fixed point)
        S_ref = refit_weights(shifted_problem(problem, Wst - L), mask) * mask
        L_ref = best_lowrank(Wst - S, half, r)
        gaps = {"S_given_L": (f - value(S_ref, L)) / max(f, 1e-300),
                "L_given_S": (f - value(S, L_ref)) / max(f, 1e-300)}
    W = (S + L).to(problem.W0.dtype)
    err = problem.objective(W)
    info = {"method": "sparse-lowrank", "error": err, "time_s": t.elapsed, "lowrank_rank": r,
            "folded_lowrank": True, "params": int(mask.sum()) + lowrank_params((m, n), r),
            "sparse_params": int(mask.sum()), "pattern_S": pat_S.name if not equal_params else
            f"{pat_S.name} {pat_S.sparsity:.4f}", "error_S_only": problem.objective(S.to(problem.W0.dtype)),
            "history": hist, "accepted_S_steps": accepted, "block_gaps": gaps, "inner": spec.name,
            "sparsity": 1.0 - float(mask.float().mean()),
            "values": {"S": S, "L": L, "z": mask.to(torch.float64)}}
    return LayerResult(W=W, mask=mask, info=info)
