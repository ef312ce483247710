"""Sparse plus low-rank: ``W = S + L`` with S under a sparsity pattern and ``rank L ≤ r`` (docs/methods.md §14).

The program, on the shared layer problem::

    min_{S, L}  f(S + L)   s.t.   supp(S) ∈ pattern (mask z),   rank(L) ≤ r

It is not convex (the support and the rank), but each block has an exact answer with the other fixed, which is
what the production solver alternates and what verification checks:

* **L given S** (reduced-rank regression): with ``W*`` the unconstrained minimiser of f and ``Ĥ = V e Vᵀ``,
  ``f(S + L) = f* + ½‖(S + L − W*) Ĥ^{1/2}‖²_F``. With ``Z = (W* − S) Ĥ^{1/2}`` and ``Z_r`` its best rank-r
  approximation (truncated SVD, Eckart–Young), ``L = Z_r Ĥ^{+1/2}`` is optimal (the row space of ``Z_r`` lies
  in ``range Ĥ``) and ``f = f* + ½ Σ_{i>r} σ_i(Z)²``. The same value is ``f* + ½(tr M − max_{QᵀQ=I_r} tr QᵀMQ)``
  for ``M = Z Zᵀ``: the eigen-program of ``subspace.py``, an independent (SDP) reference.
* **S given L and the support**: ``f(S + L)`` is the layer problem with target ``W* − L`` (same Ĥ, up to the
  constant f*): a least-squares refit on the support, a convex QP (:func:`shifted_problem`).

**Parameters.** S keeps ``nnz(S)`` weights, L costs ``r(m + n)`` (its two factors). At an equal parameter count
the pattern of S is tightened so that ``nnz(S) + r(m + n)`` is at most the plain pattern's kept count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .patterns import Pattern
from .problem import LayerProblem
from .programs import Indicator, Program, Variable

__all__ = ["SumObjective", "RankAtMost", "sparse_lowrank_program", "shifted_problem", "gram_half",
           "best_lowrank", "lowrank_params"]


@dataclass
class SumObjective:
    """``f(S + L)`` of the program's :class:`LayerProblem`."""
    parts: tuple = ("S", "L")

    def value(self, program, values):
        W = sum(torch.as_tensor(values[p]).to(torch.float64) for p in self.parts)
        return program.problem.to(torch.float64).objective(W)


@dataclass
class RankAtMost:
    """``rank(var) ≤ r``, judged on the singular values (relative tolerance ``tol``·σ_max)."""
    var: str
    r: int

    def satisfied(self, values, tol=1e-7) -> bool:
        s = torch.linalg.svdvals(torch.as_tensor(values[self.var]).to(torch.float64))
        if s.numel() == 0 or float(s[0]) == 0.0:
            return True
        return int((s > max(tol, 1e-10) * float(s[0])).sum()) <= self.r


def lowrank_params(shape, r: int) -> int:
    m, n = shape
    return int(r) * (m + n)


def sparse_lowrank_program(problem: LayerProblem, pattern: Pattern, rank: int) -> Program:
    """``min f(S + L)  s.t.  supp S ∈ pattern,  rank L ≤ r`` (kind ``SLR``: no reference backend solves it whole;
    its blocks are checked exactly, module docstring)."""
    pattern.validate(problem.shape)
    m, n = problem.shape
    if not 0 <= int(rank) <= min(m, n):
        raise ValueError(f"rank must be in 0..{min(m, n)}, got {rank}")
    variables = {"S": Variable("S", (m, n)), "L": Variable("L", (m, n)), "z": Variable("z", (m, n), "binary")}
    cons = [Indicator("S", "z", torch.arange(m * n)), RankAtMost("L", int(rank))] + pattern.constraints((m, n))
    return Program("sparse + low-rank (S + L)", "SLR", variables, [SumObjective()], cons, problem, pattern,
                   meta={"heuristic": True, "rank": int(rank), "params": pattern.kept_count((m, n)) + lowrank_params((m, n), rank)})


def gram_half(Hh: torch.Tensor, rel: float = 1e-13):
    """``(Ĥ^{1/2}, Ĥ^{+1/2})`` on the range of Ĥ (eigenvalues below ``rel``·λ_max dropped), float64."""
    e, V = torch.linalg.eigh(Hh.to(torch.float64))
    keep = e > rel * float(e.max().clamp_min(1e-300))
    Vk, ek = V[:, keep], e[keep]
    return (Vk * ek.sqrt()) @ Vk.T, (Vk / ek.sqrt()) @ Vk.T


def best_lowrank(R: torch.Tensor, half, r: int) -> torch.Tensor:
    """The rank-≤r ``L`` minimising ``‖(L − R) Ĥ^{1/2}‖_F`` (``half`` from :func:`gram_half`)."""
    Hs, Hsi = half
    if r <= 0:
        return torch.zeros_like(R)
    U, s, Vt = torch.linalg.svd(R @ Hs, full_matrices=False)
    return (U[:, :r] * s[:r]) @ (Vt[:r] @ Hsi)  # factored: rank ≤ r up to round-off


def shifted_problem(problem: LayerProblem, W_target: torch.Tensor, name: str = "") -> LayerProblem:
    """The layer problem ``½‖(S − W_target) Ĥ^{1/2}‖²`` (Gram Ĥ, no correction): ``f(S + L) − f*`` for
    ``W_target = W* − L``."""
    Hh = problem.Hh.to(torch.float64)
    return LayerProblem(W0=W_target.to(torch.float64), H=Hh, name=name or f"{problem.name}[S-step]",
                        damp=problem.damp, nsamples=problem.nsamples)
