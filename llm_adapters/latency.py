"""Measured latency on this machine: per-block prefill times (the depth budget's savings), the speed-up of a
pruned model against its dense original, and a FLOP count per block (docs/methods.md §13).

* :func:`block_times` — one prefill forward of ``batch × seqlen`` random tokens, timed inside every block by
  forward hooks (exact on the CPU, where execution is synchronous); the rest (embeddings, final norm,
  ``lm_head``) is the total minus the blocks. Blocks of one shape get one time (the median of the blocks'
  times over the repeats): their differences are noise of a shared machine, not of the model.
* :func:`latency_model` — :func:`block_times` cached in ``<optprune home>/latency.json``, keyed by the
  model's shapes, the batch, the sequence length, the thread count, the CPU and the torch version.

Every measurement runs on :data:`SPEED_THREADS` threads (all cores unless ``$OPTPRUNE_SPEED_THREADS`` says
otherwise), whatever the thread count of the prune around it.
* :func:`measure_speedup` — dense and pruned prefill forwards *alternated* (ABAB…, after a warm-up of each),
  the ratio of the medians: what ``run.json`` records and the speed benchmark reports.
* :func:`width_time_curve` — the time of one block's MLP or attention at kept-width fractions (cached the same
  way): the latency model of per-block widths (:mod:`.widths`).
* :func:`block_flops` — multiply-adds ×2 of a block's linear layers and attention scores per token at a given
  context length, and of the ``lm_head``.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import statistics
import time
from typing import Optional

import torch
from torch import nn

from .architectures import ArchSpec, get_arch, get_module

__all__ = ["block_times", "latency_model", "measure_speedup", "block_flops", "prefill_time", "width_time_curve",
           "interpolate", "speed_threads", "SPEED_THREADS"]

#: threads of every latency measurement (the latency model, the width curves, the measured speed-up):
#: ``$OPTPRUNE_SPEED_THREADS``, else all the machine's cores — a speed-up is a property of the machine, not of
#: a prune that runs single-threaded beside other jobs
SPEED_THREADS = int(os.environ.get("OPTPRUNE_SPEED_THREADS") or 0) or os.cpu_count() or None


@contextlib.contextmanager
def speed_threads():
    """Torch's thread count set to :data:`SPEED_THREADS` for the measurements inside."""
    before = torch.get_num_threads()
    if SPEED_THREADS:
        torch.set_num_threads(SPEED_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
             "batch": batch, "seqlen": seqlen, "threads": SPEED_THREADS or torch.get_num_threads(),
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
    with speed_threads():
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
    td, tp = [], []
    with speed_threads():
        threads = torch.get_num_threads()
        prefill_time(dense, ids[:1, :32]), prefill_time(pruned, ids[:1, :32])  # warm-up
        for _ in range(max(1, repeats)):
            td.append(prefill_time(dense, ids))
            tp.append(prefill_time(pruned, ids))
    md, mp = statistics.median(td), statistics.median(tp)
    return {"speedup": md / mp, "dense_s": md, "pruned_s": mp, "batch": batch, "seqlen": seqlen,
            "repeats": repeats, "threads": threads, "phase": "prefill",
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


def _one_block_model(model: nn.Module, arch: ArchSpec) -> nn.Module:
    """A copy of ``model`` with block 0 only and a 1-output ``lm_head``: a cheap forward in which block 0's
    sub-modules can be timed (the vocabulary projection would dominate a small model's forward)."""
    from .surgery import remove_blocks
    L = len(get_module(model, arch.blocks))
    m = copy.deepcopy(model)
    if L > 1:
        remove_blocks(m, arch, list(range(1, L)))
    m.set_output_embeddings(nn.Linear(int(m.config.hidden_size), 1, bias=False).to(next(m.parameters())))
    return m.eval()


def _kind_module(arch: ArchSpec, kind: str) -> str:
    """The sub-module of a block whose time a width of ``kind`` changes (the MLP, or the attention)."""
    table = arch.mlp if kind == "mlp" else arch.heads
    return (table.down if kind == "mlp" else table.o).rsplit(".", 1)[0]


@torch.no_grad()
def width_time_curve(model: nn.Module, arch: Optional[ArchSpec] = None, kind: str = "mlp", *, batch: int = 8,
                     seqlen: int = 512, fractions: tuple = (1.0, 0.75, 0.5, 0.25, 0.1), repeats: int = 3,
                     cache: bool = True) -> dict:
    """Time (s) of one block's MLP (``kind="mlp"``) or attention (``"heads"``, ``"heads:kv"``) at kept-width
    fractions ``fractions`` on a ``batch × seqlen`` prefill: block 0 of a one-block copy of the model shrunk
    (random groups kept: the time depends on the shape only), the sub-module timed by forward hooks, the
    minimum of ``repeats`` (interference on a shared machine only adds time). Points are at the kept fraction
    of groups after rounding; ``block_s`` is the whole dense block's time in the same measurement, so that the
    curve can be read as shares of a block whatever the machine's load was then. Cached beside :func:`latency_model` (key: shapes, batch, seqlen, threads, CPU,
    torch, kind)."""
    from .surgery import apply_structured, structure_pattern
    from ..solvers.base import LayerResult
    from .architectures import linear_weight
    arch = arch or get_arch(model)
    base, _, head_groups = kind.partition(":")
    key = f"width:{kind}:" + _key(model, batch, seqlen) + ":" + ",".join(f"{f:g}" for f in fractions)
    hit = _cache_get(key) if cache else None
    if hit is not None:
        return dict(hit, cached=True)
    with speed_threads():
        one = _one_block_model(model, arch)
        ids = _ids(one, batch, seqlen).to(next(one.parameters()).device)
        kw = {"head_groups": head_groups} if head_groups else {}
        width, times, block_s = None, [], None
        for f in (1.0,) + tuple(f for f in fractions if f != 1.0):
            m = copy.deepcopy(one)
            name, pat = structure_pattern(m, arch, 0, base, 0.0, **kw)
            W = linear_weight(get_module(get_module(m, arch.blocks)[0], name), name in arch.transposed)
            n_groups = pat.n_groups(W.shape[1])
            width = width or n_groups
            k = max(1, int(round(f * n_groups)))
            if k < n_groups:
                keep = torch.zeros(n_groups, dtype=torch.bool)
                keep[torch.randperm(n_groups, generator=torch.Generator().manual_seed(1))[:k]] = True
                mask = pat.mask_from_groups(keep, W.shape[0], W.shape[1])
                _, pat = structure_pattern(m, arch, 0, base, 1.0 - k / n_groups, **kw)
                apply_structured(m, arch, 0, base, LayerResult(W * mask, mask, {}), pat)
            blk = get_module(m, arch.blocks)[0]
            t_mod, t_blk = _module_time(m, get_module(blk, _kind_module(arch, base)), blk, ids, repeats)
            times.append((k / n_groups, t_mod))
            block_s = block_s or t_blk  # the dense block's time, measured with the first (full) width
            del m
    rec = {"kind": kind, "width": width, "points": times, "block_s": block_s, "batch": batch, "seqlen": seqlen,
           "threads": SPEED_THREADS or torch.get_num_threads()}
    if cache:
        _cache_put(key, rec)
    return dict(rec, cached=False)


def _module_time(model: nn.Module, module: nn.Module, block: nn.Module, ids: torch.Tensor,
                 repeats: int) -> tuple[float, float]:
    """The minimum over ``repeats`` forwards of ``model`` (after one warm-up) of ``module``'s time and of its
    ``block``'s time inside it."""
    marks: dict = {}
    spent: dict = {"module": [], "block": []}
    hooks = []
    for what, mod in (("module", module), ("block", block)):
        hooks.append(mod.register_forward_pre_hook(lambda *_, w=what: marks.__setitem__(w, time.perf_counter())))
        hooks.append(mod.register_forward_hook(lambda *_, w=what: spent[w].append(time.perf_counter() - marks[w])))
    try:
        model(ids, use_cache=False)  # warm-up
        spent["module"].clear(), spent["block"].clear()
        for _ in range(max(1, repeats)):
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return min(spent["module"]), min(spent["block"])


def interpolate(points: list, f: float) -> float:
    """Piecewise-linear interpolation (and extrapolation from the end segments) of ``[(x, y)]`` at ``f``, 
    clipped at 0."""
    pts = sorted(points)
    if f <= pts[0][0]:
        (x0, y0), (x1, y1) = pts[0], pts[1]
    elif f >= pts[-1][0]:
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
    else:
        i = next(j for j in range(1, len(pts)) if pts[j][0] >= f)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return max(0.0, y0 + (y1 - y0) * (f - x0) / (x1 - x0))
