"""``optprune analyze --model M``: heavy-tailed spectra, α per layer, the three allocations, and plots.

Writes into ``output`` (default ``analysis/``):

* ``esd_<matrix>.png`` — the ESD of one matrix (default: block 0's MLP down projection): a log-log histogram
  of the eigenvalues of ``WᵀW`` with the fitted power law over the tail, ``x_min`` and the candidate limit
  (1.5 × histogram peak) marked; beside it the tail's empirical CCDF against the fitted one.
* ``layers.png`` — α per block (mean, with every matrix's α; hollow markers: tails of fewer than 10
  eigenvalues) and the sparsity per block of the uniform, OWL and alpha allocations side by side, with the
  target S, the alpha band ``[S(1−ε), S(1+ε)]`` and the public code's unclipped alpha map (× markers).
* ``analysis.json`` — model, settings, every matrix's shape metrics (α, x_min, n_tail, KS, stable rank,
  spectral norm, alpha-weighted, log spectral norm, log norm) and each allocation's per-block and per-sub-layer
  sparsities with the weighted mean achieved.

OWL needs calibration activations: the model's protocol source (stories260K: WikiText-2 validation; otherwise
C4), ``nsamples`` windows (default ``min(32, protocol)``) of the protocol's length, seed ``seed``. When no
calibration text can be read, OWL is left out (said in the JSON and on stdout), the rest still runs.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Optional

import torch

from ..solvers.whole_model.allocation import ALLOCATIONS
from ..solvers.serialization import to_json
from .allocation import AllocationError, model_spectra
from .allocation_targets import layer_sparsities
from .architectures import get_arch

__all__ = ["analyze", "resolve_matrix", "plot_esd", "plot_layers"]


def _load(model, model_dir):
    if not isinstance(model, (str, os.PathLike)):
        return model, None, {"name": type(model).__name__}
    from .loading import load_model
    return load_model(model, model_dir=model_dir)


def resolve_matrix(arch, names: list, matrix: Optional[str]) -> str:
    """Full name of the matrix to plot: default block 0's MLP down; accepts a full name or a unique suffix
    (``3.mlp.down_proj``, ``layers.3.self_attn.o_proj``)."""
    if matrix is None:
        down = arch.mlp.down if arch.mlp else arch.sublayer_names()[-1]
        return f"{arch.blocks}.0.{down}"
    if matrix in names:
        return matrix
    hits = [n for n in names if n.endswith("." + matrix)]
    if len(hits) == 1:
        return hits[0]
    raise AllocationError(f"matrix {matrix!r} {'is ambiguous' if hits else 'not found'}; use a full name such as "
                          f"{names[0]!r}")


def _calibration(tokenizer, meta, data_dir, seed, nsamples, seqlen, calibration):
    from .data import calibration_tokens, get_protocol
    proto = get_protocol("smoke" if meta.get("builtin") == "stories260k" else "cpu")
    src = calibration or proto.calibration
    ns = int(nsamples or min(32, proto.nsamples))
    sl = int(seqlen or proto.seqlen)
    ids, info = calibration_tokens(tokenizer, src, nsamples=ns, seqlen=sl, seed=seed, data_dir=data_dir,
                                   return_info=True)
    return ids, info


# ------------------------------------------------------------------------------------------------ plots
def plot_esd(path, spectrum, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    import numpy as np

    ev = spectrum.eigs.numpy()
    ev = ev[ev > 0]
    f = spectrum.fit
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = np.logspace(np.log10(ev.min()), np.log10(ev.max()), min(60, max(10, len(ev) // 4)) + 1)
    cnt, edges = np.histogram(ev, bins=bins)
    dens = cnt / (len(ev) * np.diff(edges))
    ax.bar(edges[:-1], dens, width=np.diff(edges), align="edge", color="#9ecae1", edgecolor="#3182bd",
           linewidth=0.5, label=f"ESD ({len(ev)} eigenvalues)")
    x = np.logspace(np.log10(f.xmin), np.log10(ev.max()), 100)
    frac = f.n_tail / len(ev)
    ax.plot(x, frac * (f.alpha - 1) / f.xmin * (x / f.xmin) ** (-f.alpha), color="#d62728", lw=2,
            label=f"power law α = {f.alpha:.2f}")
    ax.axvline(f.xmin, color="#d62728", ls="--", lw=1, label=f"x_min = {f.xmin:.3g} (n_tail = {f.n_tail})")
    if f.xmin_max is not None:
        ax.axvline(f.xmin_max, color="grey", ls=":", lw=1, label=f"x_min candidates ≤ 1.5·peak = {f.xmin_max:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ of WᵀW")
    ax.set_ylabel("density")
    ax.set_title("empirical spectral density (log-log)")
    ax.legend(fontsize=8, loc="lower left")
    tail = np.sort(ev[ev >= f.xmin])
    n = len(tail)
    ccdf = 1.0 - np.arange(n) / n
    ax2.loglog(tail, ccdf, "o", ms=3, color="#3182bd", label="tail, empirical CCDF")
    ax2.loglog(tail, (tail / f.xmin) ** (1 - f.alpha), color="#d62728", lw=2, label="fitted CCDF (x/x_min)^(1−α)")
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide
    if n and tail[-1] / tail[0] < 10:  # less than a decade: a few plain ticks instead of none
        ticks = np.geomspace(tail[0], tail[-1], 4)
        ax2.set_xticks(ticks)
        ax2.set_xticklabels([f"{t:.3g}" for t in ticks])
    ax2.set_xlabel("λ ≥ x_min")
    ax2.set_ylabel("P(Λ ≥ λ)")
    ax2.set_title(f"tail fit: KS distance D = {f.ks:.3f}, σ(α) ≈ {f.sigma:.2f}")
    ax2.legend(fontsize=8, loc="lower left")
    fig.suptitle(title or spectrum.name, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_layers(path, spectra, allocations: dict, sparsity: float, eps: float, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = sorted({s.block for s in spectra})
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(10, 0.32 * len(blocks) + 6), 7.5), sharex=True)
    subs = []
    for s in spectra:
        sub = s.name.split(f".{s.block}.", 1)[-1]
        if sub not in subs:
            subs.append(sub)
    cmap = plt.get_cmap("tab10")
    for k, sub in enumerate(subs):
        pts = [(s.block, s.alpha, s.fit.small_tail) for s in spectra if s.name.endswith("." + sub)]
        xs = np.array([p[0] for p in pts]) + (k - len(subs) / 2) * 0.06
        ys = np.array([p[1] for p in pts])
        small = np.array([p[2] for p in pts])
        c = cmap(k % 10)
        ax.scatter(xs[~small], ys[~small], s=14, color=c, alpha=0.8, label=sub)
        if small.any():
            ax.scatter(xs[small], ys[small], s=22, facecolors="none", edgecolors=c, alpha=0.9)
    mean = [np.mean([s.alpha for s in spectra if s.block == b]) for b in blocks]
    ax.plot(blocks, mean, "k-o", lw=2, ms=5, label="block mean α (AlphaPruning)")
    ax.set_ylabel("power-law α of WᵀW")
    ax.set_title("α per layer (hollow: tail of < 10 eigenvalues)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    names = [n for n in ("uniform", "owl", "alpha") if n in allocations]
    colors = {"uniform": "#bdbdbd", "owl": "#fd8d3c", "alpha": "#3182bd"}
    w = 0.8 / max(1, len(names))
    for k, n in enumerate(names):
        per = allocations[n]["per_block"]
        ax2.bar(np.array(blocks) + (k - (len(names) - 1) / 2) * w, [per[b] for b in blocks], width=w,
                color=colors[n], label=f"{n} (weighted mean {allocations[n]['weighted_mean']:.4f})")
    if "alpha" in allocations and allocations["alpha"].get("public_map"):
        pub = allocations["alpha"]["public_map"]
        k = names.index("alpha")
        ax2.scatter(np.array(blocks) + (k - (len(names) - 1) / 2) * w, [pub[b] for b in blocks], marker="x",
                    color="#08306b", zorder=5, label="alpha, public code (unclipped)")
    ax2.axhline(sparsity, color="k", lw=1, label=f"target S = {sparsity}")
    ax2.axhline(sparsity * (1 + eps), color="#3182bd", ls="--", lw=0.8, label=f"alpha band S(1±ε), ε = {eps}")
    ax2.axhline(sparsity * (1 - eps), color="#3182bd", ls="--", lw=0.8)
    ax2.axhline(1.0, color="red", ls=":", lw=0.8)
    ax2.set_ylabel("sparsity")
    ax2.set_xlabel("decoder block")
    ax2.set_title("layer-wise sparsity: uniform / OWL / alpha")
    lo = min(min(a["per_block"].values()) for a in allocations.values())
    hi = max([max(a["per_block"].values()) for a in allocations.values()] +
             ([max(allocations["alpha"]["public_map"].values())] if "alpha" in allocations else []))
    ax2.set_ylim(max(0.0, min(lo, sparsity * (1 - eps)) - 0.05), min(1.12, max(hi, sparsity * (1 + eps)) + 0.05))
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax2.set_xticks(blocks)
    ax2.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------------------ analyze
def analyze(model, sparsity: float = 0.7, allocation: str = "alpha", allocation_eps: Optional[float] = None,
            output: str = "analysis", matrix: Optional[str] = None, data_dir=None, model_dir=None, device=None,
            seed: int = 0, _cli: bool = False, calibration: Optional[str] = None, nsamples: Optional[int] = None,
            seqlen: Optional[int] = None, granularity: str = "block", **_) -> dict:
    """Spectral analysis + allocations + plots; returns the record written to ``analysis.json``."""
    t0 = time.perf_counter()
    key = (allocation or "alpha").strip().lower()
    if key not in ALLOCATIONS:
        raise AllocationError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise AllocationError(f"sparsity must be in [0, 1), got {sparsity}")
    m, tok, meta = _load(model, model_dir)
    arch = get_arch(m)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    from .allocation import prunable_matrices
    names = [n for n, *_ in prunable_matrices(m, arch)]
    target = resolve_matrix(arch, names, matrix)
    dev = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else None)
    spectra = model_spectra(m, arch, device=dev, keep_eigs=[target])
    eps = 0.3 if allocation_eps is None else float(allocation_eps)
    allocs, notes = {}, {}
    for name in ("uniform", "alpha", "owl"):
        kw = {}
        if name == "owl":
            try:
                ids, cinfo = _calibration(tok, meta, data_dir, seed, nsamples, seqlen, calibration)
            except (FileNotFoundError, ValueError, ImportError, TypeError) as e:
                notes["owl"] = f"left out: no calibration data ({e})"
                continue
            kw = {"calib_ids": ids}
            notes["owl_calibration"] = cinfo
        tg, info = layer_sparsities(m, arch, name, sparsity, eps=allocation_eps if name != "uniform" else None,
                                    spectra=spectra if name == "alpha" else None, granularity=granularity, **kw)
        per_block = {}
        for n, s in tg.items():
            per_block.setdefault(int(n.split(f"{arch.blocks}.", 1)[1].split(".", 1)[0]), s)
        allocs[name] = {"per_block": per_block, "per_sublayer": tg, "weighted_mean": info["weighted_mean"],
                        "min": info["min"], "max": info["max"],
                        **{k: info[k] for k in ("public_map", "public_map_out_of_range", "scale_c", "clip_active",
                                                "active_upper", "active_lower", "eps", "lam", "shift",
                                                "outlier_ratio", "max_deviation_from_public_map") if k in info}}
        if name == "alpha" and granularity == "block":
            allocs[name]["public_map"] = {int(u): v for u, v in zip(info["units"], info["public_map"])}
    label = meta.get("builtin") or meta.get("name")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", target)
    sp_by = {s.name: s for s in spectra}
    esd = plot_esd(out / f"esd_{safe}.png", sp_by[target], title=f"{label}: {target}")
    if granularity == "block":
        layers = plot_layers(out / "layers.png", spectra, allocs, float(sparsity), eps,
                             title=f"{label}: AlphaPruning analysis at S = {sparsity}")
    else:
        layers = None
    blocks = sorted({s.block for s in spectra})
    record = {"model": meta, "sparsity": float(sparsity), "allocation": key, "allocation_eps": allocation_eps,
              "eps_used": eps, "granularity": granularity, "matrix": target, "device": str(dev or "cpu"),
              "alpha_per_block": {b: sum(s.alpha for s in spectra if s.block == b) /
                                  sum(1 for s in spectra if s.block == b) for b in blocks},
              "matrices": [s.to_dict() for s in spectra], "allocations": allocs, "notes": notes,
              "plots": {"esd": esd, "layers": layers}, "time_s": time.perf_counter() - t0}
    record = to_json(record, string_keys=False)
    jpath = out / "analysis.json"
    with open(jpath, "w") as fh:
        json.dump(record, fh, indent=1)
    record["plots"]["json"] = str(jpath)
    if _cli:
        ab = record["alpha_per_block"]
        print(f"{label}: {len(spectra)} matrices in {len(blocks)} blocks; α per block "
              f"min {min(ab.values()):.2f} max {max(ab.values()):.2f}")
        for name, a in allocs.items():
            print(f"  {name:8s} sparsity per block {min(a['per_block'].values()):.3f} .. "
                  f"{max(a['per_block'].values()):.3f}, weighted mean {a['weighted_mean']:.6f}")
        for k, v in notes.items():
            if isinstance(v, str):
                print(f"  {k}: {v}")
        print(f"ESD plot:     {esd}")
        if layers:
            print(f"layers plot:  {layers}")
        print(f"analysis:     {jpath}")
    return record
