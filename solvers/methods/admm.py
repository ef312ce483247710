"""ALPS-class ADMM for the L0-constrained layer problem (Meng, Behdin, Wang, Mazumder 2024), the production solver.

The model is the L0 mask-and-weights program (``l0_program``) that SparseGPT, Wanda, ... approximate::

    min_W  f(W) = ½‖W X̂ − W0 X‖²_F      s.t.  W ∈ S  (‖W‖₀ ≤ k per matrix or per row, N:M, expander N:M)

**Splitting.** ``W = D`` with ``D ∈ S``; the augmented Lagrangian ``f(W) + ⟨V, W − D⟩ + ρ/2 ‖W − D‖²`` gives the
iteration (rows of ``W`` are the output channels; ``B = W0 C`` so that ``∇f(W) = W Ĥ − B``)::

    W ← (B − V + ρ D) (Ĥ + ρ I)⁻¹              (one (m×n)(n×n) matmul)
    D ← Π_S(W + V/ρ)                           (pattern.project of the magnitudes: top-k, N:M, expander tiles)
    V ← V + ρ (W − D)

**Numerics, as in ALPS.** ``Ĥ`` is ridge-damped (``δ·mean(diag Ĥ)``, δ = the problem's ``damp``, 1% by default)
and rescaled to unit diagonal (``s = sqrt(diag)``, ``W ↦ W·diag(s)``): ρ is then scale-free and the magnitude
projection in the scaled coordinates ranks ``|W_ij|·‖X̂_j‖`` (Wanda's score). One eigendecomposition
``Ĥ = Q Λ Qᵀ`` (float64) is computed per layer and reused for every ρ: ``(Ĥ + ρI)⁻¹ = Q (Λ + ρ)⁻¹ Qᵀ`` costs one
n³ matmul when ρ changes (every ``update_iter`` iterations), never a new factorisation. A failed
eigendecomposition is retried with ten times the damping.

**ρ schedule and stopping rule (ALPS).** Every ``update_iter`` (3) iterations the support change
``c = |supp D Δ supp D_prev|`` relative to the kept count ``k`` sets ρ: ×1.3 if ``c/k > 0.1``, ×1.2 if
``c/k > 0.005``, ×1.1 if ``c ≥ 1``; with no change the solver stops once ρ has started to grow. Before ρ has
grown, a support that barely moves means ρ is too large to explore: ρ ÷ 5 (and, for small changes, a restart from
the initial point). ρ is capped at ``rho_max``; the run also stops after ``switch_iter`` iterations once
``c/k < 3·10⁻⁴``, and after ``max_iter`` iterations in any case.

**Final refit.** The last ``W`` is projected on ``S`` and refitted on that support: ``pcg`` (default) runs batched
preconditioned conjugate gradients on all rows at once (Jacobi preconditioner = the unit-diagonal scaling; row
``i`` solves ``Ĥ_SS w_S = B_S`` over its own support, warm-started from the ADMM iterate), ``cholesky`` the exact
refit (``baselines.refit_weights``), ``none`` keeps the projected iterate. The refit solves the undamped ``f``
unless ``refit_damp`` > 0.

**Warm start.** ``warm_start=sparsegpt`` (default), ``fista``, ``wanda``, ``magnitude``, ``ria``, ``dense``, or (from
Python) a feasible :class:`LayerResult`. A warm start
``W_ws`` initialises ``D = W_ws`` and the dual at ``V = −∇f(W_ws)`` (so the first W-update returns ``W_ws`` and
the first D-update is a projected-gradient step from it); ``dense`` is ALPS' own start (``W = D = Π_S(W*)``,
``V = 0``, ``W*`` the dense optimum, = ``W0`` without error correction). The warm start (and its PCG refit) stay
candidates: the method returns the best of them by ``f``, never worse than its warm start.

Error-corrected inputs: with ``Ĥ ≠ H`` everything above uses ``Ĥ`` and ``B = W0 C`` — the same problem.

**Grids** (``--quant``, docs/methods.md §12): the same iteration over grid ∩ pattern. The D-update is the exact
Euclidean projection onto that set in the scaled coordinates — each entry's nearest grid value
``s_j·Q(z/s_j)``, kept where the base pattern's projection of the gains ``z² − (z − s_j Q(z/s_j))²`` keeps it —
and the ρ schedule counts the entries of D that changed (code or support). No refit (it would leave the grid);
the warm start is GPTQ (``sparsegpt``/``gptq``; ``rtn``; ``dense``) and stays a candidate: the result is never
worse than it.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ...formulations.grid import Quantized
from ...formulations.patterns import NM, ExpanderNM, Pattern, PatternError, Unstructured
from ...formulations.problem import LayerProblem, NumericalError
from ...formulations.programs import l0_program
from ..base import LayerResult, Timer, torch_threads
from ..registry import Option, get_method, register_method

__all__ = ["admm", "AdmmL0", "masked_pcg", "WARM_STARTS", "REFITS"]

WARM_STARTS = ("sparsegpt", "fista", "wanda", "magnitude", "ria", "dense")
REFITS = ("pcg", "cholesky", "none")


def masked_pcg(A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor, X0: torch.Tensor, *, iters: int = 20,
               rtol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """Batched Jacobi-preconditioned CG for ``min ½ x_i A x_iᵀ − b_i x_iᵀ`` over each row's support.

    Row ``i`` of ``X`` solves ``A_SS x_S = b_S`` (``S`` = ``mask[i]``), all rows at once: one (m×n)(n×n) matmul per
    step, per-row step sizes. Stops when every row's residual is below ``rtol·‖b_S‖`` or after ``iters`` steps.
    CG minimises the quadratic along each search direction, so the objective never increases (up to round-off).
    Returns ``(X, steps)``.
    """
    Mk = mask.to(A.dtype)
    d = A.diagonal().clamp_min(torch.finfo(A.dtype).tiny).unsqueeze(0)
    X = X0 * Mk
    R = (B - X @ A) * Mk
    bn = torch.linalg.vector_norm(B * Mk, dim=1, dtype=torch.float64)
    Z = R / d
    P = Z.clone()
    rz = (R * Z).sum(1, dtype=torch.float64)
    tiny = 1e-300
    steps = 0
    for steps in range(1, iters + 1):
        AP = (P @ A).mul_(Mk)
        den = (P * AP).sum(1, dtype=torch.float64)
        alpha = torch.where(den > 0, rz / den.clamp_min(tiny), torch.zeros_like(rz))
        X.addcmul_(P, alpha.to(X.dtype).unsqueeze(1))
        R.addcmul_(AP, alpha.to(X.dtype).unsqueeze(1), value=-1.0)
        if bool((torch.linalg.vector_norm(R, dim=1, dtype=torch.float64) <= rtol * bn).all()):
            break
        Z = R / d
        rz_new = (R * Z).sum(1, dtype=torch.float64)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        P.mul_(beta.to(X.dtype).unsqueeze(1)).add_(Z)
        rz = rz_new
    if not bool(torch.isfinite(X).all()):
        raise NumericalError("masked PCG produced NaN/Inf")
    return X, steps


def _work_dtype(problem: LayerProblem, dtype=None) -> torch.dtype:
    if isinstance(dtype, str):
        try:
            dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        except KeyError:
            raise ValueError(f"admm: dtype must be float32 or float64, got {dtype!r}") from None
    if dtype is not None:
        return dtype
    return torch.float64 if problem.H.dtype == torch.float64 else torch.float32


class AdmmL0:
    """The scaled layer problem, its eigendecomposition and the ADMM iteration (see the module docstring)."""

    def __init__(self, problem: LayerProblem, pattern: Pattern, *, damp: Optional[float] = None,
                 dtype=None, max_damp_tries: int = 8):
        self.p, self.pattern = problem, pattern
        self.dt = _work_dtype(problem, dtype)
        f64 = torch.float64
        Hh = problem.Hh.to(f64)
        self.dead = Hh.diagonal() <= 0
        d = problem.damp if damp is None else float(damp)
        if not (d >= 0) or math.isinf(d):
            raise ValueError(f"admm: damp must be a finite number ≥ 0, got {damp!r}")
        for _ in range(max_damp_tries):
            A = problem.damped_hessian(d, dtype=f64)
            s = A.diagonal().clamp_min(1e-300).sqrt()
            An = A / s.unsqueeze(0) / s.unsqueeze(1)
            An = 0.5 * (An + An.T)
            try:
                evals, Q = torch.linalg.eigh(An)
                if bool(torch.isfinite(evals).all()) and bool(torch.isfinite(Q).all()):
                    break
            except RuntimeError:  # torch.linalg.LinAlgError: eigh did not converge
                pass
            d = max(10.0 * d, 1e-8)
        else:
            raise NumericalError(f"layer {problem.name!r}: eigendecomposition failed even with damping {d:g}")
        self.damp_used = d
        self.s64 = s
        self.s = s.to(self.dt)
        self.evals = evals.clamp_min(0.0)
        self.Q = Q.to(self.dt)  # (Ĥ + ρI)⁻¹ is formed in the work dtype: an n³ matmul per ρ change
        self.An = An.to(self.dt)
        B = problem.target(f64)
        B[:, self.dead] = 0.0
        self.Bn = (B / s.unsqueeze(0)).to(self.dt)
        self.k = max(1, pattern.kept_count(problem.shape))
        self.grid = None  # a grid's quantizer (set by the caller for a quantized pattern)
        self._rho = None
        self._inv = None

    # scaled ↔ original coordinates
    def scale(self, W: torch.Tensor) -> torch.Tensor:
        return W.to(self.dt) * self.s.unsqueeze(0)

    def unscale(self, Wn: torch.Tensor) -> torch.Tensor:
        W = Wn / self.s.unsqueeze(0)
        W[:, self.dead] = 0.0
        return W

    def inverse(self, rho: float) -> torch.Tensor:
        """``(Ĥ + ρI)⁻¹`` in scaled coordinates from the stored eigendecomposition (cached per ρ)."""
        if rho != self._rho:
            inv_ev = (1.0 / (self.evals + rho)).to(self.dt)
            self._inv = (self.Q * inv_ev.unsqueeze(0)) @ self.Q.T
            self._rho = rho
        return self._inv

    def project(self, Zn: torch.Tensor) -> torch.Tensor:
        pat = self.pattern
        if type(pat) is Unstructured and pat.scope == "matrix":
            # per-matrix top-k by a threshold (k-th value): a large-k topk is the slowest step of an iteration
            p = pat.prune_count(Zn.numel())
            if p <= 0:
                return torch.ones_like(Zn, dtype=torch.bool)
            a = Zn.abs()
            flat = a.reshape(-1)
            if flat.device.type == "cpu":  # numpy's introselect: ~15x faster than torch.kthvalue on a CPU
                import numpy as np
                thr = float(np.partition(flat.detach().numpy(), p - 1)[p - 1])
            else:
                thr = torch.kthvalue(flat, p).values
            return a > thr  # keeps ≤ numel − p (fewer only on exact ties at the threshold)
        return pat.project(Zn.abs())

    def gradient(self, Wn: torch.Tensor) -> torch.Tensor:
        return Wn @ self.An - self.Bn

    def project_point(self, Zn: torch.Tensor) -> torch.Tensor:
        """``Π(Z)`` in scaled coordinates: ``Z`` on the mask of the pattern, or on grid ∩ pattern (module doc)."""
        if self.grid is None:
            return Zn * self.project(Zn)
        s = self.s.unsqueeze(0)
        R = self.grid.round(Zn / s) * s
        gain = Zn * Zn - (Zn - R) ** 2
        return R * self.pattern.base.project(gain)

    def run(self, W_init: torch.Tensor, D_init: torch.Tensor, V_init: torch.Tensor, *, rho: float,
            rho_max: float, max_iter: int, update_iter: int, switch_iter: int) -> tuple[torch.Tensor, dict]:
        W0n, D0n, V0n = W_init, D_init, V_init
        W, D, V = W0n.clone(), D0n.clone(), V0n.clone()
        key = (lambda X: X) if self.grid is not None else (lambda X: X != 0)  # grid: codes move, not only supports
        supp_prev = key(D)
        grown = False
        it = 0
        restarts = 0
        stop = "max_iter"
        history = []
        for it in range(1, max_iter + 1):
            W = (self.Bn - V).add_(D, alpha=rho) @ self.inverse(rho)
            Z = W + V / rho
            D = self.project_point(Z)
            V.add_(W - D, alpha=rho)
            if it % update_iter:
                continue
            supp = key(D)
            change = int((supp != supp_prev).sum())
            supp_prev = supp
            ratio = change / self.k
            history.append((it, rho, change))
            if ratio > 0.1:
                grown, rho = True, rho * 1.3
            elif ratio > 0.005:
                grown, rho = True, rho * 1.2
            elif change >= 1:
                if grown:
                    rho *= 1.1
                else:  # barely moving before ρ ever grew: ρ too large to explore; restart smaller
                    rho /= 5.0
                    restarts += 1
                    W, D, V = W0n.clone(), D0n.clone(), V0n.clone()
                    supp_prev = key(D)
            else:
                if grown:
                    stop = "support_fixed"
                    break
                rho /= 5.0
            rho = min(max(rho, 1e-8), rho_max)  # (floor: repeated ÷5 must not overflow (Λ + ρ)⁻¹)
            if it >= switch_iter and ratio < 3e-4:
                stop = "support_settled"
                break
            if not bool(torch.isfinite(W).all()):
                raise NumericalError(f"layer {self.p.name!r}: ADMM iterate has NaN/Inf (ρ={rho:g})")
        return W, {"iterations": it, "rho_final": rho, "stop": stop, "restarts": restarts,
                   "schedule": history[-50:]}

    def refit(self, Wn: torch.Tensor, mask: torch.Tensor, *, iters: int, rtol: float,
              refit_damp: float) -> tuple[torch.Tensor, int]:
        A = self.An
        if refit_damp != self.damp_used:  # the undamped (or differently damped) Ĥ in scaled coordinates
            A64 = self.p.damped_hessian(refit_damp, dtype=torch.float64)
            A = (A64 / self.s64.unsqueeze(0) / self.s64.unsqueeze(1)).to(self.dt)
        return masked_pcg(A, self.Bn, mask, Wn, iters=iters, rtol=rtol)


def _warm(problem: LayerProblem, pattern: Pattern, name, options: dict) -> Optional[LayerResult]:
    if name == "dense":
        return None
    res = name if isinstance(name, LayerResult) else get_method(name)(problem, pattern, **(options or {}))
    if not pattern.is_feasible(res.mask.to(torch.bool)):  # e.g. Wanda's per-row rule under a per-matrix target
        mask = pattern.project(res.W.abs() * res.mask)
        res = LayerResult(res.W * mask, mask, {"error": problem.objective(res.W * mask)})
    return res


_OPTIONS = ("warm_start", "warm_options", "rho", "rho_max", "max_iter", "update_iter", "switch_iter", "damp",
            "refit", "refit_damp", "pcg_iters", "pcg_rtol", "dtype", "threads", "candidates", "swaps")


@register_method("admm", needs="gram", patterns=("unstructured", "row", "nm", "expander", "grid"),
                 program=lambda problem, pattern, **_: l0_program(problem, pattern),
                 description="ALPS-class ADMM on the L0 program (W = D, D in the pattern; one eigendecomposition, "
                             "ρ schedule on support change, PCG refit), warm start SparseGPT",
                 options_from="_admm",
                 options={"rho": Option(help="first ρ (scaled units)", range="(0, inf)"),
                          "rho_max": Option(help="largest ρ", range="(0, inf)"),
                          "max_iter": Option(help="ADMM iterations", range="[0, inf)"),
                          "update_iter": Option(help="iterations between ρ updates", range="[1, inf)"),
                          "switch_iter": Option(help="iteration from which ρ grows on every update",
                                                range="[0, inf)"),
                          "damp": Option(help="ADMM ridge (default: the problem's)", range="[0, inf)"),
                          "refit": Option(help="final refit on the support", choices=REFITS),
                          "refit_damp": Option(help="ridge of the final refit", range="[0, inf)"),
                          "pcg_iters": Option(help="PCG steps of the refit", range="[0, inf)"),
                          "pcg_rtol": Option(help="PCG relative tolerance", range="[0, inf)"),
                          "threads": Option(help="torch CPU threads", range="[1, inf)")})
def admm(problem: LayerProblem, pattern: Pattern, **options) -> LayerResult:
    """ADMM for the L0 layer problem (module docstring). Options (``-O key=value``): ``warm_start``
    (sparsegpt | fista | wanda | magnitude | ria | dense, or a feasible LayerResult), ``warm_options`` (dict for the warm-start method), ``rho``
    (first ρ, 0.1 scaled units), ``rho_max`` (1e6), ``max_iter`` (300), ``update_iter`` (3), ``switch_iter`` (30),
    ``damp`` (ADMM ridge, default the problem's), ``refit`` (pcg | cholesky | none), ``refit_damp`` (0),
    ``pcg_iters`` (20), ``pcg_rtol`` (1e-5), ``dtype`` (float32 | float64), ``threads`` (torch CPU threads),
    ``candidates`` (Python: more feasible LayerResults compared at the end, as they are and PCG-refitted),
    ``swaps`` (polish the chosen support by exact 1-swaps, docs/methods.md §9)."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"admm: unknown option(s) {', '.join(unknown)}; valid: {', '.join(_OPTIONS)}")
    if isinstance(pattern, Quantized):
        unused = sorted(set(options) - set(_GRID_OPTIONS))
        if unused:
            raise ValueError(f"admm: {', '.join(unused)} do not apply with a grid (--quant; no refit); valid: "
                             f"{', '.join(_GRID_OPTIONS)}")
        with torch_threads(options.get("threads")):
            return _admm_grid(problem, pattern, **options)
    with torch_threads(options.get("threads")):
        return _admm(problem, pattern, **options)


_GRID_OPTIONS = ("warm_start", "rho", "rho_max", "max_iter", "update_iter", "switch_iter", "damp", "dtype",
                 "threads")
_GRID_WARM = {"sparsegpt": "gptq", "gptq": "gptq", "rtn": "rtn", "dense": None}


def _admm_grid(problem: LayerProblem, pattern: Quantized, *, warm_start="sparsegpt", rho: float = 0.1,
               rho_max: float = 1e6, max_iter: int = 300, update_iter: int = 3, switch_iter: int = 30,
               damp: Optional[float] = None, dtype=None, threads: Optional[int] = None) -> LayerResult:
    """ADMM over grid ∩ pattern (module doc): the scales are the layer's fixed ones (those of the warm start)."""
    ws = str(warm_start or "dense").strip().lower()
    if ws not in _GRID_WARM:
        raise ValueError(f"admm: with a grid, warm_start is one of {', '.join(_GRID_WARM)}; got {warm_start!r}")
    if not (rho > 0 and rho_max >= rho and max_iter >= 0 and update_iter >= 1 and switch_iter >= 0):
        raise ValueError("admm: need rho > 0, rho_max ≥ rho, max_iter ≥ 0, update_iter ≥ 1, switch_iter ≥ 0")
    pattern.validate(problem.shape)
    with Timer() as t_all:
        warm = get_method(_GRID_WARM[ws])(problem, pattern) if _GRID_WARM[ws] else None
        qz = warm.info["qparams"] if warm is not None else \
            pattern.quantizer(problem.W0, round_to=problem.meta.get("weight_dtype"))
        eng = AdmmL0(problem, pattern, damp=damp, dtype=dtype)
        eng.grid = qz.to(eng.dt, eng.s.device)
        if warm is None:
            W = eng.Bn @ eng.inverse(1e-8) if problem.corrected else eng.scale(problem.W0)
            W[:, eng.dead] = 0.0
            D = eng.project_point(W)
            V = torch.zeros_like(W)
        else:
            D = eng.scale(warm.W)
            W = D.clone()
            V = -eng.gradient(D)
        Wn, stats = eng.run(W, D, V, rho=float(rho), rho_max=float(rho_max), max_iter=int(max_iter),
                            update_iter=int(update_iter), switch_iter=int(switch_iter))
        Dn = eng.project_point(Wn)
        mask = Dn != 0
        Wq = eng.grid.round(eng.unscale(Dn)) * mask  # exactly on the grid (undo the scaling's round-off)
        e = problem.objective(Wq)
        best = ("admm", Wq, mask, e)
        if warm is not None and warm.info["error"] < e:
            best = ("warm_start", warm.W.to(Wq.dtype), warm.mask, warm.info["error"])
    info = {"method": "admm", "time_s": t_all.elapsed, "error": best[3], "chosen": best[0], "error_admm": e,
            "error_warm": None if warm is None else warm.info["error"], "warm_start": ws, "quant": qz.spec.name,
            "qparams": qz, **{k: v for k, v in stats.items() if k != "schedule"}}
    W = best[1]
    info.setdefault("sparsity", 1.0 - float(best[2].float().mean()))
    return LayerResult(W.to(problem.W0.dtype), best[2], info)


def _check_admm(problem: LayerProblem, pattern: Pattern, warm_start, refit: str, rho: float, rho_max: float,
                max_iter: int, update_iter: int, switch_iter: int, pcg_iters: int, refit_damp: float) -> tuple:
    """``(given warm start or None, warm-start name, refit)`` after checking every option (a one-line error)."""
    if not isinstance(pattern, (Unstructured, NM)):  # ExpanderNM is an NM
        raise PatternError(f"method 'admm' does not handle the {pattern.name} pattern "
                           f"(unstructured, per-row, N:M or expander N:M)")
    pattern.validate(problem.shape)
    given = warm_start if isinstance(warm_start, LayerResult) else None
    ws = "given" if given is not None else str(warm_start or "dense").strip().lower()
    if given is not None:
        if tuple(given.W.shape) != tuple(problem.shape) or not pattern.is_feasible(given.mask.to(torch.bool)):
            raise PatternError(f"admm: the given warm start is not a feasible {pattern.name} point of this layer")
    elif ws not in WARM_STARTS:
        raise ValueError(f"admm: unknown warm_start {warm_start!r}; choose one of {', '.join(WARM_STARTS)}")
    if ws in ("wanda", "magnitude", "ria", "sparsegpt", "fista") and isinstance(pattern, ExpanderNM):
        raise PatternError(f"admm: warm start {ws!r} does not give expander masks; use warm_start=dense "
                           f"(or the eggs method with update=admm)")
    rf = str(refit).strip().lower()
    if rf not in REFITS:
        raise ValueError(f"admm: unknown refit {refit!r}; choose one of {', '.join(REFITS)}")
    if not (rho > 0 and rho_max >= rho and max_iter >= 0 and update_iter >= 1 and switch_iter >= 0
            and pcg_iters >= 0 and refit_damp >= 0):
        raise ValueError("admm: need rho > 0, rho_max ≥ rho, max_iter ≥ 0, update_iter ≥ 1, switch_iter ≥ 0, "
                         "pcg_iters ≥ 0, refit_damp ≥ 0")
    return given, ws, rf


def _admm(problem: LayerProblem, pattern: Pattern, *, warm_start: Union[str, LayerResult] = "sparsegpt",
          warm_options: Optional[dict] = None, rho: float = 0.1, rho_max: float = 1e6, max_iter: int = 300,
          update_iter: int = 3, switch_iter: int = 30, damp: Optional[float] = None, refit: str = "pcg",
          refit_damp: float = 0.0, pcg_iters: int = 20, pcg_rtol: float = 1e-5, dtype=None,
          candidates: Optional[list] = None, threads: Optional[int] = None, swaps: bool = False) -> LayerResult:
    # (``threads`` is applied by admm(), the registered wrapper)
    given, ws, rf = _check_admm(problem, pattern, warm_start, refit, rho, rho_max, max_iter, update_iter, switch_iter,
                                pcg_iters, refit_damp)
    m, n = problem.shape
    with Timer() as t_all:
        with Timer() as t_ws:
            warm = _warm(problem, pattern, given if given is not None else ws, warm_options or {})
        with Timer() as t_eig:
            eng = AdmmL0(problem, pattern, damp=damp, dtype=dtype)
        dt = eng.dt
        if warm is None:  # ALPS: from the dense optimum of the (damped) problem
            W = eng.Bn @ eng.inverse(1e-8) if problem.corrected else eng.scale(problem.W0)
            W[:, eng.dead] = 0.0
            D = W * eng.project(W)
            V = torch.zeros_like(W)
        else:
            D = eng.scale(warm.W)
            W = D.clone()
            V = -eng.gradient(D)
        with Timer() as t_admm:
            Wn, stats = eng.run(W, D, V, rho=float(rho), rho_max=float(rho_max), max_iter=int(max_iter),
                                update_iter=int(update_iter), switch_iter=int(switch_iter))
        mask = eng.project(Wn)
        Wn = Wn * mask
        e_admm = problem.objective(eng.unscale(Wn))
        steps = 0
        with Timer() as t_rf:
            if rf == "pcg":
                Wn, steps = eng.refit(Wn, mask, iters=int(pcg_iters), rtol=float(pcg_rtol),
                                      refit_damp=float(refit_damp))
            elif rf == "cholesky":
                from .baselines import refit_weights
                Wn = eng.scale(refit_weights(problem, mask, damp=float(refit_damp)))
        W_admm = eng.unscale(Wn)
        cands = [("admm", W_admm, mask, problem.objective(W_admm))]
        others = ([("warm_start", warm)] if warm is not None else []) + \
            [(f"candidate{i}", c) for i, c in enumerate(candidates or [])]
        for label, c in others:  # the warm start and any given feasible points, as they are and refitted
            cm = c.mask.to(torch.bool)
            if not pattern.is_feasible(cm):
                raise PatternError(f"admm: {label} is not a feasible {pattern.name} point of this layer")
            cands.append((label, c.W.to(dt) * cm, cm, problem.objective(c.W * cm)))
            if rf != "none":
                Wr, _ = eng.refit(eng.scale(c.W) * cm, cm, iters=int(pcg_iters), rtol=float(pcg_rtol),
                                  refit_damp=float(refit_damp))
                Wr = eng.unscale(Wr)
                cands.append((f"{label}+refit", Wr, cm, problem.objective(Wr)))
        chosen, W, mask, err = min(cands, key=lambda c: c[3])
        swap_info = {}
        if swaps:  # the final support, polished until 1-swap locally optimal (its refit can only be lower)
            from .swaps import polish
            pol = polish(problem, pattern, LayerResult(W.to(problem.W0.dtype), mask, {"error": err}))
            swap_info = {k: pol.info[k] for k in ("swaps", "moves_between_rows", "certified_1swap", "swap_time_s")}
            if pol.info["error"] < err:
                chosen, W, mask, err = f"{chosen}+swaps", pol.W.to(dt), pol.mask, pol.info["error"]
    W = W * mask.to(W.device)
    if not bool(torch.isfinite(W).all()):
        raise NumericalError(f"layer {problem.name!r}: ADMM result has NaN/Inf")
    info = {"method": "admm", "warm_start": ws, "chosen": chosen, "error": err,
            "error_admm_before_refit": e_admm, "error_admm": cands[0][3],
            "warm_error": None if warm is None else cands[1][3],
            "candidates_given": len(candidates or []), "damp_used": eng.damp_used,
            "refit": rf, "pcg_steps": steps, "sparsity": 1.0 - float(mask.float().mean()),
            "time_s": t_all.elapsed, "warm_time_s": t_ws.elapsed, "eig_time_s": t_eig.elapsed,
            "admm_time_s": t_admm.elapsed, "refit_time_s": t_rf.elapsed, "dtype": str(dt).replace("torch.", "")}
    info.update(stats)
    info.update(swap_info)
    return LayerResult(W=W.to(problem.W0.dtype), mask=mask, info=info)
