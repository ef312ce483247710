"""Scale refit: optimised grid scales for fixed integer codes (docs/methods.md §12).

With the codes ``q`` and the mask fixed, a quantized row ``w_i = Σ_g s_ig v_ig`` is linear in its scales
(``v_ig`` = the row's ``q − z0`` on the inputs of group ``g``, zero elsewhere), so the layer objective is a small
convex quadratic in them, separable by rows::

    f_i(s_i) = ½ s_iᵀ A_i s_i − c_iᵀ s_i + const,   A_i[g, h] = v_igᵀ Ĥ v_ih,   c_i[g] = v_igᵀ b_i   (b = W0 C)

and :func:`refit_scales` solves ``A_i s_i = c_i`` exactly for every row (G×G systems, batched; one m·n² matmul
builds all ``A_i``). Groups whose codes are all at the zero point keep their scale (it does not change W).

The method ``quant-refit`` alternates: a start method (``gptq`` by default) chooses codes on the grid with
scales from the dense weights; the scales are refitted; the start method runs again on the refitted grid
(new codes); ... for ``rounds`` rounds, keeping the best point by ``f``. Each refit can only lower ``f`` for its
codes; the result is never worse than the start. Its weights lie on the layer's *refitted* grid — the scales
are variables here, so this method solves a larger model than the fixed-scale grid program.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...formulations.grid import Quantizer
from ...formulations.patterns import Pattern, PatternError
from ...formulations.problem import LayerProblem
from ..base import LayerResult, Timer
from ..registry import get_method, register_method
from .baselines import SparseGPT, finish_layer, work_dtype
from .gptq import require_grid

__all__ = ["refit_scales", "quant_refit"]

STARTS = ("gptq", "sparsegpt", "rtn")


def refit_scales(problem: LayerProblem, quantizer: Quantizer, W: torch.Tensor, *,
                 round_to: Optional[torch.dtype] = None) -> Quantizer:
    """The least-squares scales for the codes of ``W`` (on ``quantizer``'s grid; zeros stay zero): the exact
    minimiser of ``f`` over the scales (module doc), rounded to ``round_to`` when given."""
    dt = work_dtype(problem) if problem.H.dtype != torch.float32 else torch.float64  # small systems: float64
    qz = quantizer.to(dt, problem.H.device)
    Wd = W.to(dt).to(problem.H.device)
    m, n = Wd.shape
    gs, G = qz.gs, n // qz.gs
    P = (qz.codes(Wd) - qz.zeros_full(dtype=dt)) * (Wd != 0)  # q − z0 on the kept entries
    Hh = problem.Hh.to(dt)
    B = problem.target(dt)
    A = torch.empty(m, G, G, dtype=dt, device=Hh.device)
    for g in range(G):  # U_g = P[:, g] Ĥ[g, :]  → A[:, g, h] = Σ_{k∈h} U_g[:, k] P[:, k]
        cols = slice(g * gs, (g + 1) * gs)
        Ug = P[:, cols] @ Hh[cols, :]
        A[:, g, :] = (Ug * P).reshape(m, G, gs).sum(2)
    c = (P * B).reshape(m, G, gs).sum(2)
    used = (P != 0).reshape(m, G, gs).any(2)
    old = qz.scale.clone()
    # unused groups: identity rows with the old scale as solution, so the systems stay nonsingular
    eye = torch.eye(G, dtype=dt, device=Hh.device).expand(m, G, G)
    keep = used.unsqueeze(2) & used.unsqueeze(1)
    A = torch.where(keep, A, torch.zeros_like(A)) + eye * (~used).unsqueeze(2)
    c = torch.where(used, c, old)
    ridge = 1e-12 * A.diagonal(dim1=1, dim2=2).abs().amax(1).clamp_min(1e-300)
    L, info = torch.linalg.cholesky_ex(A + ridge.view(m, 1, 1) * eye)
    s = torch.cholesky_solve(c.unsqueeze(2), L).squeeze(2)
    bad = (info != 0) | ~torch.isfinite(s).all(1) | ~(s > 0).where(used, torch.ones_like(used)).all(1)
    s = torch.where(bad.unsqueeze(1), old, s)  # a row whose fit is singular or flips a sign keeps its scales
    if round_to is not None:
        s = s.to(round_to).to(dt)
    return qz.with_scales(s)


@register_method("quant-refit", needs="gram", patterns=("grid",),
                 description="least-squares refit of the grid scales for fixed codes, alternated with a "
                             "re-run of the start method (gptq) on the refitted grid; never worse than the start",
                 options={"start": "method choosing the codes: gptq | sparsegpt | rtn",
                          "rounds": "refit + re-run rounds (0: the start only)"},
                 # rounds=0 keeps the layer's fixed scales (its codes step only): how ``optprune verify`` compares
                 # it with the fixed-scale grid program's optimum
                 fixed_scale_options={"rounds": 0})
def quant_refit(problem: LayerProblem, pattern: Pattern, *, start: str = "gptq", rounds: int = 2) -> LayerResult:
    pat = require_grid("quant-refit", pattern)
    start = str(start).strip().lower()
    if start not in STARTS:
        raise PatternError(f"quant-refit: start={start!r}; choose one of {', '.join(STARTS)}")
    if int(rounds) < 0:
        raise PatternError(f"quant-refit: rounds must be ≥ 0, got {rounds}")
    round_to = problem.meta.get("weight_dtype")
    with Timer() as t:
        res = get_method(start)(problem, pattern)
        best = (res.info["error"], res.W, res.mask, res.info["qparams"])
        qz, W, mask = best[3], res.W, res.mask
        history = [res.info["error"]]
        for r in range(int(rounds)):
            dt = work_dtype(problem)
            codes = qz.to(dt, W.device).codes(W.to(dt))
            new = refit_scales(problem, qz, W, round_to=round_to)
            Wr = new.to(dt, W.device).dequantize(codes) * mask
            e = problem.objective(Wr)
            history.append(e)
            if e < best[0]:
                best = (e, Wr, mask, new)
            if r + 1 == int(rounds) or start == "rtn":
                break
            # new codes on the refitted grid (the mask is chosen again by the start's sweep)
            res = SparseGPT(problem, pattern, quantizer=new, act_order=start == "gptq" and pat.dense_base(),
                            name=start).run()
            history.append(res.info["error"])
            qz, W, mask = new, res.W, res.mask
            if res.info["error"] < best[0]:
                best = (res.info["error"], res.W, res.mask, new)
    err, W, mask, qz = best
    info = {"method": "quant-refit", "start": start, "time_s": t.elapsed, "quant": pat.grid.name,
            "qparams": qz, "error_start": history[0], "error_history": history}
    return finish_layer(problem, W.to(work_dtype(problem)), mask, info)

