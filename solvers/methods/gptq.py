"""GPTQ and round-to-nearest: weights on a quantization grid (docs/methods.md §12).

Both solve or approximate the grid program (:func:`~optprune.formulations.programs.grid_program`): the layer
objective over grid ∩ pattern with the layer's scales fixed from its dense weights.

* ``gptq`` (Frantar et al. 2023) is SparseGPT's OBS column sweep (:class:`~.baselines.SparseGPT`: Cholesky of
  the damped inverse Gram, lazy block updates of ``blocksize`` columns) with every kept weight rounded to its
  grid where the sweep fixes its column, the rounding error spread over the columns still free. ``act_order``
  (default on) visits inputs by decreasing ``Ĥ_jj`` when every weight is kept; on a sparse base pattern the sweep
  keeps the input order (SparseGPT's block-wise mask choice, and N:M groups, need it). On a sparse base pattern (``--sparsity``, ``--pattern``)
  the masks are chosen inside the same sweep: the joint SparseGPT + GPTQ, as ``sparsegpt`` with ``--quant``.
* ``rtn`` rounds every weight to its nearest grid value (the Euclidean projection onto grid ∩ pattern, exact per
  entry; with a sparse pattern the mask keeps the entries whose rounding is furthest from zero).
"""
from __future__ import annotations

from typing import Optional

from ...formulations.grid import Quantized
from ...formulations.patterns import Pattern, PatternError
from ...formulations.problem import LayerProblem
from ...formulations.programs import grid_program
from ..base import LayerResult, Timer
from ..registry import register_method
from .baselines import SparseGPT, finish_layer, work_dtype

__all__ = ["gptq", "rtn", "require_grid"]


def require_grid(method: str, pattern: Pattern) -> Quantized:
    """The quantized pattern a grid method needs, or a one-line error naming ``--quant``."""
    if not isinstance(pattern, Quantized):
        raise PatternError(f"method {method!r} puts weights on a quantization grid: give --quant (e.g. w4g128)")
    return pattern


@register_method("gptq", needs="gram", patterns=("grid",),
                 program=lambda problem, pattern, **_: grid_program(problem, pattern),
                 verify_options=({"act_order": False},),
                 description="GPTQ: OBS column sweep rounding each column to the --quant grid, error spread over "
                             "the rest (act-order, lazy batches); with --sparsity/--pattern joint with SparseGPT",
                 options={"blocksize": "columns per lazy-update block",
                          "damp": "relative Hessian damping (default: the problem's)",
                          "act_order": "visit inputs by decreasing Ĥ_jj (GPTQ's activation order; dense base pattern only)"})
def gptq(problem: LayerProblem, pattern: Pattern, *, blocksize: int = 128, damp: Optional[float] = None,
         act_order: bool = True) -> LayerResult:
    pat = require_grid("gptq", pattern)
    act_order = bool(act_order) and pat.dense_base()
    return SparseGPT(problem, pattern, blocksize=blocksize, damp=damp, act_order=act_order, name="gptq").run()


@register_method("rtn", needs="none", patterns=("grid",),
                 program=lambda problem, pattern, **_: grid_program(problem, pattern),
                 description="round to nearest: every weight to its nearest --quant grid value (exact projection "
                             "onto grid ∩ pattern by magnitude); no calibration statistics")
def rtn(problem: LayerProblem, pattern: Pattern) -> LayerResult:
    pat = require_grid("rtn", pattern)
    with Timer() as t:
        qz = pat.quantizer(problem.W0, round_to=problem.meta.get("weight_dtype"))
        W, mask = pat.project_grid(problem.W0.to(work_dtype(problem)), qz.to(work_dtype(problem)))
    info = {"method": "rtn", "time_s": t.elapsed, "quant": pat.grid.name, "qparams": qz}
    return finish_layer(problem, W, mask, info)
