"""The run record and the terminal: what a run measured, on which machine and versions, and its summary.

Shared by ``optprune prune`` (:mod:`.engine`) and ``optprune eval`` (:mod:`.run`): versions and machine,
prunable-weight counts, perplexities per protocol, KL/top-1 against a reference, and the summaries printed at
the end of a run. Values become JSON through :func:`optprune.solvers.serialization.to_json`; the pruned model is
written by :mod:`.saving`.
"""
from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path

import torch

from . import data as D
from .evaluation import perplexity
from .settings import RUN_FILE, RunError

__all__ = ["RUN_FILE", "HELDOUT_SEQLEN", "library_versions", "machine_info", "count_prunable", "perplexities",
           "reference_divergence", "in_memory_meta", "print_prune_header", "print_prune_summary",
           "print_eval_summary"]


def library_versions() -> dict:
    """Versions of Python, torch, numpy, transformers and optprune, and the git commit of a checkout."""
    import numpy
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    # the top package is loaded before any of its modules (importing it at module level would be a cycle)
    out["optprune"] = sys.modules[__package__.rsplit(".", 1)[0]].__version__
    try:
        import subprocess
        repo = Path(__file__).resolve().parents[1]
        if (repo / ".git").exists():
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            if commit:
                out["git_commit"] = commit + ("+dirty" if dirty else "")
    except Exception:  # pragma: no cover - git missing
        pass
    return out


def machine_info(device: str) -> dict:
    """Platform, CPU count, torch threads, memory and GPU of this machine, and the run's device."""
    m = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
         "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    m["memory_gb"] = round(int(line.split()[1]) / 2 ** 20, 1)
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        m["cuda"] = torch.cuda.get_device_name(0)
    return m


def _prunable(model, arch):
    from .architectures import get_module, linear_weight
    blocks = get_module(model, arch.blocks)
    for bi, block in enumerate(blocks):
        for sub in arch.sublayer_names():
            yield f"{arch.blocks}.{bi}.{sub}", linear_weight(get_module(block, sub), sub in arch.transposed)


def count_prunable(model, arch) -> tuple[int, int]:
    """(number of weights, number of nonzero weights) over the prunable sub-layers."""
    tot = nz = 0
    for _, W in _prunable(model, arch):
        tot += W.numel()
        nz += int((W != 0).sum())
    return tot, nz


def perplexities(model, tok, settings: dict, data_dir, device, progress, batch_size=None) -> dict:
    """Perplexity of ``model`` on each evaluation text of the settings (``{text: record}``), windows as the
    protocol says."""
    out = {}
    model.to(device)
    for name in settings["eval_datasets"]:
        ids = D.eval_tokens(tok, name, seqlen=settings["eval_seqlen"], data_dir=data_dir)
        r = perplexity(model, ids, settings["eval_seqlen"], max_windows=settings["eval_windows"], device=device,
                       progress=progress, desc=f"eval {name}", batch_size=batch_size)
        r["dataset"] = name
        r["all_windows"] = settings["eval_windows"] is None or r["windows"] < settings["eval_windows"]
        out[name] = r
    return out


#: window of the held-out self-generated sequences of the data-free KL (clipped to the model's context)
HELDOUT_SEQLEN = 512


def reference_divergence(model, tok, reference, settings, *, model_dir, data_dir, device, progress,
                         self_gen=False) -> dict:
    """compare next-token distributions with a reference (dense) model: ``{"divergence": ...}`` on the
    first evaluation text's windows (same windows as the perplexity) when there is a text, and with ``self_gen``
    ``{"divergence_self": ...}`` on held-out sequences sampled from the reference (data-free)."""
    from . import divergence
    from .loading import load_model
    ref, ref_tok, ref_meta = load_model(reference, model_dir=model_dir, device=device)
    out = {}
    if settings["eval_datasets"]:
        name = settings["eval_datasets"][0]
        ids = D.eval_tokens(tok, name, seqlen=settings["eval_seqlen"], data_dir=data_dir)
        L = settings["eval_seqlen"]
        n = ids.numel() // L if settings["eval_windows"] is None else min(ids.numel() // L, settings["eval_windows"])
        windows = ids[: n * L].view(n, L)
        r = divergence.kl_eval(model, ref, windows, progress=progress)
        r.update(reference=ref_meta.get("source"), text=name)
        out["divergence"] = r
    if self_gen:  # data-free: held-out sequences sampled from the reference (seed + 1000)
        r = divergence.heldout_divergence(model, ref, ref_tok, seed=settings["seed"], seqlen=HELDOUT_SEQLEN,
                                          progress=progress)
        r.update(reference=ref_meta.get("source"))
        out["divergence_self"] = r
    del ref
    return out


def in_memory_meta(model, label) -> dict:
    """The record's model entry for a model handed over in memory."""
    from .loading import count_parameters
    cfg = model.config
    return {"name": str(label), "source": "in-memory", "format": "in-memory",
            "model_type": getattr(cfg, "model_type", None), "architecture": type(model).__name__,
            "n_params": count_parameters(model),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "num_layers": getattr(cfg, "num_hidden_layers", None), "vocab_size": getattr(cfg, "vocab_size", None)}



# ============================================================================================ terminal
def _fmt(v, spec=".4f", none="-"):
    return none if v is None else format(v, spec)


def _print_ppl(record, file):
    for name, r in (record.get("perplexity") or {}).items():
        win = "all" if r.get("all_windows") else "first"
        dense = (record.get("perplexity_dense") or {}).get(name)
        extra = f"   (dense {dense['ppl']:.3f})" if dense else ""
        print(f"  perplexity {name:<10} {r['ppl']:10.3f}   seqlen {r['seqlen']}, {win} {r['windows']} windows, "
              f"{r['time_s']:.1f} s{extra}", file=file)
    dv = record.get("divergence")
    if dv:
        print(f"  vs reference ({dv.get('text')}): KL {dv.get('kl'):.4f} nats/token, top-1 agreement "
              f"{dv.get('top1'):.3f}", file=file)
    ds = record.get("divergence_self")
    if ds:
        who = "dense" if record.get("command") == "prune" else "reference"
        print(f"  vs {who} (held-out self-generated {ds.get('windows')}×{ds.get('seqlen')}, seed {ds.get('seed')}): "
              f"KL {ds.get('kl'):.4f} nats/token, top-1 agreement {ds.get('top1'):.3f}", file=file)


def _budget_text(sparsity, speedup=None, flops=None) -> str:
    return f"speed-up {speedup:g}" if speedup else f"FLOPs {flops:g}" if flops else f"sparsity {sparsity:.2f}"


def print_prune_header(model, spec, sparsity, pattern, settings: dict, *, evaluate, kl, out_dir, file=None,
                       speedup=None, flops=None) -> None:
    """The one line a prune run prints before it starts: model, method, budget, calibration, evaluation, output."""
    file = file or sys.stderr
    calib = "none (data-free method)" if settings["calibration"] == "none" else \
        f"{settings['calibration']} {settings['nsamples']}×{settings['seqlen']} seed {settings['seed']}"
    ev, nt = [], torch.get_num_threads()
    if evaluate:
        ev += [f"perplexity {', '.join(settings['eval_datasets'])}"] if settings["eval_datasets"] else []
        ev += ["KL/top-1 vs dense (held-out self-generated)"] if kl else []
    print(f"[optprune] prune {model}: {spec.name} · {'structured' if spec.structured else pattern} · "
          f"{_budget_text(sparsity, speedup, flops)} · calibration {calib} · eval {'; '.join(ev) or 'off'} · output "
          f"{out_dir if out_dir else '(not saved)'} · {nt} thread{'s' if nt != 1 else ''}", file=file, flush=True)


def print_prune_summary(record: dict, out_dir, file=None) -> None:
    """The end-of-run summary of ``optprune prune``: settings, per-block table, timings, perplexities, output."""
    file = file or sys.stdout
    config, protocol, timings = record["config"], record["protocol"], record["timings"]
    pat = "structured " + str(config["structure"]) if config.get("structure") else config["pattern"]
    if config.get("quant"):
        pat = f"{pat} · {config['quant']}"
    budget = _budget_text(config["sparsity"], config.get("speedup"), config.get("flops"))
    print(f"\noptprune prune: {config['method']} · {pat} · {budget} · "
          f"{record['model'].get('name')} ({record['model'].get('n_params', 0) / 1e6:.2f}M params)", file=file)
    _print_depth(record, file)
    print(f"  protocol {protocol['name']}: calibration {protocol['calibration']} "
          f"{protocol['nsamples']}×{protocol['seqlen']} seed {protocol['seed']}; "
          f"mode {config['mode']}, error correction {'on' if config['error_correction'] else 'off'}"
          f"{', refit' if config['refit'] else ''}", file=file)
    _print_block_table(record.get("layers") or [], record["summary"], file)
    print(f"  time: load {timings.get('load_s', 0):.1f} s, calibration {timings.get('calibration_s', 0):.1f} s, "
          f"prune {timings.get('prune_s') or 0:.1f} s, eval {timings.get('eval_s', 0):.1f} s, "
          f"total {timings['total_s']:.1f} s; peak RSS {record['peak_rss_mb']:.0f} MB", file=file)
    _print_ppl(record, file)
    if out_dir is not None:
        saved = record.get("saved") or {}
        size = f", {saved['weights_bytes'] / 2 ** 20:.1f} MiB of weights" if saved.get("weights_bytes") else ""
        print(f"  saved: {out_dir}/ (model, tokenizer, {RUN_FILE}; {saved.get('save_format', 'dense')} "
              f"{saved.get('dtype', '')}{size})", file=file)


def _print_depth(record: dict, file) -> None:
    """The removed blocks of a depth-pruned run (nothing for other runs)."""
    depth = record.get("depth")
    if not depth:
        return
    speed = record.get("speed") or {}
    n_blocks = len(depth["surgery"]["kept"]) + len(depth["removed"])
    measured = (f"; measured prefill speed-up {speed['speedup']:.3f}× (batch {speed['batch']} × {speed['seqlen']})"
                if speed else "")
    print(f"  removed blocks {depth['removed']} of {n_blocks} ({depth['rule']}); "
          f"{depth['saving']:.1%} of the dense model's {depth['budget']['unit']} removed{measured}", file=file)


def _print_block_table(layers: list, summary: dict, file) -> None:
    """Per block: layers, sparsity, relative error (mean, max) and solve time; then the totals and, for a
    certified run, the certificates' gaps."""
    blocks = {}
    for r in layers:
        b = blocks.setdefault(r["block"], {"n": 0, "w": 0, "z": 0.0, "rel": [], "t": 0.0})
        n = math.prod(r["shape"])
        b["n"] += 1
        b["w"] += n
        b["z"] += r["sparsity"] * n
        b["t"] += r.get("time_s") or 0.0
        if r.get("rel_error") is not None:
            b["rel"].append(r["rel_error"])
    print(f"  {'block':>5} {'layers':>6} {'sparsity':>9} {'rel.err mean':>13} {'rel.err max':>12} {'solve s':>8}",
          file=file)
    for bi, b in sorted(blocks.items()):
        rel = b["rel"]
        print(f"  {bi:>5} {b['n']:>6} {b['z'] / b['w']:>9.4f} {_fmt(sum(rel) / len(rel) if rel else None):>13} "
              f"{_fmt(max(rel) if rel else None):>12} {b['t']:>8.2f}", file=file)
    pruned_w = sum(b["w"] for b in blocks.values())
    pruned_s = sum(b["z"] for b in blocks.values()) / pruned_w if pruned_w else 0.0
    print(f"  {'all':>5} {summary['layers']:>6} {pruned_s:>9.4f} {_fmt(summary['mean_rel_error']):>13} "
          f"{_fmt(summary['max_rel_error']):>12} {sum(b['t'] for b in blocks.values()):>8.2f}   "
          f"(target {_fmt(summary['sparsity_target'])})", file=file)
    if abs(pruned_s - summary["sparsity"]) > 5e-5:  # structured runs: the rows above are the pruned layers only
        print(f"  zeros/removed weights over all {summary['prunable_weights']} prunable weights: "
              f"{summary['sparsity']:.4f}", file=file)
    certificates = summary.get("certificates")
    if certificates:
        gap = certificates["l0_rel_gap"]
        l1 = certificates.get("l1_rel_gap")
        print(f"  certified: (ours − lower bound)/ours over {gap['n']} layers: median {gap['median']:.3g}, "
              f"p90 {gap['p90']:.3g}, max {gap['max']:.3g} (weakest: {certificates['weakest'][0]['name']})"
              + (f"; ℓ1 duality gap median {l1['median']:.2e}" if l1 else ""), file=file)


def print_eval_summary(record: dict, out_file, file=None) -> None:
    """The end-of-run summary of ``optprune eval``."""
    file = file or sys.stdout
    p = record["protocol"]
    print(f"\noptprune eval: {record['model'].get('name')} ({record['model'].get('n_params', 0) / 1e6:.2f}M params), "
          f"protocol {p['name']}", file=file)
    _print_ppl(record, file)
    for task, m in (record.get("zero_shot") or {}).items():
        print(f"  lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()), file=file)
    if out_file is not None:
        print(f"  record: {out_file}", file=file)
