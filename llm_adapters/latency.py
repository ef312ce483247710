"""Measured latency on this machine: per-block prefill times (the depth budget's savings), the speed-up of a
pruned model against its dense original, and a FLOP count per block (docs/methods.md §13).

* :func:`block_times` — one prefill forward of ``batch × seqlen`` random tokens, timed inside every block by
  forward hooks (exact on the CPU, where execution is synchronous); the rest (embeddings, final norm,
  ``lm_head``) is the total minus the blocks. Blocks of one shape get one time (the median of the blocks'
  times over the repeats): their differences are noise of a shared machine, not of the model.
* :func:`latency_model` — :func:`block_times` cached in ``<optprune home>/latency.json``, keyed by the
  model's shapes, the batch, the sequence length, the torch thread count, the CPU and the torch version.
* :func:`measure_speedup` — dense and pruned prefill forwards *alternated* (ABAB…, after a warm-up of each),
  the ratio of the medians: what ``run.json`` records and the speed benchmark reports.
* :func:`block_flops` — multiply-adds ×2 of a block's linear layers and attention scores per token at a given
  context length, and of the ``lm_head``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import platform
import statistics
import time
from typing import Optional

import torch
from torch import nn

from .architectures import ArchSpec, get_arch, get_module

__all__ = ["block_times", "latency_model", "measure_speedup", "block_flops", "prefill_time", "mlp_time_curve",
           "mlp_sparsity_for_speedup"]


@torch.no_grad()
def prefill_time(model: nn.Module, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - t


def _ids(model: nn.Module, batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(model.config.vocab_size), (batch, seqlen), generator=g)


@torch.no_grad()
def block_times(model: nn.Module, arch: Optional[ArchSpec] = None, *, batch: int = 8, seqlen: int = 512,
                repeats: int = 2) -> dict:
    """``{"block_s": [per block], "rest_s", "total_s", "batch", "seqlen", "threads"}`` of one prefill forward
    (medians over ``repeats`` after one warm-up)."""
    arch = arch or get_arch(model)
    blocks = list(get_module(model, arch.blocks))
    ids = _ids(model, batch, seqlen).to(next(model.parameters()).device)
    acc = [0.0] * len(blocks)
    starts: dict = {}
    hooks = []
    for i, blk in enumerate(blocks):
        def pre(_m, _a, i=i):
            starts[i] = time.perf_counter()

        def post(_m, _a, _o, i=i):
            acc[i] += time.perf_counter() - starts.pop(i)
        hooks += [blk.register_forward_pre_hook(pre), blk.register_forward_hook(post)]
    per, totals = [], []
    try:
        model(ids, use_cache=False)  # warm-up
        for _ in range(max(1, repeats)):
            acc[:] = [0.0] * len(blocks)
            t = time.perf_counter()
            model(ids, use_cache=False)
            totals.append(time.perf_counter() - t)
            per.append(list(acc))
    finally:
        for h in hooks:
            h.remove()
    total = statistics.median(totals)
    block = [statistics.median(p[i] for p in per) for i in range(len(blocks))]
    return {"block_s": block, "rest_s": max(0.0, total - sum(block)), "total_s": total, "batch": batch,
            "seqlen": seqlen, "threads": torch.get_num_threads()}


def _key(model: nn.Module, batch: int, seqlen: int) -> str:
    from .surgery import layer_widths
    arch = get_arch(model)
    cfg = model.config
    shape = {"arch": arch.name, "hidden": getattr(cfg, "hidden_size", None), "vocab": getattr(cfg, "vocab_size", None),
             "widths": layer_widths(model, arch), "dtype": str(next(model.parameters()).dtype),
             "batch": batch, "seqlen": seqlen, "threads": torch.get_num_threads(),
             "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:20]


def _cache_path():
    from .data import optprune_home
    return optprune_home() / "latency.json"


def _cache_table() -> dict:
    path = _cache_path()
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def _cache_get(key: str):
    return _cache_table().get(key)


def _cache_put(key: str, rec: dict) -> None:
    """Keep a measurement (written atomically); a read-only home only means it is not kept."""
    path, table = _cache_path(), _cache_table()
    table[key] = rec
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table))
        tmp.replace(path)
    except OSError:
        pass


def latency_model(model: nn.Module, *, batch: int = 8, seqlen: int = 512, cache: bool = True,
                  repeats: int = 2) -> dict:
    """:func:`block_times`, cached on disk per (shapes, batch, seqlen, threads, CPU, torch); ``"cached"`` says
    whether this call measured."""
    key = _key(model, batch, seqlen)
    hit = _cache_get(key) if cache else None
    if hit is not None:
        return dict(hit, cached=True)
    rec = block_times(model, batch=batch, seqlen=seqlen, repeats=repeats)
    if cache:
        _cache_put(key, rec)
    return dict(rec, cached=False)


@torch.no_grad()
def measure_speedup(dense: nn.Module, pruned: nn.Module, *, batch: int = 8, seqlen: int = 512,
                    repeats: int = 2) -> dict:
    """Dense and pruned prefill forwards alternated; ``speedup`` = median dense time / median pruned time
    (after a short warm-up of each: batch 1 × 32 tokens)."""
    ids = _ids(dense, batch, seqlen, seed=1)
    prefill_time(dense, ids[:1, :32]), prefill_time(pruned, ids[:1, :32])  # warm-up
    td, tp = [], []
    for _ in range(max(1, repeats)):
        td.append(prefill_time(dense, ids))
        tp.append(prefill_time(pruned, ids))
    md, mp = statistics.median(td), statistics.median(tp)
    return {"speedup": md / mp, "dense_s": md, "pruned_s": mp, "batch": batch, "seqlen": seqlen,
            "repeats": repeats, "threads": torch.get_num_threads(), "phase": "prefill",
            "how": "dense and pruned forwards alternated, medians; stock transformers, random token ids"}


def block_flops(model: nn.Module, arch: Optional[ArchSpec] = None, *, seqlen: int = 512) -> dict:
    """FLOPs per token: ``{"block": [per block], "rest": lm_head}`` (2 per multiply-add; attention scores and
    values at the mean causal context ``seqlen/2``)."""
    arch = arch or get_arch(model)
    out = []
    for blk in get_module(model, arch.blocks):
        f = 0
        for path in arch.sublayer_names():
            w = get_module(blk, path).weight
            f += 2 * w.numel()
        if arch.heads is not None and not arch.heads.fused_qkv:
            q = get_module(blk, arch.heads.q).weight
            qdim = q.shape[1] if arch.heads.q in arch.transposed else q.shape[0]
            f += 2 * 2 * qdim * (seqlen / 2)
        out.append(float(f))
    head = model.get_output_embeddings()
    rest = float(2 * head.weight.numel()) if head is not None else 0.0
    return {"block": out, "rest": rest, "seqlen": seqlen}


@torch.no_grad()
def mlp_time_curve(model: nn.Module, arch: Optional[ArchSpec] = None, *, batch: int = 8, seqlen: int = 512,
                   fractions: tuple = (1.0, 0.75, 0.5, 0.25, 0.1), repeats: int = 5, cache: bool = True) -> dict:
    """Time of one block's MLP at kept-width fractions ``fractions`` on a ``batch × seqlen`` input: the MLP of
    block 0 shrunk (random neurons: the time depends on the shape only) and timed alone, the minimum of
    ``repeats`` (interference on a shared machine only adds time). Cached beside :func:`latency_model` (key: shapes, batch, seqlen, threads, CPU, torch)."""
    from .surgery import apply_structured, structure_pattern
    from ..solvers.base import LayerResult
    from .architectures import linear_weight
    arch = arch or get_arch(model)
    key = "mlp:" + _key(model, batch, seqlen) + ":" + ",".join(f"{f:g}" for f in fractions)
    hit = _cache_get(key) if cache else None
    if hit is not None:
        return dict(hit, cached=True)
    blk0 = get_module(model, arch.blocks)[0]
    mlp_path = arch.mlp.down.rsplit(".", 1)[0]
    hidden = int(model.config.hidden_size)
    x = torch.randn(batch, seqlen, hidden, dtype=next(model.parameters()).dtype,
                    generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
    width = None
    times = []
    for f in fractions:
        holder = nn.Module()
        holder.b = nn.ModuleList([copy.deepcopy(blk0)])
        tmp_arch = dataclasses.replace(arch, blocks="b")
        name, pat = structure_pattern(holder, tmp_arch, 0, "mlp", 0.0)
        W = linear_weight(get_module(holder.b[0], name), name in arch.transposed).clone()
        n = W.shape[1]
        width = width or n
        k = max(1, int(round(f * n)))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k]] = True
        if k < n:
            mask = torch.zeros_like(W, dtype=torch.bool)
            mask[:, keep] = True
            apply_structured(holder, tmp_arch, 0, "mlp", LayerResult(W * mask, mask, {}), pat)
        mlp = get_module(holder.b[0], mlp_path)
        mlp(x)  # warm-up
        ts = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            mlp(x)
            ts.append(time.perf_counter() - t)
        times.append((k / n, min(ts)))  # interference on a shared machine only adds time: the minimum
    rec = {"width": width, "points": times, "batch": batch, "seqlen": seqlen, "threads": torch.get_num_threads()}
    if cache:
        _cache_put(key, rec)
    return dict(rec, cached=False)


def _interp(points: list, f: float) -> float:
    pts = sorted(points)
    if f <= pts[0][0]:
        (x0, y0), (x1, y1) = pts[0], pts[1]
    elif f >= pts[-1][0]:
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
    else:
        i = next(j for j in range(1, len(pts)) if pts[j][0] >= f)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return max(0.0, y0 + (y1 - y0) * (f - x0) / (x1 - x0))


def mlp_sparsity_for_speedup(blocks: dict, curve: dict, speedup: float) -> dict:
    """The uniform MLP sparsity ``S`` whose modelled prefill time is the dense time ``/ speedup``:
    ``T(S) = rest + Σ_blocks (block_i − mlp(1) + mlp(1 − S))`` with ``mlp(·)`` interpolated in ``curve``;
    bisection on ``S``. Raises ValueError when even one kept neuron per block is not fast enough."""
    L = len(blocks["block_s"])
    m1 = _interp(curve["points"], 1.0)
    dense = blocks["rest_s"] + sum(blocks["block_s"])

    def T(S):
        return blocks["rest_s"] + sum(blocks["block_s"]) - L * m1 + L * _interp(curve["points"], 1.0 - S)
    s_max = 1.0 - 1.0 / curve["width"]
    if dense / T(s_max) < speedup:
        raise ValueError(f"--speedup {speedup:g} cannot be reached by MLP widths alone: the modelled speed-up with "
                         f"one neuron per block left is {dense / T(s_max):.3f}× (the MLPs are "
                         f"{L * m1 / dense:.0%} of the modelled prefill time)")
    lo, hi = 0.0, s_max
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if dense / T(mid) >= speedup:
            hi = mid
        else:
            lo = mid
    return {"sparsity": hi, "modelled_speedup": dense / T(hi), "dense_s": dense, "mlp_share": L * m1 / dense}
