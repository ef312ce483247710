"""Low-bit weights as one more constraint: a quantization grid composed with a sparsity pattern
(docs/methods.md §12).

A **grid** restricts every kept weight to ``s_ig · (q_ij − z_ig)`` with an integer code ``q_ij`` in
``[q_min, q_max]``; ``s_ig`` (scale) and ``z_ig`` (integer zero point) are shared by output row ``i`` and the
group ``g`` of input columns that ``j`` belongs to (one group per row = per output channel). Users write it as

* ``w<b>``          b-bit symmetric, one scale per output channel (``w4``, ``w8``), codes ``[−2^(b−1), 2^(b−1)−1]``;
* ``w<b>g<G>``      one scale per group of ``G`` consecutive inputs (``w4g128``, ``w4g64``);
* a trailing ``a``  asymmetric: codes ``[0, 2^b − 1]`` with a zero point per scale (``w4g128a``).

Zero is always a grid point (``q = z``), so a pruned weight is exactly zero *and* on the grid: the grid composes
with every sparsity pattern. :class:`Quantized` is that composition, one pattern class (kind ``grid``): its mask
part is the base pattern's, its weight part is a :class:`Quantizer` of the layer.

**Scales fixed from the dense weights** (:meth:`Quantizer.from_weights`) follow the min-max rule of the
compressed-tensors format, so that an exported checkpoint reproduces the codes exactly: symmetric
``s = max|w| / ((q_max − q_min)/2)``, asymmetric ``s = (max(w,0) − min(w,0)) / (q_max − q_min)`` and
``z = q_min − round(min(w,0)/s)``. Optimised scales come from the scale refit (solvers/methods/quant_refit.py); either
way a layer's scales are data of its program, fixed while the codes are chosen.

**Projection onto grid ∩ pattern** is exact entry by entry: the nearest grid value of ``w`` is
``Q(w) = s·(clamp(round(w/s) + z) − z)``; keeping entry ``ij`` instead of zeroing it lowers the squared distance
by ``w² − (w − Q(w))² ≥ 0`` (zero is a grid point), so the base pattern's exact max-score projection of those
gains, followed by rounding the kept entries, is the Euclidean projection onto the intersection.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from .patterns import LinearRow, Pattern, PatternError, register_pattern

__all__ = ["GridSpec", "parse_grid", "Quantizer", "Quantized", "GRID_SYNTAX", "grid_rows"]

GRID_SYNTAX = "w<bits>[g<group>][a], bits 2-8, e.g. w4 (per channel), w4g128, w4g64a (asymmetric)"
_GRID_RE = re.compile(r"^w(\d+)(?:g(\d+))?(a?)$")


@dataclass(frozen=True)
class GridSpec:
    """An integer grid: ``bits``, ``group`` inputs per scale (``None``: the whole row), ``symmetric``."""

    bits: int
    group: Optional[int] = None
    symmetric: bool = True

    def __post_init__(self):
        if not (2 <= int(self.bits) <= 8):
            raise PatternError(f"quantization bits must be 2..8, got {self.bits}")
        if self.group is not None and int(self.group) < 2:
            raise PatternError(f"quantization group must be ≥ 2 inputs, got {self.group}")

    @property
    def name(self) -> str:
        return f"w{self.bits}" + (f"g{self.group}" if self.group else "") + ("" if self.symmetric else "a")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def group_size(self, n: int) -> int:
        return n if self.group is None else int(self.group)

    def validate(self, shape) -> None:
        n = shape[1]
        if self.group is not None and n % self.group:
            raise PatternError(f"quantization group {self.group} does not divide the layer width {n} "
                               f"(use a group that divides it, or per-channel w{self.bits})")

    def describe(self) -> dict:
        return {"quant": self.name, "bits": self.bits, "group": self.group, "symmetric": self.symmetric}


def parse_grid(text) -> GridSpec:
    """The grid named by ``--quant`` (:data:`GRID_SYNTAX`); a :class:`PatternError` for anything else."""
    if isinstance(text, GridSpec):
        return text
    mt = _GRID_RE.match(str(text).strip().lower())
    if mt is None:
        raise PatternError(f"unknown quantization {text!r}; use {GRID_SYNTAX}")
    return GridSpec(int(mt.group(1)), int(mt.group(2)) if mt.group(2) else None, symmetric=not mt.group(3))


class Quantizer:
    """The grid of one layer with fixed scales: ``scale`` and ``zero`` of shape (m, n / group).

    ``zero`` holds integer zero points (all 0 for a symmetric grid). Every method works in the dtype of the
    weights it is given; ``scale`` is kept in float32 or float64.
    """

    def __init__(self, spec: GridSpec, scale: torch.Tensor, zero: torch.Tensor, n: int):
        self.spec, self.n = spec, int(n)
        self.gs = spec.group_size(n)
        if tuple(scale.shape) != (scale.shape[0], self.n // self.gs) or scale.shape != zero.shape:
            raise PatternError(f"scales of shape {tuple(scale.shape)} do not fit a width of {n} with groups of "
                               f"{self.gs}")
        if not bool((scale > 0).all()) or not torch.isfinite(scale).all():
            raise PatternError("quantization scales must be positive and finite")
        self.scale, self.zero = scale, zero

    @classmethod
    def from_weights(cls, spec: GridSpec, W: torch.Tensor, *, round_to: Optional[torch.dtype] = None,
                     ) -> "Quantizer":
        """Min-max scales of ``W`` (m, n) per row and group (the compressed-tensors rule, module doc).

        ``round_to`` rounds the scales to a storage dtype (the model's), so that saved scales reproduce them."""
        spec.validate(W.shape)
        m, n = W.shape
        gs = spec.group_size(n)
        dt = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
        Wg = W.to(dt).reshape(m, n // gs, gs)
        lo = Wg.amin(2).clamp_max(0.0)
        hi = Wg.amax(2).clamp_min(0.0)
        span = float(spec.qmax - spec.qmin)
        if spec.symmetric:
            scale = torch.maximum(lo.abs(), hi) / (span / 2)
        else:
            scale = (hi - lo) / span
        tiny = torch.finfo(torch.float16 if round_to in (torch.float16, torch.bfloat16) else dt).tiny
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale works
        scale = scale.clamp_min(tiny * 4)
        if round_to is not None:
            scale = scale.to(round_to).to(dt)
        if spec.symmetric:
            zero = torch.zeros_like(scale)
        else:
            zero = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
        return cls(spec, scale, zero, n)

    def with_scales(self, scale: torch.Tensor) -> "Quantizer":
        return Quantizer(self.spec, scale, self.zero.to(scale.dtype), self.n)

    # ------------------------------------------------------------------ per-entry maps
    def _expand(self, t: torch.Tensor, cols=None, dtype=None, device=None) -> torch.Tensor:
        full = t.repeat_interleave(self.gs, dim=1)
        if cols is not None:
            full = full[:, cols]
        return full.to(dtype=dtype or t.dtype, device=device or t.device)

    def scales_full(self, cols=None, dtype=None, device=None) -> torch.Tensor:
        """(m, n) (or the chosen columns) scale of every entry."""
        return self._expand(self.scale, cols, dtype, device)

    def zeros_full(self, cols=None, dtype=None, device=None) -> torch.Tensor:
        return self._expand(self.zero, cols, dtype, device)

    def codes(self, W: torch.Tensor, cols=None) -> torch.Tensor:
        """Integer codes (as floats) of the nearest grid values of ``W`` (columns ``cols`` of the layer)."""
        s = self.scales_full(cols, W.dtype, W.device)
        z = self.zeros_full(cols, W.dtype, W.device)
        return (torch.round(W / s) + z).clamp(self.spec.qmin, self.spec.qmax)

    def dequantize(self, q: torch.Tensor, cols=None) -> torch.Tensor:
        s = self.scales_full(cols, q.dtype, q.device)
        return s * (q - self.zeros_full(cols, q.dtype, q.device))

    def round(self, W: torch.Tensor, cols=None) -> torch.Tensor:
        """The nearest grid value of every entry (exact: the grid is uniform within its range)."""
        return self.dequantize(self.codes(W, cols), cols)

    def round_column(self, w: torch.Tensor, j: int) -> torch.Tensor:
        """Nearest grid values of column ``j`` (a vector over the m rows): the OBS sweep's rounding."""
        g = j // self.gs
        s = self.scale[:, g].to(w.dtype, copy=False).to(w.device)
        z = self.zero[:, g].to(w.dtype, copy=False).to(w.device)
        return s * ((torch.round(w / s) + z).clamp(self.spec.qmin, self.spec.qmax) - z)

    def keep_gain(self, W: torch.Tensor) -> torch.Tensor:
        """``w² − (w − Q(w))²``: how much closer to ``W`` keeping an entry (rounded) is than zeroing it."""
        return W * W - (W - self.round(W)) ** 2

    def on_grid(self, W: torch.Tensor, rtol: float = 1e-4) -> bool:
        """Every entry within ``rtol·s`` of a grid value (``W`` in any float dtype)."""
        Wd = W.to(torch.float64)
        s = self.scales_full(dtype=torch.float64, device=Wd.device)
        q = torch.round(Wd / s) + self.zeros_full(dtype=torch.float64, device=Wd.device)
        in_range = ((q >= self.spec.qmin) & (q <= self.spec.qmax)).all()
        return bool(in_range) and bool(((Wd / s - torch.round(Wd / s)).abs() <= rtol).all())

    def to(self, dtype=None, device=None) -> "Quantizer":
        f = lambda t: t.to(dtype=dtype or t.dtype, device=device or t.device)
        return Quantizer(self.spec, f(self.scale), f(self.zero), self.n)

    def describe(self) -> dict:
        return self.spec.describe()


def grid_rows(quantizer: Quantizer, shape) -> list[LinearRow]:
    """Linear rows tying the weights to integer codes: ``W_ij − s_ij q_ij = −s_ij z_ij`` for every entry
    (flattened row-major; ``q`` is an integer variable with bounds ``[q_min, q_max]``)."""
    m, n = shape
    s = quantizer.scales_full(dtype=torch.float64).cpu().reshape(-1)
    z = quantizer.zeros_full(dtype=torch.float64).cpu().reshape(-1)
    one = torch.ones(1, dtype=torch.float64)
    return [LinearRow([("W", torch.tensor([k]), one), ("q", torch.tensor([k]), -s[k:k + 1])], "==",
                      float(-s[k] * z[k])) for k in range(m * n)]


@register_pattern
class Quantized(Pattern):
    """A sparsity pattern whose kept weights lie on a quantization grid.

    The mask part — ``project``, ``is_feasible``, ``constraints``, ``kept_count`` — is the base pattern's; the
    weight part is the grid (:meth:`quantizer`, :meth:`project_grid`, :meth:`weights_feasible`; module doc)."""

    kinds = ("grid",)
    syntax = "any pattern with --quant " + GRID_SYNTAX

    @classmethod
    def parse(cls, text, sparsity=None, **params):
        return None  # reached through parse_pattern(..., quant=...), which wraps the parsed base pattern

    def __init__(self, base: Pattern, grid):
        if isinstance(base, Quantized):
            raise PatternError("a quantized pattern cannot be quantized again")
        self.base, self.grid = base, parse_grid(grid)
        self.sparsity = getattr(base, "sparsity", 0.0)
        self.name = self.grid.name if self.dense_base() else f"{base.name}+{self.grid.name}"

    def dense_base(self) -> bool:
        """Whether the base pattern keeps every weight (plain quantization, no pruning)."""
        return getattr(self.base, "kind", None) == "unstructured" and not getattr(self.base, "sparsity", 0)

    def describe(self):
        d = dict(self.base.describe())
        d.update(self.grid.describe())
        return d

    def validate(self, shape):
        self.base.validate(shape)
        self.grid.validate(shape)

    def kept_count(self, shape):
        return self.base.kept_count(shape)

    def project(self, scores):
        return self.base.project(scores)

    def is_feasible(self, mask):
        return self.base.is_feasible(mask)

    def constraints(self, shape):
        return self.base.constraints(shape)

    def aux_variables(self, shape):
        return self.base.aux_variables(shape)

    # ------------------------------------------------------------------ the weight part
    def quantizer(self, W0: torch.Tensor, *, round_to: Optional[torch.dtype] = None) -> Quantizer:
        """The layer's grid with scales fixed from its dense weights ``W0``."""
        self.validate(W0.shape)
        return Quantizer.from_weights(self.grid, W0, round_to=round_to)

    def project_grid(self, W: torch.Tensor, quantizer: Optional[Quantizer] = None):
        """The Euclidean projection of ``W`` onto grid ∩ pattern (exact, module doc): ``(W_proj, mask)``."""
        qz = quantizer or self.quantizer(W)
        mask = self.base.project(qz.keep_gain(W))
        return qz.round(W) * mask, mask

    def project_weights(self, W: torch.Tensor, quantizer: Optional[Quantizer] = None) -> torch.Tensor:
        return self.project_grid(W, quantizer)[0]

    def weights_feasible(self, W: torch.Tensor, quantizer: Quantizer) -> bool:
        """Support within the pattern and every weight on the grid."""
        return self.base.is_feasible(W != 0) and quantizer.on_grid(W)
