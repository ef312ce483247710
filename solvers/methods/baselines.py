"""Torch baselines (docs/methods.md §1): magnitude, Wanda, RIA, SparseGPT, and the least-squares refit.

All share the production signature ``fn(problem, pattern, **options) -> LayerResult`` and run on the
problem's device (CPU or CUDA) in float32 (or float64 when the problem is float64), whatever the model dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...formulations.grid import Quantized, Quantizer
from ...formulations.patterns import NM, ExpanderNM, Pattern, PatternError, Unstructured
from ...formulations.problem import LayerProblem, NumericalError, cholesky_with_retry
from ...formulations.programs import l0_program, refit_program
from ..base import LayerResult, Timer
from ..registry import Option, register_method

__all__ = ["magnitude", "wanda", "ria", "sparsegpt", "refit", "ria_scores", "wanda_scores", "score_prune", "work_dtype", "finish_layer"]


def work_dtype(problem: LayerProblem) -> torch.dtype:
    return torch.float64 if problem.H.dtype == torch.float64 else torch.float32


def finish_layer(problem: LayerProblem, W: torch.Tensor, mask: torch.Tensor, info: dict) -> LayerResult:
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {problem.name!r}: the pruned weights contain NaN/Inf")
    W = W * mask
    info.setdefault("error", problem.objective(W))
    info.setdefault("sparsity", 1.0 - float(mask.float().mean()))
    return LayerResult(W=W.to(problem.W0.dtype), mask=mask, info=info)


def _check_pattern(name: str, pattern: Pattern, ok=(Unstructured, NM)) -> None:
    if isinstance(pattern, ExpanderNM) or not isinstance(pattern, ok):
        raise PatternError(f"method {name!r} does not handle the {pattern.name} pattern")


def score_prune(problem: LayerProblem, pattern: Pattern, scores: torch.Tensor, name: str,
                do_refit: bool = False) -> LayerResult:
    """Keep the feasible mask of largest score, weights unchanged (or refitted)."""
    with Timer() as t:
        mask = pattern.project(scores)
        W = problem.W0.to(work_dtype(problem)) * mask
    info = {"method": name, "time_s": t.elapsed}
    res = finish_layer(problem, W, mask, info)
    return refit_result(problem, res) if do_refit else res


# --------------------------------------------------------------------------------------------- scores
def wanda_scores(problem: LayerProblem) -> torch.Tensor:
    return problem.W0.to(work_dtype(problem)).abs() * problem.col_norms().to(work_dtype(problem)).unsqueeze(0)


def ria_scores(problem: LayerProblem, a: float = 0.5) -> torch.Tensor:
    W = problem.W0.to(work_dtype(problem)).abs()
    ri = W / W.sum(0, keepdim=True).clamp_min(1e-12) + W / W.sum(1, keepdim=True).clamp_min(1e-12)
    return ri * problem.col_norms().to(W.dtype).pow(a).unsqueeze(0)


_REFIT_HELP = "finish with the exact least-squares refit on the chosen mask"


def _l0(problem: LayerProblem, pattern: Pattern, **_):
    """The declarative model every mask-selecting baseline approximates: the L0 program of its pattern."""
    return l0_program(problem, pattern)


@register_method("magnitude", program=_l0, needs="none", patterns=("unstructured", "row", "nm"),
                 description="zero the smallest |W_ij| (per matrix, per row, or per N:M group)",
                 options={"refit": _REFIT_HELP})
def magnitude(problem: LayerProblem, pattern: Pattern, *, refit: bool = False) -> LayerResult:
    _check_pattern("magnitude", pattern)
    return score_prune(problem, pattern, problem.W0.to(work_dtype(problem)).abs(), "magnitude", refit)


@register_method("wanda", program=_l0, needs="diag", patterns=("unstructured", "row", "nm"),
                 description="|W_ij|·‖X_j‖₂ compared within each output row; no weight update",
                 options={"refit": _REFIT_HELP})
def wanda(problem: LayerProblem, pattern: Pattern, *, refit: bool = False) -> LayerResult:
    _check_pattern("wanda", pattern)
    if isinstance(pattern, Unstructured) and pattern.scope == "matrix":
        pattern = Unstructured(pattern.sparsity, "row")  # Wanda's rule: compare within each output row
    return score_prune(problem, pattern, wanda_scores(problem), "wanda", refit)


@register_method("ria", program=_l0, needs="diag", patterns=("unstructured", "row", "nm"),
                 description="relative importance × ‖X_j‖^a (a = 0.5); no weight update",
                 options={"a": Option(help="exponent of the input norm", range="[0, inf)"), "refit": _REFIT_HELP})
def ria(problem: LayerProblem, pattern: Pattern, *, a: float = 0.5, refit: bool = False) -> LayerResult:
    _check_pattern("ria", pattern)
    return score_prune(problem, pattern, ria_scores(problem, a), "ria", refit)


# --------------------------------------------------------------------------------------------- SparseGPT
class SparseGPT:
    """SparseGPT (Frantar & Alistarh 2023) on the layer problem, as one readable class.

    With error-corrected inputs (Ĥ ≠ H) the objective is ``½ tr((W − W*) Ĥ (W − W*)ᵀ) + f(W*)`` with
    ``W* = W0 C Ĥ⁻¹``; the OBS sweep runs on W* with Ĥ, which is exactly SparseGPT on the corrected problem.
    Masks: chosen per block of ``blocksize`` columns by ``w²/[H⁻¹]_jj²`` (unstructured: across the whole
    block, with a running count so the matrix hits its exact target; per-row: per row; N:M: per row group).

    **Grids** (a :class:`~optprune.formulations.grid.Quantized` pattern, docs/methods.md §12): each kept weight is
    rounded to its nearest grid value where the sweep fixes its column, and the rounding error is propagated
    to the columns not yet fixed exactly like a pruning error — GPTQ on a dense base pattern, the joint
    SparseGPT + GPTQ on a sparse one. The grid's scales are fixed before the sweep (from the dense weights,
    or ``quantizer``). ``act_order`` visits columns by decreasing ``Ĥ_jj`` (GPTQ's activation order; each column
    keeps its own group's scale, so the saved layout is unchanged); not with N:M, whose groups are contiguous.
    """

    def __init__(self, problem: LayerProblem, pattern: Pattern, *, blocksize: int = 128,
                 damp: Optional[float] = None, act_order: bool = False, quantizer: Optional[Quantizer] = None,
                 name: str = "sparsegpt"):
        self.name = name
        self.quantizer = None
        if isinstance(pattern, Quantized):
            pattern.validate(problem.shape)
            self.quantizer = quantizer or pattern.quantizer(problem.W0, round_to=problem.meta.get("weight_dtype"))
            pattern = pattern.base
        _check_pattern(name, pattern)
        pattern.validate(problem.shape)
        if act_order and isinstance(pattern, NM):
            raise PatternError(f"method {name!r}: act_order visits columns out of order; N:M groups need them "
                               f"in order (use act_order=false)")
        self.act_order = bool(act_order)
        self.p, self.pattern = problem, pattern
        self.bs = blocksize
        if isinstance(pattern, NM) and blocksize % pattern.M:
            self.bs = (blocksize // pattern.M) * pattern.M or pattern.M
        self.damp = problem.damp if damp is None else damp
        self.dtype = work_dtype(problem)

    def _hinv_chol(self, perm=None):
        """Upper Cholesky factor of (Ĥ + δ I)⁻¹ (columns in the order ``perm``), damping raised on failure."""
        A = self.p.damped_hessian(0.0, dtype=self.dtype)
        if perm is not None:
            A = A[perm][:, perm]
        L, d = cholesky_with_retry(A, self.damp, name=self.p.name)
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        while int(info) != 0:  # rare: inverse not numerically PD; add more damping
            d *= 10
            L, d = cholesky_with_retry(A, d, name=self.p.name)
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        return U, d

    def _start_weights(self):
        W = self.p.W0.to(self.dtype).clone()
        if self.p.corrected:
            A = self.p.damped_hessian(dtype=self.dtype)
            L, _ = cholesky_with_retry(A, 0.0, name=self.p.name)
            W = torch.cholesky_solve(self.p.target(self.dtype).T, L).T
        W[:, self.p.dead_inputs()] = 0
        return W

    def run(self) -> LayerResult:
        with Timer() as t:
            m, n = self.p.shape
            W = self._start_weights()
            perm = None
            if self.act_order:  # GPTQ's order: the inputs with the most energy first
                perm = torch.argsort(self.p.Hh.diagonal().to(W.device), descending=True)
                W = W[:, perm]
            col = perm if perm is not None else torch.arange(n, device=W.device)
            qz = None if self.quantizer is None else self.quantizer.to(self.dtype, W.device)
            U, damp_used = self._hinv_chol(perm)
            mask = torch.ones(m, n, dtype=torch.bool, device=W.device)
            pat = self.pattern
            total_prune = m * n - pat.kept_count((m, n)) if isinstance(pat, Unstructured) and pat.scope == "matrix" else 0
            pruned = 0
            for i1 in range(0, n, self.bs):
                i2 = min(i1 + self.bs, n)
                W1 = W[:, i1:i2].clone()
                Q1 = torch.zeros_like(W1)
                Err1 = torch.zeros_like(W1)
                U1 = U[i1:i2, i1:i2]
                d = U1.diagonal()
                score = W1 ** 2 / d.unsqueeze(0) ** 2
                M1 = torch.ones_like(W1, dtype=torch.bool)
                if isinstance(pat, Unstructured) and pat.scope == "matrix":
                    k = int(pat.sparsity * m * i2) - pruned if i2 < n else total_prune - pruned
                    k = max(0, min(k, W1.numel()))
                    if k:
                        M1.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = False
                    pruned += k
                elif isinstance(pat, Unstructured):  # per row: exact per-row count via running totals
                    kr = int(pat.sparsity * i2) - int(pat.sparsity * i1) if i2 < n else \
                        int(pat.sparsity * n) - int(pat.sparsity * i1)
                    if kr:
                        M1.scatter_(1, torch.topk(score, kr, dim=1, largest=False).indices, False)
                for j in range(i2 - i1):
                    w = W1[:, j]
                    dj = d[j]
                    if isinstance(pat, NM) and j % pat.M == 0:  # N:M decided on the updated weights
                        sc = W1[:, j:j + pat.M] ** 2 / d[j:j + pat.M].unsqueeze(0) ** 2
                        M1[:, j:j + pat.M] = pat.project(sc)  # top-N per row (expander N:M: per tile)
                    q = w * M1[:, j]
                    if qz is not None:  # kept weights onto the grid; zero is a grid point
                        q = qz.round_column(q, int(col[i1 + j])) * M1[:, j]
                    Q1[:, j] = q
                    err = (w - q) / dj
                    W1[:, j:] -= err.unsqueeze(1) @ U1[j, j:].unsqueeze(0)
                    Err1[:, j] = err
                W[:, i1:i2] = Q1
                mask[:, i1:i2] = M1
                W[:, i2:] -= Err1 @ U[i1:i2, i2:]
            W = W * mask
            if perm is not None:
                inv = torch.argsort(perm)
                W, mask = W[:, inv], mask[:, inv]
        info = {"method": self.name, "time_s": t.elapsed, "damp_used": damp_used}
        if qz is not None:
            info.update(quant=qz.spec.name, act_order=self.act_order, qparams=self.quantizer)
        return finish_layer(self.p, W, mask, info)


@register_method("sparsegpt", program=_l0, needs="gram", patterns=("unstructured", "row", "nm", "grid"),
                 description="OBS column sweep with H⁻¹ (Cholesky), masks per 128-column block, lazy updates; "
                             "with --quant the joint SparseGPT + GPTQ",
                 options={"blocksize": Option(help="columns per mask-selection block", range="[1, inf)"),
                          "damp": Option(help="relative Hessian damping (default: the problem's)", range="[0, inf)"),
                          "refit": _REFIT_HELP})
def sparsegpt(problem: LayerProblem, pattern: Pattern, *, blocksize: int = 128, damp: Optional[float] = None,
              refit: bool = False) -> LayerResult:
    if refit and isinstance(pattern, Quantized):
        raise PatternError("sparsegpt: the least-squares refit moves weights off the grid; with --quant refit the "
                           "scales instead (method quant-refit)")
    res = SparseGPT(problem, pattern, blocksize=blocksize, damp=damp).run()
    return refit_result(problem, res) if refit else res


# --------------------------------------------------------------------------------------------- refit
def refit_weights(problem: LayerProblem, mask: torch.Tensor, *, damp: float = 0.0,
                  max_chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """Exact least-squares refit on a fixed support: per row ``W_S = B_S (Ĥ_SS)⁻¹`` with ``B = W0 C``.

    Rows are solved in batches as ``(D Ĥ D + (I − D)) w = D b`` (D = diag(mask_i)), which is Ĥ_SS on the
    support and the identity off it; a failed factorisation raises the damping (from ``1e-10`` relative).
    """
    dt = work_dtype(problem)
    m, n = problem.shape
    Hh = problem.Hh.to(dt)
    B = problem.target(dt)
    mask = mask.to(Hh.device).bool()
    W = torch.zeros(m, n, dtype=dt, device=Hh.device)
    scale = float(Hh.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(n, dtype=dt, device=Hh.device)
    chunk = max(1, int(max_chunk_bytes // (n * n * (8 if dt == torch.float64 else 4))))
    for r0 in range(0, m, chunk):
        Dm = mask[r0:r0 + chunk].to(dt)  # (c, n)
        A = Dm.unsqueeze(2) * Hh.unsqueeze(0) * Dm.unsqueeze(1)
        A = A + torch.diag_embed(1.0 - Dm)
        rhs = (B[r0:r0 + chunk] * Dm).unsqueeze(2)
        d = damp
        for _ in range(10):
            L, info = torch.linalg.cholesky_ex(A + (d * scale) * (Dm.unsqueeze(2) * eye))
            if int(info.max()) == 0:
                break
            d = max(d * 10, 1e-10)
        else:
            raise NumericalError(f"layer {problem.name!r}: refit factorisation failed (damping {d:g})")
        W[r0:r0 + chunk] = torch.cholesky_solve(rhs, L).squeeze(2) * Dm
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {problem.name!r}: refit produced NaN/Inf")
    return W


def refit_result(problem: LayerProblem, res: LayerResult) -> LayerResult:
    """Refit a method's result on its mask; keeps the better of the two (the refit cannot be worse)."""
    with Timer() as t:
        W = refit_weights(problem, res.mask)
    e_before = res.info.get("error", problem.objective(res.W))
    e_after = problem.objective(W)
    info = dict(res.info)
    info.update(error_before_refit=e_before, refit_time_s=t.elapsed)
    if e_after > e_before:  # only possible through round-off on a near-singular Ĥ
        info.update(error=e_before, refit_improved=False)
        return LayerResult(res.W, res.mask, info)
    info.update(error=e_after, refit_improved=True)
    return LayerResult(W.to(problem.W0.dtype), res.mask, info)


@register_method("refit", needs="gram", patterns=("unstructured", "row", "nm", "expander", "groups"),
                 program=lambda problem, pattern, mask=None, **_: refit_program(problem, mask),
                 description="least-squares refit of a given mask (default: the magnitude mask)",
                 options={"mask": "the mask to refit (API only)", "start": "method whose mask is refitted"})
def refit(problem: LayerProblem, pattern: Pattern, *, mask: Optional[torch.Tensor] = None,
          start: str = "magnitude") -> LayerResult:
    if mask is None:
        from ..registry import get_method
        mask = get_method(start)(problem, pattern).mask
    base = LayerResult(problem.W0 * mask, mask, {"method": f"refit({start})",
                                                   "error": problem.objective(problem.W0 * mask)})
    return refit_result(problem, base)

