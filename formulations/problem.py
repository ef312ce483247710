"""The shared layer problem (docs/methods.md §0).

A linear sub-layer computes ``y = W x`` with ``W`` of shape (m, n) (out x in, ``nn.Linear`` layout).
Calibration gives dense inputs ``X`` (n x N) and, when upstream sub-layers are already pruned, the
inputs ``X̂`` the pruned model actually feeds the layer. The target is the dense output ``W0 X``::

    f(W) = ½‖W X̂ − W0 X‖²_F = ½ tr(W Ĥ Wᵀ) − tr(W Cᵀ W0ᵀ) + ½ tr(W0 H W0ᵀ)
    H = X Xᵀ,  Ĥ = X̂ X̂ᵀ,  C = X X̂ᵀ,   ∇f(W) = W Ĥ − W0 C

Only the n x n Gram matrices are kept; the N tokens never need to be. Every method in optprune is a
constraint set or a regulariser on this one problem.

Conventions used everywhere in optprune:
  * Grams are *sums* over tokens (not means), so ``f`` is the plain squared reconstruction error.
  * ``Hhat``/``C`` are ``None`` when ``X̂ = X`` (no error correction): then ``Ĥ = C = H``.
  * Damping ``δ·mean(diag Ĥ)·I`` is applied by solvers (``damped_hessian``), never to ``f`` itself.
  * Dead inputs (``H_jj = 0``) carry no signal: their weights do not change ``f``; solvers set them to 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["LayerProblem", "GramAccumulator", "NumericalError", "cholesky_with_retry", "sym_rank_k_update_",
           "mirror_upper_"]


class NumericalError(RuntimeError):
    """A NaN/Inf or a factorisation that failed even after raising the damping."""


def _check_finite(t: torch.Tensor, what: str, name: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise NumericalError(f"layer {name!r}: {what} has {bad} non-finite entries (NaN/Inf)")


def cholesky_with_retry(
    A: torch.Tensor, damp: float = 0.01, *, name: str = "?", max_tries: int = 8, factor: float = 10.0
) -> tuple[torch.Tensor, float]:
    """Cholesky factor of ``A + δ·mean(diag A)·I``, raising δ by ``factor`` until it succeeds.

    Returns ``(L, δ_used)``. Raises :class:`NumericalError` naming the layer when every try fails.
    """
    _check_finite(A, "Gram matrix", name)
    n = A.shape[0]
    scale = A.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    d = float(damp)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(A + (d * scale) * eye)
        if int(info) == 0 and torch.isfinite(L).all():
            return L, d
        d = max(d * factor, 1e-8)
    raise NumericalError(f"layer {name!r}: Cholesky failed even with damping {d / factor:g}·mean(diag H)")


#: row-block width of the symmetric rank-k update (measured on CPU: 512-wide blocks keep the products near the
#: full product's rate while skipping most of the lower triangle; below ``SYRK_MIN_N`` the plain product is faster)
SYRK_BLOCK = 512
SYRK_MIN_N = 1024


def sym_rank_k_update_(S: torch.Tensor, x: torch.Tensor, *, block: int = SYRK_BLOCK,
                       min_n: int = SYRK_MIN_N) -> bool:
    """``S += xᵀx`` on the upper triangle only, for a token-major ``x`` (N, n): the rows of ``S`` in blocks of
    ``block``, each block updated from its diagonal to the last column, so a product of ``k = ⌈n/block⌉`` blocks
    costs ``(k+1)/(2k)`` of the full ``2Nn²`` FLOPs (a blocked *syrk*; torch has none). The strictly lower
    triangle is left stale: :func:`mirror_upper_` fills it. Every entry is the same sum over tokens in the
    same order as the full product's (same inner dimension), so the result matches it to the last bit on the
    BLAS backends we measured and to float tolerance anywhere.

    Below ``min_n`` columns, or off the CPU, the full product is used (returns False: ``S`` is whole)."""
    n = x.shape[1]
    if n < min_n or S.device.type != "cpu":
        S.addmm_(x.T, x)
        return False
    for a0 in range(0, n, block):
        a1 = min(n, a0 + block)
        S[a0:a1, a0:].addmm_(x[:, a0:a1].T, x[:, a0:])
    return True


def mirror_upper_(S: torch.Tensor, *, block: int = SYRK_BLOCK) -> torch.Tensor:
    """Copy the upper triangle of ``S`` onto its lower one in place (after :func:`sym_rank_k_update_`), one row
    block at a time (no n×n temporary)."""
    n = S.shape[0]
    for a0 in range(0, n, block):
        a1 = min(n, a0 + block)
        S[a1:, a0:a1].copy_(S[a0:a1, a1:].T)
        d = S[a0:a1, a0:a1]  # the diagonal block is a full product; symmetric as computed
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)
    return S


class GramAccumulator:
    """Streaming accumulation of H = Σ x xᵀ (and Ĥ, C for error-corrected inputs) in float32/64.

    ``add(x)`` takes dense inputs of shape (..., n); ``add(x, xhat)`` also the pruned-model inputs.
    Tokens are never stored. ``H`` and ``Ĥ`` are symmetric: they are accumulated as symmetric rank-k updates
    (:func:`sym_rank_k_update_`, the upper triangle) and completed when read; ``C`` is a full product.
    """

    def __init__(self, n: int, *, corrected: bool = False, dtype=torch.float32, device=None):
        self.n = n
        self.corrected = corrected
        self.dtype = dtype
        self._H = torch.zeros(n, n, dtype=dtype, device=device)
        self._Hhat = torch.zeros(n, n, dtype=dtype, device=device) if corrected else None
        self.C = torch.zeros(n, n, dtype=dtype, device=device) if corrected else None
        self.sq_norm = torch.zeros(n, dtype=dtype, device=device)  # Σ_t x_tj² (Wanda's ‖X_j‖²)
        self.nsamples = 0
        self._stale = set()  # which of H / Ĥ have a stale lower triangle

    def _whole(self, name: str) -> Optional[torch.Tensor]:
        t = getattr(self, name)
        if name in self._stale:
            mirror_upper_(t)
            self._stale.discard(name)
        return t

    @property
    def H(self) -> torch.Tensor:
        return self._whole("_H")

    @property
    def Hhat(self) -> Optional[torch.Tensor]:
        return self._whole("_Hhat") if self.corrected else None

    @torch.no_grad()
    def add(self, x: torch.Tensor, xhat: Optional[torch.Tensor] = None) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self._H.device, self.dtype)
        if sym_rank_k_update_(self._H, x):
            self._stale.add("_H")
        self.nsamples += x.shape[0]
        if self.corrected:
            if xhat is None:
                raise ValueError("corrected accumulator needs xhat")
            xh = xhat.reshape(-1, xhat.shape[-1]).to(self._H.device, self.dtype)
            if sym_rank_k_update_(self._Hhat, xh):
                self._stale.add("_Hhat")
            self.C.addmm_(x.T, xh)
            self.sq_norm += (xh * xh).sum(0)
        else:
            self.sq_norm += (x * x).sum(0)

    def problem(self, W0: torch.Tensor, *, name: str = "?", damp: float = 0.01) -> "LayerProblem":
        return LayerProblem(W0=W0, H=self.H, Hhat=self.Hhat, C=self.C, name=name, damp=damp,
                            nsamples=self.nsamples, input_sq_norm=self.sq_norm)


@dataclass
class LayerProblem:
    """One layer's reconstruction problem: ``W0`` and its Gram matrices.

    Parameters are stored as given; ``.to(dtype)`` makes a copy (float64 for references).
    ``input_sq_norm`` is ``Σ_t x̂_tj²`` (= diag Ĥ); kept separately only so that callers that
    accumulate it cheaply need not form Ĥ.
    """

    W0: torch.Tensor
    H: torch.Tensor
    Hhat: Optional[torch.Tensor] = None
    C: Optional[torch.Tensor] = None
    name: str = "layer"
    damp: float = 0.01
    nsamples: int = 0
    input_sq_norm: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        m, n = self.W0.shape
        for nm in ("H", "Hhat", "C"):
            t = getattr(self, nm)
            if t is not None and tuple(t.shape) != (n, n):
                raise ValueError(f"layer {self.name!r}: {nm} has shape {tuple(t.shape)}, expected ({n}, {n})")
        if (self.Hhat is None) != (self.C is None):
            raise ValueError(f"layer {self.name!r}: give both Hhat and C (error-corrected) or neither")
        _check_finite(self.W0, "weight", self.name)
        _check_finite(self.H, "Gram matrix H", self.name)
        if self.Hhat is not None:
            _check_finite(self.Hhat, "Gram matrix Ĥ", self.name)
            _check_finite(self.C, "cross Gram C", self.name)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_activations(cls, W0: torch.Tensor, X: torch.Tensor, Xhat: Optional[torch.Tensor] = None,
                         *, dtype=torch.float64, **kw) -> "LayerProblem":
        """Build from activations given as (N, n) token-major matrices (the transpose of METHODS' X)."""
        X = X.reshape(-1, X.shape[-1]).to(dtype)
        H = X.T @ X
        if Xhat is None:
            return cls(W0=W0.to(dtype), H=H, nsamples=X.shape[0], **kw)
        Xh = Xhat.reshape(-1, Xhat.shape[-1]).to(dtype)
        return cls(W0=W0.to(dtype), H=H, Hhat=Xh.T @ Xh, C=X.T @ Xh, nsamples=X.shape[0], **kw)

    @classmethod
    def random(cls, m: int, n: int, *, N: Optional[int] = None, seed: int = 0, kind: str = "random",
               corrected: bool = False, dtype=torch.float64) -> "LayerProblem":
        """Small synthetic instances for tests and the verify harness.

        kind: ``random`` (Gaussian), ``correlated`` (low-rank + noise inputs, ill-conditioned H),
        ``outliers`` (a few input features 20x larger, as in LLM activations), ``dead`` (some inputs 0).
        """
        g = torch.Generator().manual_seed(seed)
        N = N or max(4 * n, 64)
        W0 = torch.randn(m, n, generator=g, dtype=dtype)
        if kind == "random":
            X = torch.randn(N, n, generator=g, dtype=dtype)
        elif kind == "correlated":
            r = max(1, n // 4)
            X = torch.randn(N, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)
            X = X + 0.05 * torch.randn(N, n, generator=g, dtype=dtype)
        elif kind == "outliers":
            X = torch.randn(N, n, generator=g, dtype=dtype)
            idx = torch.randperm(n, generator=g)[: max(1, n // 16)]
            X[:, idx] *= 20.0
        elif kind == "dead":
            X = torch.randn(N, n, generator=g, dtype=dtype)
            idx = torch.randperm(n, generator=g)[: max(1, n // 8)]
            X[:, idx] = 0.0
        else:
            raise ValueError(f"unknown instance kind {kind!r}; choose random, correlated, outliers, dead")
        Xhat = X + 0.1 * torch.randn(N, n, generator=g, dtype=dtype) if corrected else None
        return cls.from_activations(W0, X, Xhat, dtype=dtype, name=f"{kind}-{m}x{n}-s{seed}")

    def to(self, dtype=None, device=None) -> "LayerProblem":
        f = lambda t: None if t is None else t.to(dtype=dtype or t.dtype, device=device or t.device)
        return LayerProblem(W0=f(self.W0), H=f(self.H), Hhat=f(self.Hhat), C=f(self.C), name=self.name,
                            damp=self.damp, nsamples=self.nsamples, input_sq_norm=f(self.input_sq_norm),
                            meta=dict(self.meta))

    def slice(self, rows=None, cols=None) -> "LayerProblem":
        """A sub-problem on some output rows and input columns (the other inputs treated as absent)."""
        rows = slice(None) if rows is None else rows
        cols = torch.arange(self.n) if cols is None else torch.as_tensor(cols)
        sub = lambda t: None if t is None else t[cols][:, cols]
        return LayerProblem(W0=self.W0[rows][:, cols], H=sub(self.H), Hhat=sub(self.Hhat), C=sub(self.C),
                            name=f"{self.name}[slice]", damp=self.damp, nsamples=self.nsamples,
                            input_sq_norm=None if self.input_sq_norm is None else self.input_sq_norm[cols])

    # ----------------------------------------------------------------- views
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W0.shape)

    @property
    def m(self) -> int:
        return self.W0.shape[0]

    @property
    def n(self) -> int:
        return self.W0.shape[1]

    @property
    def corrected(self) -> bool:
        return self.Hhat is not None

    @property
    def Hh(self) -> torch.Tensor:
        """Ĥ (= H without error correction)."""
        return self.H if self.Hhat is None else self.Hhat

    @property
    def Cm(self) -> torch.Tensor:
        """C (= H without error correction)."""
        return self.H if self.C is None else self.C

    def target(self, dtype=None) -> torch.Tensor:
        """``B = W0 C`` so that ``∇f(W) = W Ĥ − B``."""
        W0 = self.W0.to(dtype or self.H.dtype)
        return W0 @ self.Cm.to(W0.dtype)

    def col_norms(self) -> torch.Tensor:
        """‖X̂_j‖₂ per input column (Wanda / RIA activation norms)."""
        d = self.input_sq_norm if self.input_sq_norm is not None else self.Hh.diagonal()
        return d.clamp_min(0).sqrt()

    def dead_inputs(self) -> torch.Tensor:
        return self.Hh.diagonal() <= 0

    def damped_hessian(self, damp: Optional[float] = None, dtype=None) -> torch.Tensor:
        """``Ĥ + δ·mean(diag Ĥ)·I`` with dead inputs' diagonal set to 1 (their weights are zeroed)."""
        d = self.damp if damp is None else damp
        A = self.Hh.to(dtype or self.Hh.dtype).clone()
        dead = A.diagonal() <= 0
        A.diagonal().add_(d * A.diagonal().mean().clamp_min(1e-12))
        A.diagonal()[dead] = 1.0
        return A

    # ----------------------------------------------------------------- objective
    def constant(self) -> float:
        """½ tr(W0 H W0ᵀ) = f(0)."""
        W0 = self.W0.to(self.H.dtype)
        return 0.5 * float(((W0 @ self.H) * W0).sum())

    def objective(self, W: torch.Tensor, *, per_row: bool = False):
        """f(W) = ½‖W X̂ − W0 X‖²_F evaluated through the Grams (exact, in the Grams' dtype)."""
        dt = self.H.dtype
        W = W.to(dt)
        W0 = self.W0.to(dt)
        quad = ((W @ self.Hh) * W).sum(1)
        lin = ((W @ self.Cm.T) * W0).sum(1)
        const = ((W0 @ self.H) * W0).sum(1)
        rows = 0.5 * quad - lin + 0.5 * const
        rows = rows.clamp_min(0.0) if dt == torch.float64 else rows
        return rows if per_row else float(rows.sum())

    def report(self, W: torch.Tensor) -> tuple[float, float, float]:
        """``(f(W0), f(W), f(0))`` with their shared products computed once: each value as :meth:`objective`
        (per-row terms summed in the same order) and :meth:`constant` would give it, up to the order of the
        final sum for ``f(0)``. Without error correction ``f(W0) = 0`` exactly (``X̂ = X``), and ``W Ĥ`` serves as
        ``W Cᵀ``. Two products of ``m × n × n`` uncorrected, five corrected (seven as three separate calls)."""
        dt = self.H.dtype
        W, W0 = W.to(dt), self.W0.to(dt)
        const = ((W0 @ self.H) * W0).sum(1)
        WH = W @ self.Hh
        quad = (WH * W).sum(1)
        lin = ((WH if self.C is None else W @ self.C.T) * W0).sum(1)
        rows = 0.5 * quad - lin + 0.5 * const
        rows = rows.clamp_min(0.0) if dt == torch.float64 else rows
        if self.corrected:
            rows0 = 0.5 * ((W0 @ self.Hhat) * W0).sum(1) - ((W0 @ self.C.T) * W0).sum(1) + 0.5 * const
            before = float((rows0.clamp_min(0.0) if dt == torch.float64 else rows0).sum())
        else:
            before = 0.0
        return before, float(rows.sum()), 0.5 * float(const.sum())

    def gradient(self, W: torch.Tensor) -> torch.Tensor:
        dt = self.H.dtype
        return W.to(dt) @ self.Hh - self.W0.to(dt) @ self.Cm

    def relative_error(self, W: torch.Tensor) -> float:
        """f(W)/f(0): the share of the dense output's energy the pruned layer fails to reproduce."""
        c = self.constant()
        return self.objective(W) / c if c > 0 else 0.0

    def unconstrained_optimum(self, damp: float = 0.0) -> tuple[torch.Tensor, float]:
        """The best dense ``W* = W0 C Ĥ⁻¹`` and ``f(W*)``: a lower bound for every constrained model.

        Without error correction this is ``W0`` itself with ``f = 0``.
        """
        if not self.corrected:
            return self.W0.clone(), 0.0
        A = self.damped_hessian(damp if damp > 0 else 1e-10, dtype=torch.float64)
        L, _ = cholesky_with_retry(A, 0.0, name=self.name)
        B = self.target(torch.float64)
        Wstar = torch.cholesky_solve(B.T, L).T
        return Wstar.to(self.W0.dtype), self.objective(Wstar)

    def lower_bound(self) -> float:
        return self.unconstrained_optimum()[1]
