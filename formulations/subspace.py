"""Keeping a subspace: the eigen-program behind slicing the hidden dimension (docs/methods.md §11).

A layer's dense outputs ``Y = W0 X`` (``X``: the calibration inputs) have the covariance ``M = W0 H W0ᵀ``
(``m × m``). Keeping only ``k`` output directions — an orthonormal basis ``Q`` (``m × k``) of a subspace, the
layer becoming ``QQᵀW0`` — loses ``½ tr((I − QQᵀ) M) = ½ (tr M − tr QᵀMQ)``, which is ``f(QQᵀW0)`` of the
layer problem when ``X̂ = X``. The program::

    max_Q  tr(Qᵀ M Q)   s.t.   QᵀQ = I_k          (Q ∈ R^{m×k})

is not convex as written (the constraint set is a Stiefel manifold), but it has a closed-form answer (Ky Fan's
maximum principle): the optimum is the sum of the ``k`` largest eigenvalues of ``M``, attained by their
eigenvectors. Its convex relaxation over ``P = QQᵀ``::

    max_P  tr(M P)   s.t.   0 ⪯ P ⪯ I,   tr P = k

is exact (the feasible set is the convex hull of the rank-k projections, whose extreme points are those
projections), so an SDP solver gives an independent reference value, and its dual
``min kμ + tr Z  s.t.  Z ⪰ 0,  Z + μI ⪰ M`` a certificate.

With ``W0 = I`` and ``H`` the covariance of the residual stream, this is SliceGPT's choice of the rotation: keep
the principal directions of the residual activations (``llm_adapters/hidden.py``).

:class:`Subspace` is the pattern of such a program (keep ``k = m − ⌊s·m⌋`` of ``m`` output directions). It
is no sparsity mask: every weight of ``QQᵀW0`` may be nonzero; its rank is what is constrained, which no linear
row over a mask can say (:meth:`Subspace.constraints` refuses, so no mask-and-weights MIQP is built for it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .patterns import Pattern, PatternError, check_sparsity, register_pattern
from .problem import LayerProblem
from .programs import Program, Variable

__all__ = ["Subspace", "TraceObjective", "Orthonormal", "eigen_program", "output_covariance", "fan_optimum"]


@register_pattern
class Subspace(Pattern):
    """Keep a ``k``-dimensional subspace of a layer's ``m`` outputs: ``k = m − ⌊s·m⌋`` (or ``keep=k``)."""

    kinds = ("subspace",)
    syntax = "subspace"

    @classmethod
    def parse(cls, text, sparsity=None, **params):
        if text != "subspace":
            return None
        if sparsity is None:
            raise PatternError("pattern 'subspace' needs a sparsity (fraction of directions removed)")
        return cls(sparsity=sparsity)

    def __init__(self, sparsity: float | None = None, *, keep: int | None = None):
        if (keep is None) == (sparsity is None):
            raise PatternError("Subspace needs exactly one of keep= or sparsity=")
        self.sparsity = None if sparsity is None else check_sparsity(sparsity)
        self._keep = keep
        self.name = "subspace"

    def dims(self, m: int) -> int:
        """The number of directions kept out of ``m``."""
        return int(self._keep) if self._keep is not None else m - int(self.sparsity * m)

    def describe(self):
        return {"pattern": "subspace", "keep": self._keep, "sparsity": self.sparsity}

    def validate(self, shape):
        m = shape[0]
        k = self.dims(m)
        if not (1 <= k <= m):
            raise PatternError(f"a subspace keeps 1 to {m} of {m} directions, got {k}")

    def kept_count(self, shape):
        m, n = shape
        return m * n  # a rank constraint: no weight is forced to zero

    def project(self, scores):
        self.validate(scores.shape)
        return torch.ones_like(scores, dtype=torch.bool)

    def is_feasible(self, mask):
        self.validate(mask.shape)
        return True

    def constraints(self, shape):
        raise PatternError("a subspace (rank) constraint has no linear rows over a mask; its program is "
                           "eigen_program (formulations/subspace.py)")


@dataclass
class TraceObjective:
    """``− tr(Qᵀ M Q)`` (programs minimise; the kept variance is maximised)."""
    M: torch.Tensor
    var: str = "Q"

    def value(self, program, values):
        Q = torch.as_tensor(values[self.var]).to(torch.float64)
        return -float(torch.trace(Q.T @ self.M.to(torch.float64) @ Q))


@dataclass
class Orthonormal:
    """``QᵀQ = I``: the columns of ``Q`` are orthonormal (checked to ``tol``, entrywise)."""
    var: str = "Q"

    def satisfied(self, values, tol=1e-6) -> bool:
        Q = torch.as_tensor(values[self.var]).to(torch.float64)
        G = Q.T @ Q
        return bool((G - torch.eye(G.shape[0], dtype=G.dtype)).abs().max() <= max(tol, 1e-9))


def output_covariance(problem: LayerProblem) -> torch.Tensor:
    """``M = W0 H W0ᵀ`` in float64: the covariance of the layer's dense outputs over the calibration inputs."""
    W0 = problem.W0.detach().to(torch.float64).cpu()
    H = problem.H.detach().to(torch.float64).cpu()
    M = W0 @ H @ W0.T
    return 0.5 * (M + M.T)


def fan_optimum(M: torch.Tensor, k: int) -> float:
    """Ky Fan: ``max tr(QᵀMQ)`` over ``QᵀQ = I_k`` is the sum of the ``k`` largest eigenvalues of ``M``."""
    ev = torch.linalg.eigvalsh(0.5 * (M + M.T).to(torch.float64))
    return float(ev[-k:].sum()) if k > 0 else 0.0


def eigen_program(problem: LayerProblem, pattern: Pattern) -> Program:
    """``max tr(QᵀMQ) s.t. QᵀQ = I_k`` with ``M = W0 H W0ᵀ`` and ``k`` from a :class:`Subspace` pattern."""
    if not isinstance(pattern, Subspace):
        raise PatternError(f"the eigen-program keeps a subspace: it needs a 'subspace' pattern, got {pattern.name}")
    m = problem.m
    pattern.validate(problem.shape)
    k = pattern.dims(m)
    M = output_covariance(problem)
    return Program("subspace eigen-program", "EIG", {"Q": Variable("Q", (m, k))}, [TraceObjective(M)],
                   [Orthonormal("Q")], problem, pattern, meta={"k": k, "M": M})
