"""SPAP — structured pruning by a penalty method with alternating minimisation (seed 000, arXiv 2505.03373).

The model (METHODS.md §4) is the group-selection MIQP: for a layer whose input columns form groups ``G_j``::

    min_{W, z}  f(W) = ½‖W X̂ − W0 X‖²_F   s.t.  W_{:,G_j} = 0 if z_j = 0,   Σ_j z_j = k,   z ∈ {0,1}^g

(:func:`~optprune.formulations.programs.l0_program` with a ``ColumnGroups`` pattern; exact references:
Gurobi / SCIP / enumeration with the closed-form refit).

What is the paper's and what is ours
------------------------------------
*From the paper (abstract level):* the pruning decision is a mixed-integer optimisation model minimising the
layer's reconstruction error (not a heuristic score); it is attacked by a **penalty method** that relaxes the
coupling ``W = V·diag(z)``; an **alternating minimisation** exploits the splittable structure for the weight
update; performance is recovered by that update, with no fine-tuning; MLP neurons are the primary structure.

*[reconstructed] — our reading, since the paper's exact rules are not available offline (METHODS.md §4):*

* penalty ``ρ/2 Σ_j (1−z_j) ‖V_{:,G_j}‖²_D`` with ``D = diag(Ĥ)`` (scale-free in the input magnitudes);
* **z-step**: ``z`` binary with ``Σz = k``; minimising the penalty over ``z`` keeps the ``k`` groups of largest
  penalised value ``p_j = Σ_{c∈G_j} Ĥ_cc ‖V_{:,c}‖²`` — closed form, top-k;
* **V-step**: ``min_V f(V) + penalty`` ⇔ ``V (Ĥ + ρ D_z) = W0 C`` with the diagonal ``D_z = diag((1−z)·Ĥ_cc)``:
  one Cholesky factorisation serves every row (the split structure);
* **ρ schedule**: geometric (``ρ ← growth·ρ``) after the z-step stops changing (or after ``inner_iters``
  changes at one ρ), until the dropped groups are numerically zero (their ``D``-weighted energy is below
  ``tol`` of the total);
* **finish**: the exact least-squares refit on the kept groups (one factorisation of ``Ĥ_SS``, the same for
  every row), i.e. the optimal ``W`` for the chosen ``z``;
* **initial z and safeguard** (ours, not the paper's): the path starts from the best structured baseline's
  ``z`` (``init="best"``: group-magnitude, FLAP score, greedy group-OBS — each refitted) and, separately, from
  the penalty's own start (``ρ → 0``: the top-k of ``p`` at the unconstrained optimum); every distinct ``z`` the
  iteration visits is refitted and the best feasible iterate by ``f`` is returned. So SPAP is never worse than
  its starting baselines (after refit); ``info`` reports by how much it improved on them.

Swap the reconstructed rules here when the paper's exact ones become known: :func:`_penalty_path` holds them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formulations.patterns import Pattern
from ..formulations.problem import LayerProblem, NumericalError, cholesky_with_retry
from ..formulations.programs import l0_program
from .base import LayerResult, Timer
from .registry import register_method
from .structured_baselines import (GroupSetup, _finish, flap_scores, group_obs, group_refit, group_setup,
                                   input_means, keep_from_scores)

__all__ = ["spap", "SPAPState"]


class SPAPState:
    """Caches refits of visited supports and tracks the best feasible iterate by ``f``."""

    def __init__(self, problem: LayerProblem, st: GroupSetup):
        self.p, self.st = problem, st
        self.seen: dict[bytes, float] = {}
        self.best_f = float("inf")
        self.best_keep: Optional[torch.Tensor] = None
        self.best_W: Optional[torch.Tensor] = None
        self.best_source = ""
        self.refits = 0

    def consider(self, keep: torch.Tensor, source: str) -> float:
        key = keep.cpu().numpy().tobytes()
        if key in self.seen:
            return self.seen[key]
        W = group_refit(self.p, self.st.cols(keep), self.st.dtype)
        f = self.p.objective(W)
        self.refits += 1
        self.seen[key] = f
        if f < self.best_f:
            self.best_f, self.best_keep, self.best_W, self.best_source = f, keep.clone(), W, source
        return f


def _penalised_values(st: GroupSetup, V: torch.Tensor, dH: torch.Tensor) -> torch.Tensor:
    return st.group_sum(dH * (V * V).sum(0))


def _penalty_path(problem: LayerProblem, st: GroupSetup, state: SPAPState, A: torch.Tensor, B: torch.Tensor,
                  dH: torch.Tensor, keep: torch.Tensor, *, rho0: float, growth: float, rho_max: float,
                  inner_iters: int, tol: float, max_iters: int, source: str) -> dict:
    """One continuation path of the penalty method from the support ``keep`` and penalty ``rho0``.

    [reconstructed] Alternating minimisation: V-step ``V(Ĥ + ρD_z) = B`` (one factorisation, all rows), z-step
    top-k of ``p_j = Σ_{c∈G_j} Ĥ_cc‖V_c‖²``; ρ grows geometrically when z is stable (or after ``inner_iters``
    changes at one ρ) until the dropped groups' energy ``Σ_{dropped} p_j / Σ p_j ≤ tol``.
    """
    rho, changes_here, iters, changes, resid = rho0, 0, 0, 0, float("nan")
    eye_idx = torch.arange(st.n, device=A.device)
    while iters < max_iters:
        iters += 1
        Dz = (~st.cols(keep)).to(A.dtype) * dH
        M = A.clone()
        M[eye_idx, eye_idx] += rho * Dz
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            L, _ = cholesky_with_retry(M, 1e-8, name=problem.name)
        V = torch.cholesky_solve(B.T, L).T
        if not torch.isfinite(V).all():
            raise NumericalError(f"layer {problem.name!r}: SPAP V-step produced NaN/Inf (ρ={rho:g})")
        p = _penalised_values(st, V, dH)
        new = keep_from_scores(p, st.k)
        tot = float(p.sum())
        resid = float(p[~keep].sum()) / tot if tot > 0 else 0.0
        if not torch.equal(new, keep) and changes_here < inner_iters:
            keep = new
            changes += 1
            changes_here += 1
            state.consider(keep, source)
            continue
        if resid <= tol or rho >= rho_max:
            break
        rho *= growth
        changes_here = 0
    state.consider(keep, source)
    return {"iters": iters, "z_changes": changes, "rho_final": rho, "dropped_energy": resid}


@register_method("spap", needs="gram", patterns=("groups",), structured=True,
                 program=lambda problem, pattern, **_: l0_program(problem, pattern),
                 description="[reconstructed] penalty method + alternating minimisation on the group MIQP, "
                             "then exact refit (SPAP, arXiv 2505.03373)")
def spap(problem: LayerProblem, pattern: Pattern, *, init: str = "best", rho0: float = 1e-2,
         growth: float = 1.5, rho_max: float = 1e8, inner_iters: int = 10, tol: float = 1e-12,
         max_iters: int = 300, rho0_warm: Optional[float] = None, damp: float = 1e-6, dtype=None,
         input_mean=None, **_) -> LayerResult:
    """SPAP on one layer: returns ``W`` (zero on removed group columns) and the kept-column mask.

    Options: ``init`` — ``"best"`` (best refitted structured baseline, default), ``"penalty"`` (only the
    penalty's own start), or a baseline name (``group_magnitude``, ``flap``, ``group_obs``); ``rho0``,
    ``growth``, ``rho_max``, ``tol``, ``inner_iters``, ``max_iters`` — the ρ schedule (ρ is relative: the
    dropped columns' diagonal is multiplied by ``1+ρ``); ``rho0_warm`` — the starting ρ of the path from the
    warm start (default ``rho0``); ``damp`` — relative ridge in the V-step only (the final refit is exact).
    ``dtype`` defaults to float64 on CPU, the problem's dtype (float32) on CUDA.
    """
    dt = (torch.float64 if problem.H.device.type == "cpu" else None) if dtype is None else dtype
    st = group_setup(problem, pattern, "spap", dt)
    if init not in ("best", "penalty", "group_magnitude", "flap", "group_obs"):
        raise ValueError(f"spap: init must be best, penalty, group_magnitude, flap or group_obs, got {init!r}")
    with Timer() as t:
        state = SPAPState(problem, st)
        Hh = problem.Hh.to(st.dtype)
        dH = Hh.diagonal().clamp_min(0).clone()
        A = problem.damped_hessian(damp, dtype=st.dtype)
        B = problem.target(st.dtype)
        starts = {}
        W0 = problem.W0.to(st.dtype)
        if init in ("best", "group_magnitude"):
            starts["group_magnitude"] = keep_from_scores(st.group_sum((W0 * W0).sum(0)), st.k)
        if init in ("best", "flap"):
            _, muh = input_means(problem, input_mean, None)
            muh = None if muh is None else muh.to(Hh.device, st.dtype)
            starts["flap"] = keep_from_scores(st.group_sum(flap_scores(problem, muh, st.dtype)), st.k)
        if init in ("best", "group_obs"):
            starts["group_obs"] = group_obs(problem, pattern, dtype=st.dtype, refit=False).info["keep"].to(Hh.device)
        start_f = {name: state.consider(kp, name) for name, kp in starts.items()}
        # the penalty's own start: ρ → 0, V = the unconstrained optimum, z = top-k of its penalised values
        L, _ = cholesky_with_retry(A, 0.0, name=problem.name)
        V = torch.cholesky_solve(B.T, L).T
        keep0 = keep_from_scores(_penalised_values(st, V, dH), st.k)
        start_f["penalty"] = state.consider(keep0, "penalty")
        paths = {"penalty": _penalty_path(problem, st, state, A, B, dH, keep0, rho0=rho0, growth=growth,
                                          rho_max=rho_max, inner_iters=inner_iters, tol=tol, max_iters=max_iters,
                                          source="path:penalty")}
        if starts:
            best_start = min(starts, key=lambda nm: start_f[nm])
            paths[best_start] = _penalty_path(
                problem, st, state, A, B, dH, starts[best_start], rho0=rho0 if rho0_warm is None else rho0_warm,
                growth=growth, rho_max=rho_max, inner_iters=inner_iters, tol=tol, max_iters=max_iters,
                source=f"path:{best_start}")
        keep, W = state.best_keep, state.best_W
    best_baseline = min((f for nm, f in start_f.items() if nm != "penalty"), default=float("nan"))
    info = {"method": "spap", "time_s": t.elapsed, "start_errors": start_f, "paths": paths,
            "refits": state.refits, "best_source": state.best_source, "error": state.best_f,
            "improvement_over_best_start": (best_baseline - state.best_f) / best_baseline
            if best_baseline == best_baseline and best_baseline > 0 else None}
    return _finish(problem, st, keep, W, info)
