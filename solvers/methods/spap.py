"""SPAP — structured pruning by a penalty method with alternating minimisation (arXiv 2505.03373).

The model (docs/methods.md §4) is the group-selection MIQP: for a layer whose input columns form groups ``G_j``::

    min_{W, z}  f(W) = ½‖W X̂ − W0 X‖²_F   s.t.  W_{:,G_j} = 0 if z_j = 0,   Σ_j z_j = k,   z ∈ {0,1}^g

(:func:`~optprune.formulations.programs.l0_program` with a ``ColumnGroups`` pattern; exact references:
Gurobi / SCIP / enumeration with the closed-form refit).

What is the paper's and what is ours
------------------------------------
*From the paper (abstract level):* the pruning decision is a mixed-integer optimisation model minimising the
layer's reconstruction error (not a heuristic score); it is attacked by a **penalty method** that relaxes the
coupling ``W = V·diag(z)``; an **alternating minimisation** exploits the splittable structure for the weight
update; performance is recovered by that update, with no fine-tuning; MLP neurons are the primary structure.

*[reconstructed] — our reading, since the paper's exact rules are not available offline (docs/methods.md §4):*

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
* **initial z and safeguard** (ours, not the paper's): the continuation path starts from the penalty's own
  start (``ρ → 0``: the top-k of ``p`` at the unconstrained optimum ``W* = W0 C Ĥ⁻¹``); the structured
  baselines' supports (``init="best"``: group-magnitude, FLAP score, greedy group-OBS — each refitted) are
  candidates too; every distinct ``z`` any stage visits is refitted exactly and the best feasible iterate by
  ``f`` is returned, so SPAP is never worse than its starting baselines after refit;
* **re-opening** (ours): *damped z-steps* around the incumbent — at a few ρ (1e2 … 1e-2) a V-step from the
  incumbent gives penalised values, and the proposal exchanges the ``t ≤ 3`` kept groups of smallest value
  with the ``t`` dropped groups of largest value (the z-step restricted to a trust region of ``t``
  exchanges); an exchange that lowers the exact refit objective is accepted and the round restarts.

Measured (docs/methods.md §4): on real layers the continuation path alone never changed ``z`` after its
start (the penalised values of dropped groups shrink like ``1/ρ²`` while kept groups absorb their role), so
the penalty method by itself amounts to "top-k of ``Ĥ_jj‖W*_j‖²``, then refit"; the gains over greedy
group-OBS come from the re-opening stage and are small on real layers, larger on small random instances.

Swap the reconstructed rules here when the paper's exact ones become known: :func:`_penalty_path` holds them.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from ...formulations.patterns import Pattern
from ...formulations.problem import LayerProblem, NumericalError, cholesky_with_retry
from ...formulations.programs import l0_program
from ..base import LayerResult, Timer
from ..registry import Option, register_method
from .structured_baselines import (GroupSetup, finish_groups, centered_problem, cpu_threads, flap_scores, group_obs,
                                   group_refit, group_setup, input_means, keep_from_scores)

__all__ = ["spap", "SPAPState"]


class SPAPState:
    """Caches refits of visited supports and tracks the best feasible iterate by ``f``."""

    def __init__(self, problem: LayerProblem, st: GroupSetup, B: torch.Tensor, Hh: Optional[torch.Tensor] = None):
        self.p, self.st, self.B, self.Hh = problem, st, B, Hh
        self.const = problem.constant()
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
        W = group_refit(self.p, self.st.cols(keep), self.st.dtype, B=self.B, Hh=self.Hh)
        if W.dtype == torch.float64:  # at the refit optimum W_S Ĥ_SS = B_S:  f = f(0) − ½⟨W_S, B_S⟩
            f = self.const - 0.5 * float((W * self.B).sum())
        else:
            f = self.p.objective(W)
        self.refits += 1
        self.seen[key] = f
        if self.best_keep is None or f < self.best_f - 1e-12 * abs(self.best_f):  # ignore round-off gains
            self.best_f, self.best_keep, self.best_W, self.best_source = f, keep.clone(), W, source
        return f


def _penalised_values(st: GroupSetup, V: torch.Tensor, dH: torch.Tensor) -> torch.Tensor:
    return st.group_sum(dH * (V * V).sum(0))


def v_step(problem: LayerProblem, st: GroupSetup, A: torch.Tensor, B: torch.Tensor, dH: torch.Tensor,
            keep: torch.Tensor, rho: float) -> torch.Tensor:
    """V-step ``V (Ĥ + ρ D_z) = W0 C``: ``D_z`` is diagonal, so one Cholesky factorisation serves every row."""
    M = A.clone()
    M.diagonal().add_(rho * (~st.cols(keep)).to(A.dtype) * dH)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        L, _ = cholesky_with_retry(M, 1e-8, name=problem.name)
    V = torch.cholesky_solve(B.T, L).T
    if not torch.isfinite(V).all():
        raise NumericalError(f"layer {problem.name!r}: SPAP V-step produced NaN/Inf (ρ={rho:g})")
    return V


class VStep:
    """The V-step ``V (Ĥ + ρ D_z) = B`` for many ρ and few supports ``z`` (the continuation path and the
    re-opening stage change ρ far more often than ``z``).

    With ``P`` the dropped columns, ``U = E_P D_P^{1/2}`` and ``A = Ĥ + δI``, Woodbury gives
    ``(A + ρUUᵀ)⁻¹ = A⁻¹ − A⁻¹U (ρ⁻¹I + UᵀA⁻¹U)⁻¹ UᵀA⁻¹``. With ``Y = B A⁻¹`` (once per layer) and the
    eigendecomposition ``UᵀA⁻¹U = QΛQᵀ`` (once per ``z``)::

        V(ρ) = Y − (G · w(ρ)) R,   G = Y U Q,   R = Qᵀ UᵀA⁻¹,   w_i(ρ) = 1 / (ρ⁻¹ + λ_i)

    so a new ρ costs one (m × |P|) · (|P| × n) product instead of a factorisation and two triangular solves
    with ``m`` right-hand sides (measured ≈ 6–8× less per V-step on a 576 × 1536 layer). Used in float64
    only: ``V_P → 0`` as ρ grows is computed as a difference, which float32 cannot resolve to the path's
    tolerance; other dtypes (and ``fast=False``) use the direct Cholesky V-step :func:`v_step`.
    """

    def __init__(self, problem: LayerProblem, st: GroupSetup, A: torch.Tensor, B: torch.Tensor, dH: torch.Tensor,
                 fast: bool = True):
        self.problem, self.st, self.A, self.B, self.dH = problem, st, A, B, dH
        self.fast = fast and A.dtype == torch.float64
        self.calls = 0
        self._key, self._fac = None, None
        if self.fast:
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:
                L, _ = cholesky_with_retry(A, 1e-8, name=problem.name)
            self.Ainv = torch.cholesky_inverse(L)
            self.Y = B @ self.Ainv

    def _factor(self, keep: torch.Tensor):
        key = keep.cpu().numpy().tobytes()
        if key != self._key:
            P = (~self.st.cols(keep)).nonzero().squeeze(1)
            u = self.dH[P].sqrt()
            K = u[:, None] * self.Ainv[P][:, P] * u[None, :]
            lam, Q = torch.linalg.eigh(K)
            G = (self.Y[:, P] * u) @ Q
            R = Q.T @ (u[:, None] * self.Ainv[P])
            self._key, self._fac = key, (lam.clamp_min(0), G, R)
        return self._fac

    def __call__(self, keep: torch.Tensor, rho: float) -> torch.Tensor:
        self.calls += 1
        if not self.fast:
            return v_step(self.problem, self.st, self.A, self.B, self.dH, keep, rho)
        if rho <= 0 or bool(keep.all()):
            return self.Y.clone()
        lam, G, R = self._factor(keep)
        V = self.Y - (G / (1.0 / rho + lam)) @ R
        if not torch.isfinite(V).all():
            raise NumericalError(f"layer {self.problem.name!r}: SPAP V-step produced NaN/Inf (ρ={rho:g})")
        return V


def _am(problem, st, state, vstep, dH, keep, rho, inner_iters, source):
    """Alternating minimisation at a fixed ρ: V-step, z-step (top-k of p), until z is stable."""
    changes = 0
    for _ in range(inner_iters + 1):
        V = vstep(keep, rho)
        p = _penalised_values(st, V, dH)
        new = keep_from_scores(p, st.k)
        if torch.equal(new, keep):
            break
        keep = new
        changes += 1
        state.consider(keep, source)
    return keep, p, changes


def _penalty_path(problem: LayerProblem, st: GroupSetup, state: SPAPState, vstep: VStep,
                  dH: torch.Tensor, keep: torch.Tensor, *, rho0: float, growth: float, rho_max: float,
                  inner_iters: int, tol: float, max_iters: int, source: str) -> dict:
    """One continuation path of the penalty method from the support ``keep`` and penalty ``rho0``.

    [reconstructed] Alternating minimisation at each ρ (V-step ``V(Ĥ + ρD_z) = B``, z-step top-k of
    ``p_j = Σ_{c∈G_j} Ĥ_cc‖V_c‖²``) until z is stable (at most ``inner_iters`` changes), then ``ρ ← growth·ρ``,
    until the dropped groups' share of the penalised values ``Σ_{dropped} p_j / Σ p_j ≤ tol``.
    """
    rho, levels, changes, resid = rho0, 0, 0, float("nan")
    while levels < max_iters:
        levels += 1
        keep, p, c = _am(problem, st, state, vstep, dH, keep, rho, inner_iters, source)
        changes += c
        tot = float(p.sum())
        resid = float(p[~keep].sum()) / tot if tot > 0 else 0.0
        if resid <= tol or rho >= rho_max:
            break
        rho *= growth
    state.consider(keep, source)
    return {"levels": levels, "z_changes": changes, "rho_final": rho, "dropped_energy": resid}


def _reopen(problem, st, state, vstep, dH, *, rhos, max_swaps: int, max_rounds: int,
            time_limit: Optional[float], t0: float) -> dict:
    """[ours] Damped z-steps around the incumbent (the best support found so far).

    At each ρ of ``rhos`` (descending), a V-step from the incumbent gives penalised values ``p``; the proposal
    exchanges the ``t`` kept groups of smallest ``p`` with the ``t`` dropped groups of largest ``p``
    (``t = 1..max_swaps``: the z-step restricted to a trust region of ``t`` exchanges). Proposals are refitted
    exactly; the first that lowers ``f`` becomes the incumbent and a new round starts. Stops after a round
    without improvement, ``max_rounds`` rounds or ``time_limit`` seconds.
    """
    rounds, proposals, accepted = 0, 0, 0
    while rounds < max_rounds:
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
        rounds += 1
        inc, f_inc = state.best_keep.clone(), state.best_f
        improved = False
        for rho in rhos:
            V = vstep(inc, rho)
            p = _penalised_values(st, V, dH)
            kept, drop = inc.nonzero().squeeze(1), (~inc).nonzero().squeeze(1)
            ko = kept[torch.argsort(p[kept], stable=True)]
            do = drop[torch.argsort(p[drop], descending=True, stable=True)]
            for t in range(1, min(max_swaps, ko.numel(), do.numel()) + 1):
                z = inc.clone()
                z[ko[:t]] = False
                z[do[:t]] = True
                proposals += 1
                state.consider(z, "reopen")
                if state.best_f < f_inc:
                    improved = True
                    break
            if improved:
                accepted += 1
                break
        if not improved:
            break
    return {"rounds": rounds, "proposals": proposals, "accepted": accepted}


@register_method("spap", needs="gram", patterns=("groups",), structured=True,
                 program=lambda problem, pattern, **_: l0_program(problem, pattern),
                 description="[reconstructed] penalty method + alternating minimisation on the group MIQP, "
                             "then exact refit (SPAP, arXiv 2505.03373)",
                 options={"rho0": Option(help="first penalty ρ", range="(0, inf)"),
                          "growth": Option(help="penalty growth per outer step", range="(1, inf)"),
                          "rho_max": Option(help="largest penalty", range="(0, inf)"),
                          "inner_iters": Option(help="alternating steps per penalty", range="[1, inf)"),
                          "tol": Option(help="stopping tolerance", range="[0, inf)"),
                          "max_iters": Option(help="outer steps", range="[1, inf)"),
                          "max_swaps": Option(help="reopen: largest trust region (exchanges)", range="[0, inf)"),
                          "max_rounds": Option(help="reopen: rounds without improvement", range="[0, inf)"),
                          "time_limit": Option(help="reopen: seconds", range="(0, inf)"),
                          "damp": Option(help="relative ridge of the refits", range="[0, inf)"),
                          "threads": Option(help="torch CPU threads", range="[1, inf)")})
def spap(problem: LayerProblem, pattern: Pattern, *, init: str = "best", rho0: float = 1e-2,
         growth: float = 1.5, rho_max: float = 1e8, inner_iters: int = 10, tol: float = 1e-12,
         max_iters: int = 200, reopen: bool = True, reopen_rhos=(1e2, 1e1, 1.0, 1e-1, 1e-2),
         max_swaps: int = 3, max_rounds: int = 20, time_limit: Optional[float] = None, damp: float = 1e-6,
         dtype=None, input_mean=None, input_mean_hat=None, bias: bool = False, threads: Optional[int] = None,
         fast_vstep: bool = True) -> LayerResult:
    """SPAP on one layer: returns ``W`` (zero on removed group columns) and the kept-column mask.

    Options: ``init`` — ``"best"`` (best refitted structured baseline, default), ``"penalty"`` (only the
    penalty's own start), or a baseline name (``group_magnitude``, ``flap``, ``group_obs``); ``rho0``,
    ``growth``, ``rho_max``, ``tol``, ``inner_iters``, ``max_iters`` — the continuation path (ρ is relative:
    the dropped columns' diagonal is multiplied by ``1+ρ``); ``reopen`` with ``reopen_rhos``, ``max_swaps``,
    ``max_rounds``, ``time_limit`` — the damped z-steps around the incumbent ([ours]); ``damp`` — relative
    ridge in the V-step only (the final refit is exact). ``dtype`` defaults to float64 on CPU, the problem's dtype on
    CUDA. ``threads`` — CPU threads for this call (default: 1 for layers with n ≤ 512, where OpenMP
    overhead dominates). ``fast_vstep`` — the Woodbury form of the V-step (:class:`VStep`, float64 only);
    ``False`` factorises ``Ĥ + ρD_z`` at every step (same iterates up to round-off, slower).
    """
    dt = (torch.float64 if problem.H.device.type == "cpu" else None) if dtype is None else dtype
    st = group_setup(problem, pattern, "spap", dt)
    original = problem
    if bias:
        mu, muh = input_means(problem, input_mean, input_mean_hat)
        if mu is None:
            raise ValueError(f"spap: bias=True needs the input mean (problem.meta['input_mean'] or input_mean=) "
                             f"for layer {problem.name!r}")
        problem = centered_problem(problem, mu, muh)
    if init not in ("best", "penalty", "group_magnitude", "flap", "group_obs"):
        raise ValueError(f"spap: init must be best, penalty, group_magnitude, flap or group_obs, got {init!r}")
    with cpu_threads(problem, threads), Timer() as t:
        Hh = problem.Hh.to(st.dtype)
        dH = Hh.diagonal().clamp_min(0).clone()
        A = problem.damped_hessian(damp, dtype=st.dtype)
        B = problem.target(st.dtype)
        state = SPAPState(problem, st, B, Hh)
        vstep = VStep(problem, st, A, B, dH, fast=fast_vstep)
        starts = {}
        W0 = problem.W0.to(st.dtype)
        if init in ("best", "group_magnitude"):
            starts["group_magnitude"] = keep_from_scores(st.group_sum((W0 * W0).sum(0)), st.k)
        if init in ("best", "flap"):
            _, mh = input_means(original, input_mean, input_mean_hat)
            mh = None if mh is None else mh.to(Hh.device, st.dtype)
            starts["flap"] = keep_from_scores(st.group_sum(flap_scores(original, mh, st.dtype)), st.k)
        if init in ("best", "group_obs"):
            starts["group_obs"] = group_obs(problem, pattern, dtype=st.dtype, refit=False,
                                            threads=threads).info["keep"].to(Hh.device)
        start_f = {name: state.consider(kp, name) for name, kp in starts.items()}
        # the penalty's own start: ρ → 0, V = the unconstrained optimum, z = top-k of its penalised values
        V = vstep(torch.ones(st.g, dtype=torch.bool, device=A.device), 0.0)
        keep0 = keep_from_scores(_penalised_values(st, V, dH), st.k)
        start_f["penalty"] = state.consider(keep0, "penalty")
        f_before = state.best_f
        path = _penalty_path(problem, st, state, vstep, dH, keep0, rho0=rho0, growth=growth, rho_max=rho_max,
                             inner_iters=inner_iters, tol=tol, max_iters=max_iters, source="path")
        f_path = state.best_f
        ro = _reopen(problem, st, state, vstep, dH, rhos=sorted(reopen_rhos, reverse=True), max_swaps=max_swaps,
                     max_rounds=max_rounds, time_limit=time_limit, t0=t.t0) if reopen else None
        keep, W = state.best_keep, state.best_W
    best_baseline = min((f for nm, f in start_f.items() if nm != "penalty"), default=float("nan"))
    info = {"method": "spap", "time_s": t.elapsed, "start_errors": start_f, "path": path, "reopen": ro,
            "refits": state.refits, "v_steps": vstep.calls, "v_step": "woodbury" if vstep.fast else "cholesky",
            "best_source": state.best_source,
            "error_starts": f_before, "error_after_path": f_path,
            "improvement_over_best_start": (best_baseline - state.best_f) / best_baseline
            if best_baseline == best_baseline and best_baseline > 0 else None}
    if bias:
        Wd = W.to(original.H.dtype)
        info["bias_delta"] = (original.W0.to(Wd.dtype) @ mu.to(Wd) - Wd @ muh.to(Wd)).to(original.W0.dtype)
        info["error_with_bias"] = problem.objective(W * st.mask(keep))
    return finish_groups(original, st, keep, W, info)
