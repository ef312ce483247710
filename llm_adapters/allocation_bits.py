"""Mixed precision: per-layer bit widths from the allocation machinery under an average-bits budget.

``--quant w3g64 --allocation alpha`` quantizes every decoder block on a ``g64`` grid with its own integer bit
width ``b ∈ [2, 8]``, the parameter-weighted mean of the widths being the ``--quant`` bits (3). The widths come
from the same allocation program as the per-layer sparsities (docs/methods.md §3 and §12):

* the **compression** ``c = (8 − b) / 6 ∈ [0, 1]`` (0: 8 bits, 1: 2 bits) plays the part of the sparsity: the
  allocation (``alpha``/``owl``, their options and ``--allocation-eps``) distributes it over the blocks with mean
  ``C = (8 − B) / 6``, so that a block the rule would prune more gets fewer bits;
* the real widths ``8 − 6c`` are rounded to integers by
  :func:`~optprune.solvers.whole_model.allocation.integer_bits` within the budget (equal blocks: the mean is
  exactly ``B``);
* ``auto`` chooses among uniform (always a candidate), α allocations with ε ∈ {0.1, 0.2, 0.3, 0.5} and a measured
  candidate (:func:`_sensitivity_bits`: blocks trade one bit in pairs where the measured loss changes say it
  pays) by the loss, on calibration sequences, of the model with every layer rounded to its grid (RTN: no
  statistics, so the score needs no held-out split) — the widths with the lowest loss win, uniform on ties.
  It costs ``2L + K`` forward passes over those sequences (``L`` blocks, ``K`` candidates): ``auto:rows=N``
  scores on ``N`` sequences (default 8).

Bounded allocations (``alpha:bounded``) measure error-versus-**sparsity** curves; they are refused here.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from ..formulations.allocation import AllocationError
from ..formulations.grid import GridSpec, Quantizer, parse_grid
from ..solvers.serialization import to_json
from ..solvers.whole_model.allocation import integer_bits
from .allocation import parse_allocation, prunable_matrices
from .architectures import ArchSpec, get_arch, linear_weight

__all__ = ["layer_grids", "check_bit_allocation", "rtn_loss", "BITS_LO", "BITS_HI", "AUTO_EPS"]

BITS_LO, BITS_HI = 2, 8
AUTO_EPS = (0.1, 0.2, 0.3, 0.5)
AUTO_ROWS = 8  # calibration sequences the auto selection scores its candidates on


def check_bit_allocation(allocation: str) -> tuple[str, dict]:
    """The allocation spec a bit allocation takes (``alpha``, ``owl`` and their options, ``auto``); one line
    otherwise."""
    key, opts = parse_allocation(allocation)
    if opts.get("bounded"):
        raise AllocationError(f"--allocation {allocation} bounds sparsities by measured error curves; with --quant "
                              f"the allocation distributes bit widths: use alpha, owl or auto")
    if key == "auto" and set(opts) - {"holdout", "rows"}:
        raise AllocationError(f"--allocation auto with --quant takes no options but rows=N (sequences scored); "
                              f"got {allocation}")
    return key, opts


def _grid(spec: GridSpec, bits: int) -> GridSpec:
    return GridSpec(int(bits), spec.group, spec.symmetric)


def _rule_bits(model, arch, rule: str, spec: GridSpec, eps, calib_ids) -> tuple[dict, dict]:
    """Per-matrix integer bits of one rule (``alpha[:opts]``/``owl[:opts]``) at the budget ``spec.bits``."""
    from .allocation_targets import layer_sparsities
    B = spec.bits
    C = (BITS_HI - B) / (BITS_HI - BITS_LO)
    _, info = layer_sparsities(model, arch, rule, C, eps=eps, calib_ids=calib_ids)
    units, sizes, comp = info["units"], info["unit_sizes"], info["unit_sparsities"]
    real = [BITS_HI - (BITS_HI - BITS_LO) * float(c) for c in comp]
    bits = integer_bits(real, sizes, B, BITS_LO, BITS_HI)
    per_unit = dict(zip(units, bits))
    per_matrix = {}
    for name, bi, _, _ in prunable_matrices(model, arch):
        per_matrix[name] = per_unit[bi]
    keep = {k: info[k] for k in ("allocation", "spec", "alpha_per_block", "outlier_ratio", "eps") if k in info}
    keep.update(unit_compression=comp, unit_real_bits=real, unit_bits=bits, units=units, unit_sizes=sizes)
    return per_matrix, keep


@torch.no_grad()
def rtn_loss(model: nn.Module, arch: ArchSpec, spec: GridSpec, bits: dict, ids: torch.Tensor) -> float:
    """Mean token NLL on ``ids`` with every prunable matrix rounded to its grid (``bits[name]`` bits, ``spec``'s
    groups and symmetry); the weights are restored before returning."""
    from .allocation_select import heldout_loss
    saved = []
    try:
        for name, _, sub, mod in prunable_matrices(model, arch):
            W = linear_weight(mod, sub in arch.transposed)  # a view in (out, in) layout
            saved.append((W, W.detach().clone()))
            qz = Quantizer.from_weights(_grid(spec, bits[name]), W.detach(), round_to=W.dtype)
            W.data.copy_(qz.round(W.detach().to(qz.scale.dtype)).to(W.dtype))
        return heldout_loss(model, ids)
    finally:
        for W, orig in saved:
            W.data.copy_(orig)


def layer_grids(model: nn.Module, arch: Optional[ArchSpec], allocation: str, quant: str, *,
                eps: Optional[float] = None, calib_ids=None, progress: bool = False) -> tuple[dict, dict]:
    """Per-sub-layer grids (full module name → grid name such as ``w4g64``) with parameter-weighted mean bits
    at most (equal blocks: exactly) the bits of ``quant``, and the JSON-ready record (module doc)."""
    t0 = time.perf_counter()
    arch = arch or get_arch(model)
    spec = parse_grid(quant)
    key, opts = check_bit_allocation(allocation)
    mats = prunable_matrices(model, arch)
    numel = {name: int(linear_weight(mod, sub in arch.transposed).numel()) for name, _, sub, mod in mats}
    uniform = {name: spec.bits for name in numel}
    info: dict = {"allocation": key, "spec": str(allocation), "quant": spec.name, "budget_bits": spec.bits,
                  "bits_range": [BITS_LO, BITS_HI]}
    if spec.bits in (BITS_LO, BITS_HI):  # every width within [2, 8] with this mean is the uniform one
        bits, info["note"] = uniform, f"a mean of {spec.bits} bits within [{BITS_LO}, {BITS_HI}] is uniform"
    elif key == "auto":
        bits = _select(model, arch, spec, eps, calib_ids, opts, uniform, info, progress)
    else:
        bits, detail = _rule_bits(model, arch, allocation, spec, eps, calib_ids)
        info.update(detail)
    total = sum(numel.values())
    per_block = {bi: bits[name] for name, bi, _, _ in mats}
    info.update(block_bits=[per_block[b] for b in sorted(per_block)])
    info.update(layer_bits=bits, mean_bits=sum(numel[n] * b for n, b in bits.items()) / total,
                min_bits=min(bits.values()), max_bits=max(bits.values()), time_s=time.perf_counter() - t0)
    return {n: _grid(spec, b).name for n, b in bits.items()}, to_json(info, string_keys=False)


def _select(model, arch, spec, eps, calib_ids, opts, uniform, info, progress) -> dict:
    """``auto``: uniform and the α allocations, scored by the RTN loss on calibration sequences (module doc)."""
    from .allocation import calibration_ids
    ids = calibration_ids(calib_ids, None)
    if ids is None:
        raise AllocationError("--allocation auto with --quant scores its candidates on calibration data")
    ids = ids[: int(opts.get("rows", AUTO_ROWS))]
    cands = [("uniform", uniform)]
    for e in ((eps,) if eps is not None else AUTO_EPS):
        b, _ = _rule_bits(model, arch, "alpha", spec, e, None)
        if all(b != c for _, c in cands):
            cands.append((f"alpha:eps={e:g}", b))
    base = rtn_loss(model, arch, spec, uniform, ids)
    b, info["sensitivity"] = _sensitivity_bits(model, arch, spec, uniform, ids, base)
    if all(b != c for _, c in cands):
        cands.append(("sensitivity", b))
    scored = []
    for label, b in cands:
        loss = base if label == "uniform" else rtn_loss(model, arch, spec, b, ids)
        scored.append({"label": label, "rtn_loss": loss, "bits": b})
        if progress:
            print(f"[optprune] bit allocation {label}: RTN loss {loss:.4f}", flush=True)
    best = min(scored, key=lambda c: (c["rtn_loss"], c["label"] != "uniform"))
    info.update(chosen=best["label"], candidates=[{k: v for k, v in c.items() if k != "bits"} for c in scored],
                scored_rows=int(ids.shape[0]))
    return best["bits"]


def _sensitivity_bits(model, arch, spec: GridSpec, uniform: dict, ids, base: float) -> tuple[dict, dict]:
    """The measured candidate of ``auto``: each block's RTN loss with one bit less and one bit more than the
    budget (the other blocks at the budget); blocks then trade bits in pairs — the cheapest bit to give up to the
    most valuable bit to gain, one pair at a time — while a trade's estimated change (the sum of the two
    measured changes) is negative. Equal blocks keep the mean at the budget."""
    blocks: dict = {}
    for name, bi, _, _ in prunable_matrices(model, arch):
        blocks.setdefault(bi, []).append(name)
    B = spec.bits

    def with_block(bi, b):
        return {**uniform, **{n: b for n in blocks[bi]}}

    down = {bi: rtn_loss(model, arch, spec, with_block(bi, B - 1), ids) - base for bi in blocks} if B > BITS_LO else {}
    up = {bi: rtn_loss(model, arch, spec, with_block(bi, B + 1), ids) - base for bi in blocks} if B < BITS_HI else {}
    sizes = {bi: len(v) for bi, v in blocks.items()}
    givers = sorted(down, key=lambda bi: down[bi])
    takers = sorted(up, key=lambda bi: up[bi])
    bits = dict(uniform)
    used: set = set()
    for g in givers:
        t = next((t for t in takers if t not in used and t != g and sizes[t] == sizes[g]), None)
        if g in used or t is None or down[g] + up[t] >= 0:
            continue
        used.update((g, t))
        bits.update({n: B - 1 for n in blocks[g]})
        bits.update({n: B + 1 for n in blocks[t]})
    return bits, {"loss_change_one_bit_less": down, "loss_change_one_bit_more": up}
