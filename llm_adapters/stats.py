"""Input statistics of a linear layer, streamed over calibration batches: the one accumulator the pipeline, the
structured-problem capture and the per-layer allocations use.

``InputStats(n, full=..., corrected=..., dtype=..., device=...)``; ``add(x)`` (dense input, shape (..., n)) or
``add(x, xhat)`` (error-corrected: the dense input ``X`` and the pruned-upstream input ``X̂``); tokens are never
kept. What it holds:

* ``full=True``: the Gram matrices (:class:`~optprune.formulations.GramAccumulator`: ``H = X Xᵀ``, and ``Ĥ``,
  ``C`` when corrected), ``Σ x̂_j²`` and the input means — ``meta["input_mean"]`` (of ``X``) and, corrected,
  ``meta["input_mean_hat"]`` (of ``X̂``), which FLAP-style bias compensation reads;
* ``full=False``: only ``Σ x̂_j²`` (Wanda's ``‖X_j‖²``; for methods that need no Gram on very wide layers): the
  problem's ``H`` is the diagonal matrix of it and ``meta["stats"] == "diag"``.

``problem(W0, name=, damp=)`` is the layer's :class:`~optprune.formulations.LayerProblem`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formulations import GramAccumulator, LayerProblem

__all__ = ["InputStats", "add_hook_input"]


class InputStats:
    """Streaming statistics of one layer's input (module doc)."""

    def __init__(self, n: int, *, full: bool = True, corrected: bool = False, dtype=torch.float32, device=None):
        self.n, self.full, self.corrected = n, bool(full), bool(corrected) and bool(full)
        if self.full:
            self.gram = GramAccumulator(n, corrected=self.corrected, dtype=dtype, device=device)
            self.sum = torch.zeros(n, dtype=dtype, device=device)
            self.sum_hat = torch.zeros(n, dtype=dtype, device=device) if self.corrected else None
        else:
            self.gram, self.sum, self.sum_hat = None, None, None
            self._sq = torch.zeros(n, dtype=dtype, device=device)
            self._count = 0
        self.count = 0

    @property
    def nsamples(self) -> int:
        """Tokens seen."""
        return self.gram.nsamples if self.full else self._count

    @property
    def sq_norm(self) -> torch.Tensor:
        """``Σ_t x̂_tj²`` per input column."""
        return self.gram.sq_norm if self.full else self._sq

    @torch.no_grad()
    def add(self, x: torch.Tensor, xhat: Optional[torch.Tensor] = None) -> None:
        if not self.full:  # diagonal only (of X̂); no means
            x = x if xhat is None else xhat
            x = x.reshape(-1, x.shape[-1]).to(self._sq.device, self._sq.dtype)
            self._sq += (x * x).sum(0)
            self._count += x.shape[0]
            return
        self.gram.add(x, xhat) if self.corrected else self.gram.add(x)
        self.sum += x.reshape(-1, x.shape[-1]).to(self.sum.device, self.sum.dtype).sum(0)
        if self.sum_hat is not None:
            self.sum_hat += xhat.reshape(-1, xhat.shape[-1]).to(self.sum.device, self.sum.dtype).sum(0)
        self.count += x.numel() // x.shape[-1]

    def problem(self, W0: torch.Tensor, *, name: str = "?", damp: float = 0.01) -> LayerProblem:
        if not self.full:
            return LayerProblem(W0=W0, H=torch.diag(self._sq), name=name, damp=damp, nsamples=self._count,
                                input_sq_norm=self._sq, meta={"stats": "diag"})
        p = self.gram.problem(W0, name=name, damp=damp)
        c = max(self.count, 1)
        p.meta["input_mean"] = self.sum / c
        if self.sum_hat is not None:
            p.meta["input_mean_hat"] = self.sum_hat / c
        return p


def add_hook_input(stats: dict, name: str, args, kwargs, *, full: bool) -> torch.Tensor:
    """In a forward pre-hook: add the module's input (``args[0]`` or ``kwargs["input"]``) to ``stats[name]``
    (an :class:`InputStats` made on first use: float32, on the input's device; ``full``: the whole Gram, else
    the diagonal). Returns the input."""
    x = args[0] if args else (kwargs or {}).get("input")
    if name not in stats:
        stats[name] = InputStats(x.shape[-1], full=full, dtype=torch.float32, device=x.device)
    stats[name].add(x.detach())
    return x
