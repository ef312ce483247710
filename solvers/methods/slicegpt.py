"""SliceGPT's choice of subspace: the principal directions of a layer's outputs (docs/methods.md §11).

The production solver of :func:`~optprune.formulations.subspace.eigen_program`: with ``M = W0 H W0ᵀ`` the
covariance of the dense outputs, ``Q`` = the eigenvectors of the ``k`` largest eigenvalues (one symmetric
eigendecomposition in float64; exact by Ky Fan's maximum principle). The layer becomes ``QQᵀW0``.

Used on the residual stream (``W0 = I``, ``H`` = the residual activations' covariance) it gives the global
rotation of ``--structure hidden`` (``llm_adapters/hidden.py``): rotate by ``[Q Q⊥]``, drop ``Q⊥``.
"""
from __future__ import annotations

import torch

from ...formulations.patterns import Pattern, PatternError
from ...formulations.problem import LayerProblem, NumericalError
from ...formulations.subspace import Subspace, eigen_program, output_covariance
from ..base import LayerResult, Timer
from ..registry import register_method

__all__ = ["slicegpt", "principal_subspace"]


def principal_subspace(M: torch.Tensor, k: int, *, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, eigenvalues)``: the ``k`` leading eigenvectors of the symmetric ``M`` (float64, columns in
    decreasing eigenvalue order) and all eigenvalues, decreasing."""
    M = 0.5 * (M + M.T).to(torch.float64)
    if not torch.isfinite(M).all():
        raise NumericalError(f"layer {name!r}: the covariance has NaN/Inf entries")
    ev, V = torch.linalg.eigh(M)
    ev, V = ev.flip(0), V.flip(1)
    Q = V[:, :k].contiguous()
    # a deterministic sign per direction (largest entry positive): eigenvectors are defined up to sign
    idx = Q.abs().argmax(0)
    sgn = torch.sign(Q[idx, torch.arange(k)])
    sgn[sgn == 0] = 1.0
    return Q * sgn, ev


@register_method("slicegpt", needs="gram", patterns=("subspace",), program=eigen_program,
                 description="keep the principal subspace of the outputs (SliceGPT's rotation: eigenvectors of "
                             "the output covariance; exact for its eigen-program)")
def slicegpt(problem: LayerProblem, pattern: Pattern) -> LayerResult:
    """Return ``W = QQᵀW0`` (dense: a rank-``k`` layer) with ``info["Q"]`` the kept basis (``m × k``).

    ``info``: ``kept_variance`` (``tr QᵀMQ``), ``total_variance`` (``tr M``), ``eigenvalues`` (decreasing),
    ``error`` (= ``f(QQᵀW0)``), ``values`` (the program's variables, for the cross-check)."""
    if not isinstance(pattern, Subspace):
        raise PatternError(f"slicegpt keeps a subspace: it needs a 'subspace' pattern, got {pattern.name}")
    pattern.validate(problem.shape)
    k = pattern.dims(problem.m)
    with Timer() as t:
        M = output_covariance(problem)
        Q, ev = principal_subspace(M, k, name=problem.name)
        W = Q @ (Q.T @ problem.W0.detach().to(torch.float64).cpu())
    kept = float(ev[:k].sum())
    info = {"method": "slicegpt", "time_s": t.elapsed, "Q": Q, "values": {"Q": Q}, "kept_variance": kept,
            "total_variance": float(ev.sum()), "eigenvalues": ev, "error": problem.objective(W.to(problem.W0.device))}
    return LayerResult(W.to(problem.W0.dtype).to(problem.W0.device),
                       torch.ones(problem.shape, dtype=torch.bool, device=problem.W0.device), info)
