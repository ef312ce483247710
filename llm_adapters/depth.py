"""Depth pruning: remove whole blocks, chosen by the depth knapsack or by ShortGPT's block influence
(docs/methods.md §13). ``optprune prune --structure depth --method depth|shortgpt``.

**Budget** (one of): ``--speedup X`` — the measured prefill latency (:func:`.latency.latency_model`, batch 8 ×
512 tokens on this machine, cached) must drop to ``1/X`` of the dense model's: the removed blocks' times must
sum to at least ``T (1 − 1/X)``; ``--flops F`` — at most the fraction ``F`` of the dense FLOPs per token stays
(:func:`.latency.block_flops`); ``--sparsity s`` — ``round(s·L)`` blocks are removed.

**depth** (the program): removal costs measured on calibration data — ``c_i`` = mean token NLL with block
``i`` skipped (its forward replaced by the identity on the residual stream) minus the dense NLL, and the
neighbour interactions ``q_{i,i+1}`` = NLL with ``i`` and ``i+1`` skipped minus dense minus ``c_i`` minus
``c_{i+1}`` (``2L − 1`` forwards over ``-O windows`` calibration windows) — make the depth knapsack
(:func:`~optprune.formulations.depth.depth_program`), solved exactly by the chain dynamic programme
(:func:`~optprune.solvers.whole_model.depth.solve_depth`). The loss of the chosen set is then measured (interactions
beyond neighbours are not in the model) and recorded beside the model's prediction.

**shortgpt** (the in-repo baseline, Men et al. 2024): block influence ``BI_i = 1 − E_tokens cos(x_i, x_{i+1})``
between a block's input and output hidden states on the calibration data; the blocks of least influence are
removed until the budget is met.

Surgery: :func:`~.surgery.remove_blocks` (renumbered, config fixed) — the output loads in stock transformers.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from .architectures import ArchSpec, get_module

__all__ = ["DepthRule", "DEPTH_RULES", "depth_rule", "check_depth_options", "skipped", "calibration_nll", "removal_costs",
           "block_influence", "depth_budget", "select_blocks", "prune_depth"]

log = logging.getLogger("optprune")


@dataclass(frozen=True)
class DepthRule:
    """A block-selection rule of ``--structure depth`` (what ``--method`` names there)."""
    name: str
    description: str
    options: dict = field(default_factory=dict)  # option -> (default, help)
    structured: bool = True
    needs: str = "calibration"
    patterns: frozenset = frozenset({"groups"})

    def check_options(self, options: dict) -> None:
        bad = [k for k in options if k not in self.options]
        if bad:
            raise ValueError(f"method {self.name!r} (--structure depth): unknown option(s) {', '.join(bad)}; "
                             f"valid: {', '.join(self.options) or 'none'}")
        for key, lo in (("windows", 1), ("tokens", 0)):
            w = options.get(key)
            if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < lo or (key == "tokens" and w == 1)):
                raise ValueError(f"method {self.name!r}: {key} must be an integer ≥ {max(lo, 2) if key == 'tokens' else lo}"
                                 f"{' (or 0: all)' if key == 'tokens' else ''}, got {w!r}")

    def normalize_options(self, options: dict) -> dict:
        """The options as given, after :meth:`check_options` (the engine's one call for every method)."""
        from .settings import RunError
        options = dict(options or {})
        try:
            self.check_options(options)
        except ValueError as e:
            raise RunError(str(e)) from None
        return options

    def resolved(self, options: dict) -> dict:
        return {k: options.get(k, d) for k, (d, _) in self.options.items()}


DEPTH_RULES = {
    "depth": DepthRule("depth", "depth knapsack: measured removal costs with neighbour interactions, exact DP",
                       {"windows": (16, "calibration windows the removal costs are measured on"),
                        "tokens": (0, "tokens of each window used (0: all)")}),
    "shortgpt": DepthRule("shortgpt", "ShortGPT block influence (angular distance of a block's input and output)",
                          {"windows": (16, "calibration windows the block influence is measured on"),
                           "tokens": (0, "tokens of each window used (0: all)")}),
}


def depth_rule(name: str) -> DepthRule:
    r = DEPTH_RULES.get(str(name).strip().lower())
    if r is None:
        raise ValueError(f"--structure depth takes --method {' or '.join(DEPTH_RULES)}, got {name!r}")
    return r


def check_depth_options(options) -> None:
    """The options of a ``--structure depth`` run that can be checked before loading (one-line ValueErrors)."""
    sp, fl = getattr(options, "speedup", None), getattr(options, "flops", None)
    if sp is not None and fl is not None:
        raise ValueError("give one budget: --speedup or --flops, not both")
    if (sp is not None or fl is not None) and options.sparsity is not None:
        raise ValueError("--speedup/--flops set the budget; drop --sparsity (for depth: the fraction of blocks removed)")
    if sp is not None and not (isinstance(sp, (int, float)) and math.isfinite(sp) and sp > 1):
        raise ValueError(f"--speedup must be a number > 1, got {sp!r}")
    if fl is not None and not (isinstance(fl, (int, float)) and 0 < fl < 1):
        raise ValueError(f"--flops must be in (0, 1) (the fraction of the dense FLOPs kept), got {fl!r}")
    unsupported = [(flag, bad) for flag, bad in (
        ("--allocation", str(options.allocation or "uniform").strip().lower() != "uniform"),
        ("--allocation-eps", options.allocation_eps is not None), ("--refit", bool(options.refit)),
        ("--certify", bool(options.certify)), ("--low-memory", bool(options.low_memory)),
        ("--nproc", int(options.nproc or 1) != 1), ("--resume", bool(options.resume)),
        ("--checkpoint-dir", options.checkpoint_dir is not None), ("--targets", bool(options.targets)),
        ("--ignore", bool(options.ignore)), ("--save-format", options.save_format != "dense")) if bad]
    if unsupported:
        raise ValueError(f"{unsupported[0][0]} does not apply to --structure depth (whole blocks are removed)")


# ------------------------------------------------------------------------------------------------ measuring
def _hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def skipped(model: nn.Module, arch: ArchSpec, removed: Sequence[int]):
    """Blocks ``removed`` act as the identity on the residual stream inside the block (their forward is not run)."""
    blocks = get_module(model, arch.blocks)
    saved = []
    for i in removed:
        blk = blocks[i]
        saved.append((blk, blk.__dict__.get("forward")))
        tuple_out = getattr(blk, "_optprune_tuple_out", False)

        def ident(*args, _t=tuple_out, **kwargs):
            h = _hidden_of(args, kwargs)
            return (h,) if _t else h
        blk.forward = ident
    try:
        yield
    finally:
        for blk, f in saved:
            if f is None:
                del blk.forward
            else:
                blk.forward = f


def _note_output_kind(model: nn.Module, arch: ArchSpec, ids: torch.Tensor) -> None:
    """Whether blocks return a tuple (older layers) or a tensor, so that :func:`skipped` answers in kind."""
    blocks = get_module(model, arch.blocks)
    def note(module, args, output):
        module._optprune_tuple_out = isinstance(output, tuple)

    hooks = [b.register_forward_hook(note) for b in blocks]
    try:
        with torch.no_grad():
            model(ids[:1, :8])
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def calibration_nll(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean next-token NLL (nats) of the calibration windows ``ids`` (B, T)."""
    dev = next(model.parameters()).device
    tot, n = 0.0, 0
    for b0 in range(0, ids.shape[0], batch_size):
        x = ids[b0:b0 + batch_size].to(dev)
        logits = model(x, use_cache=False).logits[:, :-1].float()
        tot += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                       reduction="sum"))
        n += x[:, 1:].numel()
    return tot / n


def _costs_key(model: nn.Module, arch: ArchSpec, ids: torch.Tensor) -> str:
    """The calibration ids and a sample of every block's weights: a changed model or text is a new key."""
    import hashlib
    h = hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes())
    for blk in get_module(model, arch.blocks):
        for p in list(blk.parameters())[:3]:
            h.update(p.detach().reshape(-1)[:256].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def removal_costs(model: nn.Module, arch: ArchSpec, ids: torch.Tensor, *, progress: bool = False,
                  cache: bool = True) -> dict:
    """``{"dense", "single": [c_i], "neighbours": [q_{i,i+1}], "forwards"}`` — the measured removal costs,
    cached in ``<optprune home>/depth_costs/`` per (calibration ids, model weights) (``"cached"`` says so)."""
    import json
    from .data import optprune_home
    path = optprune_home() / "depth_costs" / f"{_costs_key(model, arch, ids)}.json"
    if cache and path.exists():
        try:
            return dict(json.loads(path.read_text()), cached=True)
        except (OSError, ValueError):
            pass
    rec = _measure_costs(model, arch, ids, progress)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rec))
        except OSError:
            pass
    return dict(rec, cached=False)


def _measure_costs(model: nn.Module, arch: ArchSpec, ids: torch.Tensor, progress: bool) -> dict:
    L = len(get_module(model, arch.blocks))
    _note_output_kind(model, arch, ids)
    dense = calibration_nll(model, ids)
    single = []
    for i in range(L):
        with skipped(model, arch, [i]):
            single.append(calibration_nll(model, ids) - dense)
        if progress:
            log.info(f"depth: block {i} removal cost {single[-1]:+.4f} nats")
    pair = []
    for i in range(L - 1):
        with skipped(model, arch, [i, i + 1]):
            pair.append(calibration_nll(model, ids) - dense - single[i] - single[i + 1])
    return {"dense": dense, "single": single, "neighbours": pair, "forwards": 2 * L}


@torch.no_grad()
def block_influence(model: nn.Module, arch: ArchSpec, ids: torch.Tensor, *, batch_size: int = 4) -> list:
    """ShortGPT's ``BI_i = 1 − mean over tokens of cos(input_i, output_i)``."""
    blocks = get_module(model, arch.blocks)
    sums = [0.0] * len(blocks)
    count = [0]
    hooks = []
    for i, blk in enumerate(blocks):
        def hook(m, args, kwargs, out, i=i):
            x = _hidden_of(args, kwargs).float()
            y = (out[0] if isinstance(out, tuple) else out).float()
            sums[i] += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).sum())
        hooks.append(blk.register_forward_hook(hook, with_kwargs=True))
    dev = next(model.parameters()).device
    try:
        for b0 in range(0, ids.shape[0], batch_size):
            x = ids[b0:b0 + batch_size].to(dev)
            model(x, use_cache=False)
            count[0] += x.numel()
    finally:
        for h in hooks:
            h.remove()
    return [1.0 - s / count[0] for s in sums]


# ------------------------------------------------------------------------------------------------ budgets
def depth_budget(model: nn.Module, arch: ArchSpec, *, speedup: Optional[float] = None, flops: Optional[float] = None,
                 sparsity: Optional[float] = None, batch: int = 8, seqlen: int = 512) -> dict:
    """The savings ``w`` (per block) and the saving ``b`` the removal must reach, from one budget."""
    L = len(get_module(model, arch.blocks))
    if speedup is not None:
        from .latency import latency_model
        lat = latency_model(model, batch=batch, seqlen=seqlen)
        t = float(sorted(lat["block_s"])[L // 2])  # one time for blocks of one shape: their median
        total = t * L + lat["rest_s"]
        return {"kind": "speedup", "target": float(speedup), "savings": [t] * L,
                "need": total * (1 - 1 / float(speedup)), "total": total, "latency": lat,
                "unit": f"prefill time (batch {batch} × {seqlen} tokens, modelled)"}
    if flops is not None:
        from .latency import block_flops
        fl = block_flops(model, arch, seqlen=seqlen)
        total = sum(fl["block"]) + fl["rest"]
        return {"kind": "flops", "target": float(flops), "savings": fl["block"], "need": total * (1 - float(flops)),
                "total": total, "unit": f"FLOPs per token (context {seqlen})"}
    k = int(round(float(sparsity) * L))
    return {"kind": "blocks", "target": float(sparsity), "savings": [1.0] * L, "need": float(k), "total": float(L),
            "unit": "blocks"}


def _check_reachable(budget: dict, L: int) -> None:
    w = budget["savings"]
    best = sum(w) - min(w)
    if budget["need"] > best * (1 + 1e-12):
        what = {"speedup": f"--speedup {budget['target']:g}", "flops": f"--flops {budget['target']:g}",
                "blocks": f"--sparsity {budget['target']:g}"}[budget["kind"]]
        raise ValueError(f"{what} cannot be reached by removing blocks: even {L - 1} of {L} blocks removed save "
                         f"{best / budget['total']:.1%} of the {budget['unit']}, {budget['need'] / budget['total']:.1%} "
                         f"is needed")


def select_blocks(rule: str, model: nn.Module, arch: ArchSpec, ids: torch.Tensor, budget: dict, *,
                  progress: bool = False) -> dict:
    """The blocks to remove under ``budget`` by ``rule`` (``depth`` or ``shortgpt``) and how they were chosen."""
    from ..formulations.depth import depth_program
    from ..solvers.whole_model.depth import solve_depth
    L = len(get_module(model, arch.blocks))
    _check_reachable(budget, L)
    w = budget["savings"]
    t0 = time.perf_counter()
    bi = block_influence(model, arch, ids)
    order = sorted(range(L), key=lambda i: bi[i])
    short, s = [], 0.0
    for i in order:
        if s >= budget["need"] - 1e-9 * max(1.0, budget["need"]) or len(short) == L - 1:
            break
        short.append(i)
        s += w[i]
    if rule == "shortgpt":
        return {"rule": rule, "removed": sorted(short), "block_influence": bi, "select_s": time.perf_counter() - t0}
    costs = removal_costs(model, arch, ids, progress=progress)
    prog = depth_program(costs["single"], w, budget["need"], neighbours=costs["neighbours"])
    sol = solve_depth(prog)
    # the program's answer and ShortGPT's (feasible for the same budget) are both measured on the calibration
    # windows: interactions beyond neighbours are not in the model, so the lower measured loss is kept
    _note_output_kind(model, arch, ids)
    measured = {}
    for name, cand in (("program", sol.removed), ("shortgpt", sorted(short))):
        if tuple(cand) not in measured.values():
            with skipped(model, arch, cand):
                measured[name] = calibration_nll(model, ids) - costs["dense"]
        measured[name + "_blocks"] = tuple(cand)
    best = min(("program", "shortgpt"), key=lambda k: measured.get(k, float("inf")))
    return {"rule": rule, "removed": list(measured[best + "_blocks"]), "chosen": best, "costs": costs,
            "predicted_increase": sol.objective, "program_removed": sol.removed,
            "measured_increase": measured.get(best), "candidates": {k: v for k, v in measured.items()
                                                                   if not k.endswith("_blocks")},
            "exact": sol.exact, "solve_s": sol.time_s, "select_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ the run
def prune_depth(model: nn.Module, arch: ArchSpec, calib: torch.Tensor, *, rule: str, options: dict,
                speedup: Optional[float], flops: Optional[float], sparsity: Optional[float],
                measure: bool = True, progress: bool = False) -> dict:
    """Select and remove blocks in place; returns the run record's ``depth`` entry (and ``speed`` when
    ``measure``: the pruned model's prefill speed-up over the dense one, alternated runs)."""
    from .surgery import remove_blocks
    t0 = time.perf_counter()
    opts = depth_rule(rule).resolved(options)
    ids = calib[: int(opts["windows"])]
    if int(opts["tokens"]):
        ids = ids[:, : int(opts["tokens"])]
    budget = depth_budget(model, arch, speedup=speedup, flops=flops, sparsity=sparsity)
    sel = select_blocks(rule, model, arch, ids, budget, progress=progress)
    rec = {"rule": rule, "options": opts, "budget": {k: v for k, v in budget.items() if k != "latency"},
           "calibration_windows": int(ids.shape[0]), **sel}
    if budget.get("latency") is not None:
        rec["latency_model"] = budget["latency"]
    dense = copy.deepcopy(model) if measure else None
    rec["surgery"] = remove_blocks(model, arch, sel["removed"])
    rec["saving"] = sum(budget["savings"][i] for i in sel["removed"]) / budget["total"]
    if measure:
        from .latency import measure_speedup
        rec["speed"] = measure_speedup(dense, model)
        del dense
    rec["time_s"] = time.perf_counter() - t0
    return rec
