"""FISTAPruner (docs/methods.md §2; Zhao et al., arXiv 2408.03728): the ℓ1 convex model solved by FISTA.

The model (``l1_program``)::

    min_W  F(W) = f(W) + λ‖W‖₁,    f(W) = ½‖W X̂ − W0 X‖²_F,   ∇f(W) = W Ĥ − W0 C

is solved by FISTA (Beck & Teboulle 2009) with constant step ``1/L``, ``L = λ_max(Ĥ)``, the prox of the
ℓ1 term (soft-thresholding at ``λ/L``) and adaptive restart (O'Donoghue & Candès 2015). One iteration on
the whole matrix is a single fused ``addmm`` plus a few in-place elementwise passes::

    Z  = Y (I − Ĥ/L) + W0 C / L          (= Y − ∇f(Y)/L; one (m×n)(n×n) matmul)
    W⁺ = soft(Z, λ/L)                    (torch softshrink, in place)
    restart if ⟨Y − W⁺, W⁺ − W⟩ > 0       (gradient restart: momentum dropped, t = 1)
    Y  = W⁺ + β (W⁺ − W),  β = (t−1)/t⁺

Numerics: iterates in float32 (float64 for float64 problems and for the pure solver :func:`fista_l1`);
``L`` and ``I − Ĥ/L`` formed in float64 and rounded once (``W0 C`` in the work dtype: it enters every
iteration at that precision anyway); objectives accumulated in float64 from the stable form
``½⟨EĤ, E⟩ + ⟨E, W0(Ĥ − C)⟩ + f(W0)`` (``E = W − W0``), which has no cancellation against ``½ tr(W0 H W0ᵀ)``.
``L`` is the largest eigenvalue of the **undamped** ``Ĥ`` — the model ``F`` has no damping (the ℓ1 term is the
regulariser), so ``1/L`` is exactly the step of FISTA's convergence theorem for this ``F``. It is computed
exactly (``eigvalsh``) for n ≤ 256 and otherwise by Lanczos (full reorthogonalisation, float64 tridiagonal
problem), as the top Ritz value plus its residual bound, raised by a 1e-3 safety factor (a Ritz value never
exceeds λ_max). Dead inputs (``Ĥ_jj = 0``) carry no signal: their weights are 0 at the optimum and are held at 0.
On CUDA the restart decision and the momentum coefficient stay on the device (no host sync per iteration).

The production method :func:`fista` (registered as ``"fista"``) adds what turns the convex model into a pruner:

* a warm start from SparseGPT (default; the paper's choice for OPT) or Wanda (the paper's for LLaMA);
* a per-layer search for λ over ``T`` rounds (default 3) of ``K`` FISTA iterations (default 20), each round
  started from the best rounded iterate so far (zeros are not frozen: soft-thresholding can revive them);
* after every round a hard projection to the exact target via the pattern (``pattern.project(|W|)``:
  unstructured per matrix or per row, any N:M);
* the best rounded iterate by ``f`` is kept; the result is never worse than the warm start (if it would be,
  the warm start is returned and ``info['returned_warm_start']`` says so);
* an optional least-squares refit on the chosen support (``refit=True``), measured separately
  (``info['error_before_refit']``, ``info['error_after_refit']``);
* an option *not in the paper*, ``debias_iters=k``: each rounded iterate (and the warm start) is debiased by
  ``k`` masked conjugate-gradient steps on its support before the comparison. Without it the rounded ℓ1
  iterates carry the ℓ1 shrinkage and rarely beat a SparseGPT warm start (docs/methods.md §2).

**[reconstructed] λ rule.** The paper reports bisection on λ with ``K = 20``, ``T = 3`` and a rounding-error
share threshold ``ξ = 0.3`` but its exact rule is not available offline. This implementation reads it as:
after round ``t`` with ``W_K`` (the ℓ1 iterate) and ``W_R`` (its projection), the *rounding-error share* is
``ρ = (f(W_R) − f(W_K)) / f(W_R)`` — the part of the rounded layer's error that the rounding added. ``ρ > ξ``
means the ℓ1 iterate was not sparse enough (λ too small): λ becomes a lower end of the bracket; otherwise λ
was large enough and becomes an upper end. The next λ is the geometric midpoint of the bracket, or λ·γ / λ/γ
(``lam_step`` γ, default 4) while one end is still open. The first λ (unless ``lam`` is given) is ``lam_scale``
times the *diagonal-model λ*: the s-quantile of ``|W0_ij|·Ĥ_jj`` — the λ at which the ℓ1 solution of the
separable (diagonal-Ĥ) model has exactly the target sparsity s. All of these are options, easy to swap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ...formulations.patterns import NM, ExpanderNM, Pattern, PatternError, Unstructured
from ...formulations.problem import LayerProblem, NumericalError
from ...formulations.programs import l1_kkt_residual, l1_program
from ..base import LayerResult, Timer, torch_threads
from ..registry import Option, get_method, register_method

__all__ = ["fista", "fista_l1", "L1Solution", "FistaEngine", "lipschitz_constant", "default_lambda",
           "soft_threshold", "ill_conditioned_problem", "l1_certificate", "L1Certificate"]


def soft_threshold(Z: torch.Tensor, tau: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sign(Z)·max(|Z| − τ, 0)`` — the prox of ``τ‖·‖₁`` (one fused kernel, in place when ``out is Z``)."""
    return torch._C._nn.softshrink(Z, float(tau), out=torch.empty_like(Z) if out is None else out)


def lipschitz_constant(H: torch.Tensor, *, method: str = "auto", iters: int = 100, tol: float = 1e-6,
                       safety: float = 1e-3, seed: int = 0) -> float:
    """``λ_max(H)`` of a symmetric PSD matrix: the Lipschitz constant of ``∇f`` (f's Hessian is Ĥ per row).

    ``method``: ``exact`` (float64 ``eigvalsh``), ``lanczos`` (Lanczos with full reorthogonalisation; matrix–
    vector products in H's dtype, the tridiagonal problem in float64; stops when the Ritz residual bound
    ``β_k |s_k|`` is below ``tol·θ``), or ``auto`` (exact for n ≤ 256, else Lanczos). A Ritz value ``θ`` never
    exceeds λ_max, so Lanczos returns ``(θ + β_k|s_k|)(1 + safety)``.
    """
    n = H.shape[0]
    if n == 0:
        return 0.0
    if method == "exact" or (method == "auto" and n <= 256):
        return float(torch.linalg.eigvalsh(H.to(torch.float64))[-1].clamp_min(0.0))
    if method not in ("lanczos", "power", "auto"):
        raise ValueError(f"unknown Lipschitz method {method!r}; use auto, exact or lanczos")
    f64 = torch.float64
    Hw = H if H.dtype in (torch.float32, torch.float64) else H.float()
    g = torch.Generator(device="cpu").manual_seed(seed)
    k_max = min(iters, n)
    Q = torch.zeros(k_max + 1, n, dtype=f64, device=H.device)
    q = torch.randn(n, generator=g, dtype=f64).to(H.device)
    Q[0] = q / q.norm()
    alpha, beta = [], []
    theta, bound = 0.0, math.inf
    for j in range(k_max):
        w = (Hw @ Q[j].to(Hw.dtype)).to(f64)
        a = float(Q[j] @ w)
        alpha.append(a)
        for _ in range(2):  # full reorthogonalisation (twice is enough)
            w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = float(w.norm())
        T = torch.diag(torch.tensor(alpha, dtype=f64))
        if j:
            off = torch.tensor(beta, dtype=f64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        ev, S = torch.linalg.eigh(T)
        theta = float(ev[-1])
        bound = b * abs(float(S[-1, -1]))
        if bound <= tol * max(abs(theta), 1e-300) or b <= 1e-14 * max(abs(theta), 1e-300):
            break
        beta.append(b)
        Q[j + 1] = w / b
    return max(theta + bound, 0.0) * (1.0 + safety)


def default_lambda(problem: LayerProblem, pattern: Pattern) -> float:
    """The diagonal-model λ: the s-quantile of ``|W0_ij|·Ĥ_jj`` (s = the pattern's target sparsity).

    For a diagonal Ĥ the ℓ1 solution is ``soft(W0_ij, λ/Ĥ_jj)``, zero exactly when ``|W0_ij| Ĥ_jj ≤ λ``; so this λ
    gives that model the target sparsity. It sets the scale of the λ search (the real Ĥ is not diagonal).
    """
    W0 = problem.W0.to(torch.float64)
    d = problem.Hh.diagonal().to(torch.float64).clamp_min(0.0)
    score = (W0.abs() * d.unsqueeze(0)).reshape(-1)
    s = pattern.target_sparsity(problem.shape)
    k = int(s * score.numel())
    if k <= 0:
        return float(score.min()) if score.numel() else 0.0
    return float(torch.kthvalue(score.cpu(), k).values)


# ----------------------------------------------------------------------------------------------- certificate
@dataclass
class L1Certificate:
    """A certified duality gap of ``W`` for ``min f(W) + λ‖W‖₁``: ``primal`` = F(W), ``dual`` = the value of a
    dual-feasible point (≤ the optimum F*), ``gap = primal − dual ≥ F(W) − F*`` and ``rel_gap = gap / primal``."""
    lam: float
    primal: float
    dual: float
    gap: float
    rel_gap: float

    def as_dict(self) -> dict:
        return {"lam": self.lam, "primal": self.primal, "dual": self.dual, "gap": self.gap, "rel_gap": self.rel_gap}


def _certify_rows(f_rows: torch.Tensor, G: torch.Tensor, W: torch.Tensor, lam: float) -> tuple[float, float]:
    """``(F(W), certified gap)`` from the per-row data error ``f_i``, the gradient ``G = ∇f(W) = WĤ − W0 C`` and W.

    Row i of the layer objective is a lasso ``½‖y − w A‖² + λ‖w‖₁`` (``y = w0 X``, ``A = X̂``) with residual
    ``r = y − wA``, ``‖r‖² = 2 f_i`` and ``rAᵀ = −g``. The scaled residual ``θ = s·r`` is dual feasible when
    ``|s|·‖g‖∞ ≤ λ``, and the dual value ``½‖y‖² − ½‖y − θ‖²`` gives the gap, in Gram quantities only::

        gap_i(s) = (1 − s)² f_i + λ‖w‖₁ + s⟨w, g⟩

    (zero at the optimum, where s = 1 and ⟨w, g⟩ = −λ‖w‖₁). s is the minimiser of this quadratic, clipped to the
    feasible interval. Everything in float64 (the caller passes float64 or accepts the work dtype's round-off).
    """
    f64 = torch.float64
    f = f_rows.to(f64).clamp_min(0.0)
    l1 = W.abs().sum(1, dtype=f64)
    wg = (W * G).sum(1, dtype=f64)
    gmax = G.abs().amax(1).to(f64)
    smax = torch.where(gmax > 0, lam / gmax.clamp_min(1e-300), torch.full_like(gmax, math.inf))
    s_opt = torch.where(f > 0, 1.0 - wg / (2.0 * f.clamp_min(1e-300)), -torch.sign(wg) * smax)
    s = torch.maximum(torch.minimum(s_opt, smax), -smax)
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    gap = (1.0 - s) ** 2 * f + lam * l1 + s * wg
    primal = float((f + lam * l1).sum())
    return primal, float(gap.sum())


def l1_certificate(problem: LayerProblem, lam: float, W: torch.Tensor) -> L1Certificate:
    """Certified duality gap of ``W`` for the ℓ1 model (float64; see :func:`_certify_rows`)."""
    f64 = torch.float64
    dev = problem.W0.device
    p = problem.to(f64)
    W = W.to(device=dev, dtype=f64)
    G = W @ p.Hh - p.W0 @ p.Cm
    f_rows = p.objective(W, per_row=True)
    primal, gap = _certify_rows(torch.as_tensor(f_rows, dtype=f64), G, W, float(lam))
    gap = max(gap, 0.0)  # weak duality; a negative value is float64 round-off
    return L1Certificate(float(lam), primal, primal - gap, gap, gap / primal if primal > 0 else 0.0)


def _few_threads(flops: float, device: torch.device):
    """Run tiny problems (one matmul below ~4 MFLOP) on one CPU thread: on a shared machine OpenMP's barrier
    waits make a 2-thread 8×24×24 matmul ~10× slower than a 1-thread one. Restores the thread count after."""
    return torch_threads(1 if (device.type == "cpu" and flops < 4e6) else None)


# ----------------------------------------------------------------------------------------------- engine
class FistaEngine:
    """FISTA on one layer's ℓ1 model with preallocated buffers (the whole matrix, all rows at once).

    Builds ``M = I − Ĥ/L`` (in float64, rounded once) and ``B/L = W0 C / L`` once, so that an iteration is
    ``addmm`` + softshrink + a restart test + one fused momentum update, all in place.
    ``objective`` evaluates ``f`` in the stable form ``½⟨EĤ, E⟩ + ⟨E, P⟩ + f(W0)`` (``E = W − W0``,
    ``P = W0 Ĥ − W0 C``) with float64 accumulation, one matmul per call.
    """

    def __init__(self, problem: LayerProblem, *, dtype: Optional[torch.dtype] = None, device=None,
                 L: Optional[float] = None, L_method: str = "auto"):
        p = problem
        self.problem = p
        self.device = torch.device(device) if device is not None else p.H.device
        self.dtype = dtype or (torch.float64 if p.H.dtype == torch.float64 else torch.float32)
        f64 = torch.float64
        Hh = p.Hh.to(self.device)
        Hh64 = Hh.to(f64)
        self.dead = Hh64.diagonal() <= 0
        with Timer() as t:
            self.L = float(L) if L is not None else lipschitz_constant(
                Hh if Hh.dtype == self.dtype else Hh.to(self.dtype), method=L_method)
        self.L_time_s = t.elapsed
        m, n = p.shape
        W0_64 = p.W0.to(self.device, f64)
        # B = W0 C: in the work dtype (it enters every iteration at that precision anyway)
        B = (p.W0.to(self.device, self.dtype) @ p.Cm.to(self.device, self.dtype)).to(f64)
        B[:, self.dead] = 0.0
        Lc = self.L if self.L > 0 else 1.0
        M = Hh64 * (-1.0 / Lc)
        M.diagonal().add_(1.0)
        M[self.dead] = 0.0
        M[:, self.dead] = 0.0
        self.M = M.to(self.dtype)
        self.Bs = (B / Lc).to(self.dtype)
        self.Hh = Hh.to(self.dtype)
        self.W0 = W0_64.to(self.dtype)
        if p.corrected:
            Cm64 = p.Cm.to(self.device, f64)
            self.P = (W0_64 @ (Hh64 - Cm64)).to(self.dtype)
            H64 = p.H.to(self.device, f64)
            K = Hh64 - Cm64 - Cm64.T + H64
            self.fW0_rows = 0.5 * ((W0_64 @ K) * W0_64).sum(1).clamp_min(0.0)
            self.fW0 = float(self.fW0_rows.sum())
            del H64, K
        else:
            self.P, self.fW0, self.fW0_rows = None, 0.0, None
        self.W = torch.empty(m, n, dtype=self.dtype, device=self.device)
        self.Y = torch.empty_like(self.W)
        self.Z = torch.empty_like(self.W)
        self.branchless = self.device.type != "cpu"  # no host sync per iteration on accelerators
        self.iterations = 0
        self.restarts = 0

    # -- objective pieces -------------------------------------------------------------------------
    def objective(self, W: torch.Tensor) -> float:
        """``f(W)`` (float64 accumulation of work-dtype products; one matmul)."""
        E = W.to(self.dtype) - self.W0
        EH = E @ self.Hh
        val = 0.5 * float(EH.mul_(E).sum(dtype=torch.float64))
        if self.P is not None:
            val += float((E * self.P).sum(dtype=torch.float64)) + self.fW0
        return max(val, 0.0)

    @torch.no_grad()
    def masked_cg(self, W: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
        """Debias a rounded iterate: ``iters`` steps of conjugate gradients on ``min f`` over the fixed support,
        all rows at once (row i solves ``Ĥ_SS w_S = (W0 C)_S`` with its own step sizes); one matmul per step.

        CG minimises f along each search direction, so f never increases (up to round-off). Not in the paper:
        an option (``debias_iters``) of this implementation, off by default.
        """
        m, n = self.W.shape
        with _few_threads(2.0 * m * n * n, self.device):
            Mk = mask.to(self.device, self.dtype)
            X = W.to(self.device, self.dtype) * Mk
            Lc = self.L if self.L > 0 else 1.0
            R = torch.addmm(self.Bs, X, self.Hh, alpha=-1.0 / Lc).mul_(Mk)   # (B − XĤ)/L on the support
            P = R.clone()
            rs = (R * R).sum(1, dtype=torch.float64)
            AP = torch.empty_like(X)
            tiny = torch.finfo(self.dtype).tiny
            for _ in range(iters):
                torch.mm(P, self.Hh, out=AP).mul_(Mk)
                den = (P * AP).sum(1, dtype=torch.float64) / Lc
                alpha = torch.where(den > 0, rs / den.clamp_min(tiny), torch.zeros_like(rs))
                X.addcmul_(P, alpha.to(self.dtype).unsqueeze(1))
                R.addcmul_(AP, (alpha / Lc).to(self.dtype).unsqueeze(1), value=-1.0)
                rs_new = (R * R).sum(1, dtype=torch.float64)
                beta = torch.where(rs > 0, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
                P.mul_(beta.to(self.dtype).unsqueeze(1)).add_(R)
                rs = rs_new
            if not torch.isfinite(X).all():
                raise NumericalError(f"layer {self.problem.name!r}: masked CG produced NaN/Inf")
            return X

    def l1_objective(self, W: torch.Tensor, lam: float) -> float:
        return self.objective(W) + lam * float(W.abs().sum(dtype=torch.float64))

    def relative_gap(self, W: torch.Tensor, lam: float) -> float:
        """The certified relative duality gap of ``W`` (work-dtype products, float64 sums; one matmul): the
        stopping test. :func:`l1_certificate` is the float64 certificate that is reported."""
        E = W.to(self.dtype) - self.W0
        EH = E @ self.Hh
        f_rows = 0.5 * (EH * E).sum(1, dtype=torch.float64)
        G = EH if self.P is None else EH.add_(self.P)  # ∇f(W) = EĤ + W0Ĥ − W0C
        if self.P is not None:
            f_rows = f_rows + (E * self.P).sum(1, dtype=torch.float64) + self.fW0_rows
        primal, gap = _certify_rows(f_rows, G, W, lam)
        return max(gap, 0.0) / primal if primal > 0 else 0.0

    # -- the iteration ----------------------------------------------------------------------------
    def run(self, W_start: torch.Tensor, lam: float, iters: int, **kw) -> torch.Tensor:
        m, n = self.W.shape
        with _few_threads(2.0 * m * n * n, self.device):
            return self._run(W_start, lam, iters, **kw)

    @torch.no_grad()
    def _run(self, W_start: torch.Tensor, lam: float, iters: int, *, restart: Union[bool, str] = True,
            tol: float = 0.0, check_every: int = 10, gap_tol: float = 0.0,
            on_iter: Optional[Callable[[int, torch.Tensor], Optional[float]]] = None) -> torch.Tensor:
        """``iters`` FISTA iterations at λ from ``W_start`` (momentum reset); returns the last iterate (a view of
        an internal buffer — copy it to keep it past the next call).

        ``restart``: ``True``/``"gradient"`` (⟨Y − W⁺, W⁺ − W⟩ > 0), ``"function"`` (F(W⁺) > F(W); needs
        ``on_iter`` to return F, one extra matmul per iteration), or ``False`` (plain FISTA).
        ``tol`` > 0 stops when ``‖W⁺ − W‖_F ≤ tol·‖W⁺‖_F``; ``gap_tol`` > 0 stops when the certified relative
        duality gap (:meth:`relative_gap`) is ≤ ``gap_tol`` (both checked every ``check_every`` iterations, not
        after the last; ``iters`` is the cap). ``self.last_gap_stop`` says whether the gap test stopped it.
        ``on_iter(k, W⁺)`` is called after every iteration (history recording).
        Long because the hot loop swaps its buffers in place and keeps the branchless form's device scalars in locals.
        """
        if lam < 0:
            raise ValueError(f"λ must be ≥ 0, got {lam}")
        mode = {True: "gradient", False: None, None: None}.get(restart, restart)
        if mode not in (None, "gradient", "function"):
            raise ValueError(f"restart must be True/'gradient', 'function' or False, got {restart!r}")
        if mode == "function" and on_iter is None:
            raise ValueError("function restart needs on_iter returning F(W)")
        W, Y, Z = self.W, self.Y, self.Z
        W.copy_(W_start.to(self.device, self.dtype))
        if self.dead.any():
            W[:, self.dead] = 0.0
        Y.copy_(W)
        tau = lam / self.L if self.L > 0 else 0.0
        Wv = None
        branchless = self.branchless and mode != "function"
        if branchless:
            tt = torch.ones((), dtype=torch.float64, device=self.device)
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            one = torch.ones((), dtype=torch.float64, device=self.device)
            nrest = torch.zeros((), dtype=torch.int64, device=self.device)
        t = 1.0
        F_prev = None
        done = 0
        self.last_gap_stop = False
        for k in range(iters):
            torch.addmm(self.Bs, Y, self.M, out=Z)                 # Z = Y − ∇f(Y)/L
            soft_threshold(Z, tau, out=Z)                          # Z = W⁺
            torch.sub(Z, W, out=W)                                 # W buffer := D = W⁺ − W
            D = W
            if branchless:
                t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * tt * tt))
                beta = (tt - 1.0) / t_new
                if mode == "gradient":
                    r = torch.vdot(Y.view(-1), D.view(-1)) - torch.vdot(Z.view(-1), D.view(-1))
                    cond = r > 0
                    beta = torch.where(cond, zero, beta)
                    t_new = torch.where(cond, one, t_new)
                    nrest += cond
                torch.addcmul(Z, D, beta.to(self.dtype), out=Y)
                tt = t_new
                Fk = on_iter(k, Z) if on_iter is not None else None
            else:
                t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
                beta = (t - 1.0) / t_new
                Fk = on_iter(k, Z) if on_iter is not None else None
                do_restart = False
                if mode == "gradient":
                    r = float(torch.vdot(Y.view(-1), D.view(-1))) - float(torch.vdot(Z.view(-1), D.view(-1)))
                    do_restart = r > 0
                elif mode == "function":
                    do_restart = F_prev is not None and Fk is not None and Fk > F_prev
                    F_prev = Fk
                if do_restart:
                    beta, t_new = 0.0, 1.0
                    self.restarts += 1
                torch.add(Z, D, alpha=beta, out=Y)                 # Y = W⁺ + β D
                t = t_new
            W, Z = Z, W                                            # W := W⁺, Z := scratch (holds D)
            done = k + 1
            if tol > 0 and done % check_every == 0:
                dn = float(torch.linalg.vector_norm(Z))
                wn = float(torch.linalg.vector_norm(W))
                if dn <= tol * max(wn, 1e-300):
                    break
            if gap_tol > 0 and done % check_every == 0 and done < iters:
                if self.relative_gap(W, lam) <= gap_tol:
                    self.last_gap_stop = True
                    break
        if branchless:
            self.restarts += int(nrest)
        self.W, self.Z = W, Z
        self.iterations += done
        self.last_iters = done
        if not torch.isfinite(W).all():
            raise NumericalError(f"layer {self.problem.name!r}: FISTA iterate has NaN/Inf (λ={lam:g}, L={self.L:g})")
        return W


# ----------------------------------------------------------------------------------------------- pure solver
@dataclass
class L1Solution:
    """Result of :func:`fista_l1`: ``W``, ``objective`` = F(W) (float64), per-iteration ``history`` of F
    (entry 0 is F(W_init)) when asked, iterations run, whether the tolerance was met, the KKT residual."""
    W: torch.Tensor
    objective: float
    history: Optional[list]
    iterations: int
    converged: bool
    kkt: float
    L: float
    restarts: int
    time_s: float = 0.0
    certificate: Optional[L1Certificate] = None

    def __iter__(self):  # ``W, hist = fista_l1(...)``
        yield self.W
        yield self.history


def fista_l1(problem: LayerProblem, lam: float, W_init: Optional[torch.Tensor] = None, iters: int = 20000,
             tol: float = 1e-12, restart: Union[bool, str] = True, history: bool = False, *,
             dtype: torch.dtype = torch.float64, device=None, L: Optional[float] = None,
             L_method: str = "auto", check_every: int = 10, gap_tol: float = 0.0) -> L1Solution:
    """Solve ``min f(W) + λ‖W‖₁`` to high accuracy (float64 by default) — the convex model, no rounding.

    Used by the cross-checks against cvxpy and by the convergence benchmark. ``W_init`` defaults to ``W0``.
    Stops after ``iters`` iterations, when the relative step falls below ``tol``, or when the certified relative
    duality gap falls below ``gap_tol`` (> 0); the returned ``certificate`` is the float64 duality gap of ``W``.
    """
    with Timer() as t:
        eng = FistaEngine(problem, dtype=dtype, device=device, L=L, L_method=L_method)
        W_init = problem.W0 if W_init is None else W_init
        hist = None
        on_iter = None
        if history or restart == "function":
            hist = [eng.l1_objective(W_init.to(eng.device, eng.dtype) * (~eng.dead), lam)]

            def on_iter(k, Wk):
                F = eng.l1_objective(Wk, lam)
                hist.append(F)
                return F
        W = eng.run(W_init, lam, iters, restart=restart, tol=tol, check_every=check_every, gap_tol=gap_tol,
                    on_iter=on_iter)
        W = W.clone()
        converged = eng.last_iters < iters
        obj = eng.l1_objective(W, lam)
    kkt = l1_kkt_residual(problem, lam, W)
    return L1Solution(W=W, objective=obj, history=hist if history else None, iterations=eng.last_iters,
                      converged=converged, kkt=kkt, L=eng.L, restarts=eng.restarts, time_s=t.elapsed,
                      certificate=l1_certificate(problem, lam, W))


def ill_conditioned_problem(m: int, n: int, cond: float = 1e5, *, seed: int = 0, scale: float = 100.0,
                            dtype=torch.float64) -> LayerProblem:
    """A layer problem whose Gram has eigenvalues log-spaced over ``[scale/cond, scale]`` (random eigenvectors):
    the strongly ill-conditioned instance of the convergence checks (``LayerProblem.random`` has κ ≈ 1e3–1e4)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    ev = scale * torch.logspace(0.0, -math.log10(cond), n, dtype=torch.float64)
    H = (Q * ev) @ Q.T
    H = 0.5 * (H + H.T)
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    return LayerProblem(W0=W0.to(dtype), H=H.to(dtype), name=f"ill-conditioned-{m}x{n}-k{cond:g}")


# ----------------------------------------------------------------------------------------------- pruner
def _check_pattern(pattern: Pattern) -> None:
    if isinstance(pattern, ExpanderNM) or not isinstance(pattern, (Unstructured, NM)):
        raise PatternError(f"method 'fista' does not handle the {pattern.name} pattern "
                           f"(unstructured, per-row or N:M)")


def _warm_start(problem: LayerProblem, pattern: Pattern, warm_start, warm_options: dict):
    """The warm-start LayerResult and the FISTA starting point."""
    if isinstance(warm_start, LayerResult):
        return warm_start, warm_start.W, "given"
    name = str(warm_start or "sparsegpt").strip().lower()
    if name in ("dense", "none"):  # start the iterations from W0; the reference is its magnitude projection
        res = get_method("magnitude")(problem, pattern)
        return res, problem.W0, "dense"
    if name == "fista":
        raise ValueError("fista cannot warm-start from itself")
    res = get_method(name)(problem, pattern, **(warm_options or {}))
    return res, res.W, name


def _feasible_warm(problem: LayerProblem, pattern: Pattern, warm: LayerResult) -> tuple[LayerResult, bool]:
    """The warm start as a feasible point of ``pattern``: a warm start that keeps too many weights (Wanda's
    per-row rule under a per-matrix target keeps up to m−1 extra) is projected by magnitude first."""
    if pattern.is_feasible(warm.mask.to(torch.bool)):
        return warm, False
    mask = pattern.project(warm.W.abs() * warm.mask)
    W = warm.W * mask
    return LayerResult(W, mask, {"error": problem.objective(W)}), True


@register_method("fista", needs="gram", patterns=("unstructured", "row", "nm"),
                 program=lambda problem, pattern, lam=None, **_: l1_program(
                     problem, default_lambda(problem, pattern) if lam is None else float(lam)),
                 description="FISTAPruner: ℓ1 convex model by FISTA (restart, one matmul per iteration), "
                             "λ bisection, hard projection to the exact pattern, warm start SparseGPT/Wanda",
                 options_from="_fista", l1_solver=fista_l1,
                 options={"warm_start": "sparsegpt | wanda | magnitude | ria | dense",
                          "iters": Option(help="iterations per round (K)", range="[0, inf)"),
                          "rounds": Option(help="rounds (T)", range="[0, inf)"),
                          "xi": Option(help="rounding-error share threshold ξ", range="(0, 1)"),
                          "lam": Option(help="first λ (default lam_scale × the diagonal-model λ)", range="[0, inf)"),
                          "lam_scale": Option(help="first λ as a multiple of the diagonal-model λ", range="[0, inf)"),
                          "lam_step": Option(help="λ bracket growth", range="(1, inf)"),
                          "restart": "gradient restart", "refit": "final least-squares refit",
                          "debias_iters": Option(help="masked-CG steps on every rounded iterate", range="[0, inf)"),
                          "dtype": "solve dtype",
                          "device": "solve on this device", "warm_options": "options of the warm-start method",
                          "gap_tol": Option(help="stop a round once the certified relative ℓ1 duality gap is ≤ this "
                                                 "(iters: cap)", range="[0, inf)"),
                          "check_every": Option(help="iterations between duality-gap checks", range="[1, inf)")})
def fista(problem: LayerProblem, pattern: Pattern, **options) -> LayerResult:
    """FISTAPruner on one layer (see the module docstring for the algorithm and its reconstructed λ rule).

    Options (all reachable as ``-O key=value``): ``warm_start`` (sparsegpt | wanda | magnitude | ria | dense),
    ``iters`` (K, iterations per round, default 20), ``rounds`` (T, default 3), ``xi`` (ξ, default 0.3), ``lam``
    (first λ; default ``lam_scale`` (0.1) × the diagonal-model λ), ``lam_step`` (bracket growth, 4),
    ``restart`` (gradient restart, on), ``refit`` (final least-squares refit, off), ``debias_iters`` (masked-CG
    steps on every rounded iterate before it is compared, 0 = the paper's rule), ``dtype`` (float32 for float32
    problems), ``device`` (solve there, return on the problem's device), ``warm_options`` (dict for the warm
    start method), ``gap_tol`` (each round stops once the certified relative duality gap of its ℓ1 model is ≤ this;
    default 1e-6, ``iters`` stays the cap; checked every ``check_every`` = 10 iterations). ``info['l1_certificate']``
    is the certified duality gap of the last round's ℓ1 iterate at its λ (:func:`l1_certificate`).
    """
    m, n = problem.shape
    dev = torch.device(options["device"]) if options.get("device") is not None else problem.H.device
    with _few_threads(2.0 * m * n * n, dev):  # tiny layers: warm start, refit and all on one thread
        return _fista(problem, pattern, **options)


def _check_options(problem: LayerProblem, pattern: Pattern, iters: int, rounds: int, xi: float,
                   lam_step: float) -> None:
    _check_pattern(pattern)
    pattern.validate(problem.shape)
    if iters < 0 or rounds < 0:
        raise ValueError(f"iters and rounds must be ≥ 0, got {iters}, {rounds}")
    if not (0.0 < xi < 1.0):
        raise ValueError(f"xi (rounding-error share threshold) must be in (0, 1), got {xi}")
    if lam_step <= 1.0:
        raise ValueError(f"lam_step must be > 1, got {lam_step}")


def _rounded(eng: "FistaEngine", pattern: Pattern, WK: torch.Tensor, debias_iters: int):
    """The ℓ1 iterate ``WK`` projected onto the pattern (and debiased): ``(W, mask, error, record)``, the record
    holding the rounding-error share of the rounded error, the errors and the ℓ1 iterate's nonzero count."""
    mask = pattern.project(WK.abs())
    WR = WK * mask
    fK, fR = eng.objective(WK), eng.objective(WR)
    share = (fR - fK) / fR if fR > 0 else 0.0
    entry = {"share": share, "error_l1": fK, "error_rounded": fR, "nonzero_l1": int((WK != 0).sum())}
    fC = fR
    if debias_iters > 0:
        WR = eng.masked_cg(WR, mask, debias_iters)
        fC = eng.objective(WR)
        entry["error_debiased"] = fC
    return WR, mask, fC, entry


def _next_lambda(lam: float, lo: float, hi: float, more: bool, step: float, first: float) -> tuple:
    """λ's bracket search: ``more`` (rounding did too much of the work) raises the lower end to λ, otherwise the
    upper end comes down to λ; the next λ is the bracket's geometric mean, or a ``step`` beyond its one finite
    end (``first``·step when neither end is positive). Returns ``(λ, lo, hi)``."""
    if more:
        lo = lam      # rounding does too much of the work: more ℓ1 pressure
    else:
        hi = lam      # ℓ1 iterate already (nearly) as sparse as the target: less shrinkage
    if lo > 0 and math.isfinite(hi):
        return math.sqrt(lo * hi), lo, hi
    if math.isfinite(hi):
        return (hi / step if hi > 0 else 0.0), lo, hi
    return (lo * step if lo > 0 else first * step), lo, hi


def _refit(work: LayerProblem, W: torch.Tensor, mask: torch.Tensor, err: float, info: dict) -> tuple:
    """The exact least-squares refit on ``mask``, kept when it lowers the error; recorded in ``info``."""
    from .baselines import refit_weights
    with Timer() as t_rf:
        Wr = refit_weights(work, mask)
    e_rf = work.objective(Wr)
    info.update(error_before_refit=err, error_after_refit=e_rf, refit_time_s=t_rf.elapsed, refit_improved=e_rf < err)
    if e_rf < err:
        return Wr.to(work.W0.dtype), e_rf
    return W, err


def _fista(problem: LayerProblem, pattern: Pattern, *, warm_start="sparsegpt", iters: int = 20, rounds: int = 3,
          xi: float = 0.3, lam: Optional[float] = None, lam_scale: float = 0.1, lam_step: float = 4.0,
          restart: Union[bool, str] = True, refit: bool = False, debias_iters: int = 0,
          dtype: Optional[torch.dtype] = None, device=None, warm_options: Optional[dict] = None,
          gap_tol: float = 1e-6, check_every: int = 10) -> LayerResult:
    _check_options(problem, pattern, iters, rounds, xi, lam_step)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    home = problem.W0.device
    work = problem if device is None else problem.to(device=torch.device(device))
    if isinstance(refit, str):
        refit = refit.strip().lower() in ("1", "true", "yes")

    with Timer() as t_all:
        with Timer() as t_ws:
            warm, start, ws_name = _warm_start(work, pattern, warm_start, warm_options or {})
            warm, warm_projected = _feasible_warm(work, pattern, warm)
            if ws_name != "dense":
                start = warm.W
        e_warm = float(warm.info["error"]) if "error" in warm.info else work.objective(warm.W)
        eng = FistaEngine(work, dtype=dtype)
        lam_ref = default_lambda(work, pattern)
        lam_t = float(lam) if lam is not None else lam_scale * lam_ref
        if not math.isfinite(lam_t) or lam_t < 0:
            raise ValueError(f"λ must be a finite number ≥ 0, got {lam_t}")
        lo, hi = 0.0, math.inf
        best_W, best_mask = warm.W.to(eng.device, eng.dtype), warm.mask.to(eng.device)
        best_f, best_round = eng.objective(best_W), 0
        cur = start
        log = []
        if debias_iters > 0:  # round 0: the debiased warm start is a candidate too
            Wd = eng.masked_cg(best_W, best_mask, debias_iters)
            fd = eng.objective(Wd)
            log.append({"round": 0, "error_rounded": best_f, "error_debiased": fd})
            if fd < best_f:
                best_W, best_f, best_round = Wd, fd, -1
                cur = Wd if ws_name != "dense" else cur
        cert, gap_stops = None, 0
        for r in range(1, rounds + 1):
            WK = eng.run(cur, lam_t, iters, restart=restart, gap_tol=float(gap_tol), check_every=int(check_every))
            gap_stops += int(eng.last_gap_stop)
            if r == rounds:  # the certified duality gap of the last ℓ1 iterate, at its λ (float64)
                cert = l1_certificate(work, lam_t, WK).as_dict()
                cert.update(iterations=eng.last_iters, stopped_on_gap=eng.last_gap_stop)
            WR, mask, fC, entry = _rounded(eng, pattern, WK, debias_iters)
            entry = {"round": r, "lam": lam_t, **entry}
            share = entry["share"]
            improved = fC < best_f
            entry["improved"] = improved
            log.append(entry)
            if improved:
                best_W, best_mask, best_f, best_round = WR, mask, fC, r
            cur = best_W  # the next round starts from the best rounded iterate
            lam_t, lo, hi = _next_lambda(lam_t, lo, hi, share > xi, lam_step, lam_ref * lam_scale)
        W = best_W.to(work.W0.dtype)
        mask = best_mask
        err = work.objective(W)
        returned_warm = best_round == 0 or err > e_warm  # (-1: the debiased warm start, not the warm start)
        why = None
        if returned_warm:
            why = "no round beat the warm start" if best_round == 0 else \
                "the selected iterate's exact error is above the warm start's"
            W, mask, err = warm.W.to(work.W0.dtype), warm.mask, e_warm
        info = {"method": "fista", "warm_start": ws_name, "warm_error": e_warm, "warm_time_s": t_ws.elapsed,
                "lambda_ref": lam_ref, "rounds": log, "best_round": 0 if returned_warm else best_round,
                "returned_warm_start": returned_warm, "fallback_reason": why, "warm_projected": warm_projected,
                "L": eng.L, "L_time_s": eng.L_time_s,
                "iterations": eng.iterations, "restarts": eng.restarts, "iters": iters, "xi": xi,
                "debias_iters": debias_iters, "gap_tol": float(gap_tol), "gap_stops": gap_stops,
                "l1_certificate": cert,
                "dtype": str(eng.dtype).replace("torch.", "")}
        if refit:
            W, err = _refit(work, W, mask, err, info)
    W = W * mask.to(W.device)
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {problem.name!r}: FISTA result has NaN/Inf")
    info.update(error=err, sparsity=1.0 - float(mask.float().mean()), time_s=t_all.elapsed)
    return LayerResult(W=W.to(home), mask=mask.to(home), info=info)
