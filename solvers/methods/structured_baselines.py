"""Structured (column-group) baselines and the shared group machinery (docs/methods.md §4).

A structured layer problem keeps ``k`` of the ``g`` input-column groups of ``W`` (an MLP neuron = one column
of ``down_proj``/``fc2``; an attention head = ``head_dim`` columns of ``o_proj``/``out_proj``). The model is
the group-selection MIQP of :func:`~optprune.formulations.programs.l0_program` with a
:class:`~optprune.formulations.patterns.ColumnGroups` pattern. Three baselines approximate it:

* ``group_magnitude`` — keep the groups of largest Frobenius norm ``‖W0_{:,G}‖²``; weights unchanged.
* ``flap``            — FLAP-style (An et al. 2024) fluctuation score ``Σ_{j∈G} Var(x_j)·‖W0_{:,j}‖²`` with
  **bias compensation**: the removed inputs are replaced by their calibration mean, i.e. the output bias
  gains ``δb = W0 μ − W μ̂`` (``= W0_{:,R} μ_R`` without error correction). ``δb`` is returned in
  ``info["bias_delta"]`` (shape (m,)); the structural surgery adds it to the layer bias, creating one if
  the layer has none. FLAP's own global score standardisation / adaptive per-layer widths are *not*
  reproduced here (one layer at a time, uniform width).
* ``group_obs``       — greedy group-OBS removal (OSSCAR / ZipLM style): remove one group at a time, the one
  whose removal increases ``f`` least given an optimal update of the remaining weights (computed from the
  ``Ĥ⁻¹`` blocks), apply that update, downdate ``Ĥ⁻¹``; finish with the exact least-squares refit.

The input mean the FLAP score needs is not a function of the Gram matrices. It is read from
``problem.meta["input_mean"]`` (dense inputs, shape (n,); ``problem.meta["input_mean_hat"]`` for the
pruned-model inputs when error correction is on) or the ``input_mean=`` option. **When it is absent** the
variance falls back to the raw second moment ``diag(Ĥ)/N`` (i.e. a zero mean is assumed) and no bias
compensation is done (``info["bias_delta"]`` is a zero vector and ``info["bias_compensation"]`` is False).

Shared helpers used by SPAP: :func:`group_setup`, :func:`group_refit` (the exact refit on kept groups —
for column groups the same for every row: one Cholesky factorisation of ``Ĥ_SS``), :func:`keep_from_scores`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from ...formulations.patterns import ColumnGroups, Pattern, PatternError
from ...formulations.problem import LayerProblem, NumericalError, cholesky_with_retry
from ...formulations.programs import l0_program
from ..base import LayerResult, Timer, torch_threads
from ..registry import Option, register_method

__all__ = ["GroupSetup", "group_setup", "group_refit", "refit_objective", "keep_from_scores", "centered_problem",
           "group_magnitude", "flap", "group_obs", "flap_scores", "input_means", "finish_groups"]


# --------------------------------------------------------------------------------------------- shared
@dataclass
class GroupSetup:
    """Everything a group method needs, in the working dtype/device."""
    m: int
    n: int
    g: int                   # number of groups
    k: int                   # groups to keep
    gi: torch.Tensor         # (n,) long: group of each column
    groups: list             # list of column-index lists
    sizes: torch.Tensor      # (g,) group sizes
    dtype: torch.dtype
    device: torch.device

    def cols(self, keep: torch.Tensor) -> torch.Tensor:
        """Column mask (n,) from a group keep vector (g,)."""
        return keep[self.gi]

    def group_sum(self, v: torch.Tensor) -> torch.Tensor:
        """Sum a per-column vector (n,) over groups → (g,)."""
        return torch.zeros(self.g, dtype=v.dtype, device=v.device).index_add_(0, self.gi, v)

    def mask(self, keep: torch.Tensor) -> torch.Tensor:
        return self.cols(keep).unsqueeze(0).expand(self.m, self.n).clone()


@contextmanager
def cpu_threads(problem: LayerProblem, threads: Optional[int] = None):
    """Run a CPU solve with ``threads`` torch threads (default: 1 when ``n ≤ 512``, where the many small
    factorisations are dominated by OpenMP start-up/contention — measured 10–25× faster on the 2-core box).
    Restores the previous setting. No effect on CUDA problems."""
    if threads is None:
        threads = 1 if (problem.H.device.type == "cpu" and problem.n <= 512) else None
    with torch_threads(threads):
        yield


def _work_dtype(problem: LayerProblem, dtype=None) -> torch.dtype:
    if dtype is not None:
        return {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype) if isinstance(dtype, str) \
            else dtype
    return torch.float64 if problem.H.dtype == torch.float64 else torch.float32


def group_setup(problem: LayerProblem, pattern: Pattern, name: str, dtype=None) -> GroupSetup:
    if not isinstance(pattern, ColumnGroups):
        raise PatternError(f"method {name!r} is structured: it needs a 'groups' pattern, got {pattern.name!r}")
    m, n = problem.shape
    pattern.validate((m, n))
    g = pattern.n_groups(n)
    k = pattern.keep_groups(n)
    if not (1 <= k <= g):
        raise PatternError(f"method {name!r}: the pattern keeps {k} of {g} groups; at least one group must stay")
    dev = problem.H.device
    gi = pattern.group_index(n).to(dev)
    groups = pattern.group_list(n)
    sizes = torch.tensor([len(gr) for gr in groups], device=dev)
    return GroupSetup(m, n, g, k, gi, groups, sizes, _work_dtype(problem, dtype), dev)


def keep_from_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (g,) keeping the ``k`` largest scores (ties broken by index, deterministically)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    order = torch.argsort(scores, descending=True, stable=True)
    keep[order[:k]] = True
    return keep


def group_refit(problem: LayerProblem, cols: torch.Tensor, dtype=None, *, B: Optional[torch.Tensor] = None,
                Hh: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact least-squares refit on kept columns ``S``: ``W_S = B_S Ĥ_SS⁻¹`` (``B = W0 C``), zero elsewhere.

    The support is the same for every row, so one Cholesky factorisation of ``Ĥ_SS`` serves all rows.
    Dead inputs (``Ĥ_jj = 0``) in S carry no signal and get weight 0. The factorisation is undamped; if it
    fails (singular ``Ĥ_SS``) the damping is raised from ``1e-8·mean(diag)`` until it succeeds.
    ``B`` / ``Hh``: the target ``W0 C`` and ``Ĥ`` already in the working dtype, for callers that refit many
    supports of one layer (SPAP): recomputing ``W0 C`` was half the cost of a refit.
    """
    dt = _work_dtype(problem, dtype)
    m, n = problem.shape
    Hh = problem.Hh.to(dt) if Hh is None else Hh
    cols = cols.to(Hh.device).bool() & (Hh.diagonal() > 0)
    W = torch.zeros(m, n, dtype=dt, device=Hh.device)
    if not bool(cols.any()):
        return W
    idx = cols.nonzero().squeeze(1)
    B = (problem.target(dt) if B is None else B)[:, idx]
    L, _ = cholesky_with_retry(Hh[idx][:, idx], 0.0, name=problem.name)
    W[:, idx] = torch.cholesky_solve(B.T, L).T
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {problem.name!r}: group refit produced NaN/Inf")
    return W


def refit_objective(problem: LayerProblem, cols: torch.Tensor, dtype=None) -> tuple[float, torch.Tensor]:
    """``(f(W_refit), W_refit)`` for a column support."""
    W = group_refit(problem, cols, dtype)
    return problem.objective(W), W


def finish_groups(problem: LayerProblem, st: GroupSetup, keep: torch.Tensor, W: torch.Tensor, info: dict) -> LayerResult:
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {problem.name!r}: the pruned weights contain NaN/Inf")
    mask = st.mask(keep)
    W = W * mask
    info.setdefault("error", problem.objective(W))
    info.update(kept_groups=int(keep.sum()), groups=st.g, sparsity=1.0 - float(mask.float().mean()))
    info.setdefault("keep", keep.detach().cpu())
    return LayerResult(W=W.to(problem.W0.dtype), mask=mask, info=info)


# --------------------------------------------------------------------------------------------- magnitude
@register_method("group_magnitude", needs="none", patterns=("groups",), structured=True,
                 program=lambda problem, pattern, **_: l0_program(problem, pattern),
                 description="keep the column groups of largest ‖W_{:,G}‖_F; weights unchanged")
def group_magnitude(problem: LayerProblem, pattern: Pattern, *, refit: bool = False, dtype=None) -> LayerResult:
    st = group_setup(problem, pattern, "group_magnitude", dtype)
    with Timer() as t:
        W0 = problem.W0.to(st.dtype)
        keep = keep_from_scores(st.group_sum((W0 * W0).sum(0)), st.k)
        W = group_refit(problem, st.cols(keep), st.dtype) if refit else W0
    return finish_groups(problem, st, keep, W, {"method": "group_magnitude" + ("+refit" if refit else ""),
                                          "time_s": t.elapsed})


# --------------------------------------------------------------------------------------------- FLAP
def input_means(problem: LayerProblem, input_mean=None, input_mean_hat=None):
    """(μ, μ̂) from the options or ``problem.meta``; ``(None, None)`` when unavailable."""
    mu = input_mean if input_mean is not None else problem.meta.get("input_mean")
    muh = input_mean_hat if input_mean_hat is not None else problem.meta.get("input_mean_hat")
    if mu is None:
        return None, None
    mu = torch.as_tensor(mu)
    muh = mu if muh is None else torch.as_tensor(muh)
    for nm, v in (("input_mean", mu), ("input_mean_hat", muh)):
        if tuple(v.shape) != (problem.n,):
            raise ValueError(f"layer {problem.name!r}: {nm} has shape {tuple(v.shape)}, expected ({problem.n},)")
    return mu, muh


def centered_problem(problem: LayerProblem, mu: torch.Tensor, muh: torch.Tensor) -> LayerProblem:
    """The layer problem with a free output bias eliminated: ``min_{W,b} ½‖W X̂ + b1ᵀ − W0 X‖²`` has
    ``b = W0 μ − W μ̂`` and leaves ``f_c(W)`` on the centred Grams ``H − Nμμᵀ``, ``Ĥ − Nμ̂μ̂ᵀ``, ``C − Nμμ̂ᵀ``."""
    N = float(problem.nsamples)
    if N <= 0:
        raise ValueError(f"layer {problem.name!r}: bias compensation needs problem.nsamples > 0")
    dt = problem.H.dtype
    mu, muh = mu.to(problem.H.device, dt), muh.to(problem.H.device, dt)
    H = problem.H - N * torch.outer(mu, mu)
    Hh = problem.Hh - N * torch.outer(muh, muh)
    C = problem.Cm - N * torch.outer(mu, muh)
    return LayerProblem(W0=problem.W0, H=H, Hhat=Hh, C=C, name=problem.name + "[centred]", damp=problem.damp,
                        nsamples=problem.nsamples, meta=dict(problem.meta))


def flap_scores(problem: LayerProblem, mu_hat: Optional[torch.Tensor], dtype) -> torch.Tensor:
    """Per-column fluctuation score ``Var(x̂_j)·‖W0_{:,j}‖²`` (FLAP's metric, sample variance over tokens)."""
    W0 = problem.W0.to(dtype)
    N = max(int(problem.nsamples), 1)
    second = problem.Hh.diagonal().to(dtype) / N
    var = second if mu_hat is None else (second - mu_hat.to(second) ** 2).clamp_min(0)
    return var * (W0 * W0).sum(0)


@register_method("flap", needs="gram", patterns=("groups",), structured=True,
                 program=lambda problem, pattern, **_: l0_program(problem, pattern),
                 description="FLAP-style fluctuation score Var(x_j)·‖W_{:,j}‖² with bias compensation")
def flap(problem: LayerProblem, pattern: Pattern, *, input_mean=None, input_mean_hat=None, refit: bool = False,
         dtype=None) -> LayerResult:
    st = group_setup(problem, pattern, "flap", dtype)
    with Timer() as t:
        mu, muh = input_means(problem, input_mean, input_mean_hat)
        dev = problem.H.device
        mu = None if mu is None else mu.to(dev, st.dtype)
        muh = None if muh is None else muh.to(dev, st.dtype)
        keep = keep_from_scores(st.group_sum(flap_scores(problem, muh, st.dtype)), st.k)
        cols = st.cols(keep)
        W = group_refit(problem, cols, st.dtype) if refit else problem.W0.to(st.dtype) * cols
        if mu is not None:
            # δb = E[W0 x − W x̂]: the removed inputs replaced by their means (the output bias gains δb)
            bias_delta = problem.W0.to(st.dtype) @ mu - W @ muh
        else:
            bias_delta = torch.zeros(st.m, dtype=st.dtype, device=dev)
    info = {"method": "flap" + ("+refit" if refit else ""), "time_s": t.elapsed,
            "bias_delta": bias_delta.to(problem.W0.dtype), "bias_compensation": mu is not None}
    res = finish_groups(problem, st, keep, W, info)
    if mu is not None and problem.nsamples > 0:
        # ½‖W X̂ + δb 1ᵀ − W0 X‖² = f(W) − ½ N ‖δb‖² for the optimal constant δb = W0 μ − W μ̂
        res.info["error_with_bias"] = res.info["error"] - 0.5 * problem.nsamples * float(
            (bias_delta.to(torch.float64) ** 2).sum())
    else:
        res.info["error_with_bias"] = res.info["error"]
        if mu is None:
            res.info["note"] = "no input mean given: variance taken as the raw second moment, no bias compensation"
    return res


# --------------------------------------------------------------------------------------------- group OBS
def _start_weights(problem: LayerProblem, A: torch.Tensor, dtype) -> torch.Tensor:
    """``W* = W0 C Ĥ⁻¹`` (the unconstrained optimum; ``W0`` without error correction), dead inputs zeroed."""
    if problem.corrected:
        L, _ = cholesky_with_retry(A, 0.0, name=problem.name)
        W = torch.cholesky_solve(problem.target(dtype).T, L).T
    else:
        W = problem.W0.to(dtype).clone()
    W[:, problem.dead_inputs()] = 0
    return W


@register_method("group_obs", needs="gram", patterns=("groups",), structured=True,
                 program=lambda problem, pattern, **_: l0_program(problem, pattern),
                 description="greedy group-OBS removal with Ĥ⁻¹ block updates (OSSCAR/ZipLM style), then refit",
                 options={"damp": Option(help="relative damping of Ĥ (default: the problem's)", range="[0, inf)"),
                          "threads": Option(help="torch CPU threads", range="[1, inf)")})
def group_obs(problem: LayerProblem, pattern: Pattern, *, damp: Optional[float] = None, dtype=None,
              refit: bool = True, threads: Optional[int] = None) -> LayerResult:
    """Backward elimination: at each step remove the group ``G`` minimising ``½ tr(W_G [Ĥ⁻¹_GG]⁻¹ W_Gᵀ)``.

    ``W`` is the optimal weight for the current support (of the damped ``Ĥ``), ``Ĥ⁻¹`` the inverse restricted
    to it; removing ``G`` updates ``W ← W − W_G [Ĥ⁻¹_GG]⁻¹ Ĥ⁻¹_{G,:}`` and downdates
    ``Ĥ⁻¹ ← Ĥ⁻¹ − Ĥ⁻¹_{:,G} [Ĥ⁻¹_GG]⁻¹ Ĥ⁻¹_{G,:}``. With error correction the sweep runs on
    ``W* = W0 C Ĥ⁻¹`` (``f(W) = ½ tr((W−W*)Ĥ(W−W*)ᵀ) + f(W*)``). Default dtype float64 on CPU (the downdates
    accumulate round-off); the final refit is the exact one of :func:`group_refit`.
    """
    dt = _work_dtype(problem, dtype) if dtype is not None else (
        torch.float64 if problem.H.device.type == "cpu" else _work_dtype(problem))
    st = group_setup(problem, pattern, "group_obs", dt)
    with cpu_threads(problem, threads), Timer() as t:
        d = problem.damp if damp is None else damp
        A = problem.damped_hessian(d, dtype=dt)
        L, d_used = cholesky_with_retry(A, 0.0, name=problem.name)
        Hinv = torch.cholesky_inverse(L)
        W = _start_weights(problem, A, dt)
        alive = torch.ones(st.g, dtype=torch.bool, device=st.device)
        uniform = bool((st.sizes == st.sizes[0]).all())
        if uniform:
            G = torch.tensor(st.groups, device=st.device)  # (g, s)
        single = uniform and int(G.shape[1]) == 1
        if single:  # one column per group: rank-1 updates in place (the common MLP-neuron case)
            col_of = G[:, 0]
            inf = torch.tensor(float("inf"), dtype=dt, device=st.device)
        for _step in range(st.g - st.k):
            if single:
                cost = 0.5 * (W * W).sum(0)[col_of] / Hinv.diagonal()[col_of].clamp_min(1e-300)
                gid = int(torch.argmin(torch.where(alive, cost, inf)))
                c = int(col_of[gid])
                u = Hinv[c].clone()
                h = float(u[c])
                W.addr_(W[:, c].clone(), u, alpha=-1.0 / h)
                Hinv.addr_(u, u, alpha=-1.0 / h)
                W[:, c] = 0
                Hinv[c, :] = 0
                Hinv[:, c] = 0
                Hinv[c, c] = 1.0
                alive[gid] = False
                continue
            ids = alive.nonzero().squeeze(1)
            if uniform:
                Gi = G[ids]  # (a, s)
                blocks = Hinv[Gi.unsqueeze(2), Gi.unsqueeze(1)]  # (a, s, s)
                Lb, info = torch.linalg.cholesky_ex(blocks)
                if int(info.max()) != 0:
                    raise NumericalError(f"layer {problem.name!r}: group-OBS block not positive definite")
                Wg = W[:, Gi].permute(1, 2, 0)  # (a, s, m)
                sol = torch.cholesky_solve(Wg, Lb)
                cost = 0.5 * (Wg * sol).sum((1, 2))
            else:
                cost = torch.empty(ids.numel(), dtype=dt, device=st.device)
                for a, gid in enumerate(ids.tolist()):
                    cg = torch.tensor(st.groups[gid], device=st.device)
                    Lg = torch.linalg.cholesky(Hinv[cg][:, cg])
                    cost[a] = 0.5 * (W[:, cg].T * torch.cholesky_solve(W[:, cg].T, Lg)).sum()
            gid = int(ids[int(torch.argmin(cost))])
            cg = torch.tensor(st.groups[gid], device=st.device)
            Lg = torch.linalg.cholesky(Hinv[cg][:, cg])
            rowsG = Hinv[cg].clone()  # (s, n)
            W.sub_(torch.cholesky_solve(W[:, cg].T, Lg).T @ rowsG)
            Hinv.sub_(rowsG.T @ torch.cholesky_solve(rowsG, Lg))
            W[:, cg] = 0
            Hinv[cg, :] = 0
            Hinv[:, cg] = 0
            Hinv[cg, cg] = 1.0  # keeps later blocks well defined; the group is never chosen again
            alive[gid] = False
        keep = alive
        if refit:
            W = group_refit(problem, st.cols(keep), dt)
    return finish_groups(problem, st, keep, W, {"method": "group_obs", "time_s": t.elapsed, "damp_used": d + d_used})
