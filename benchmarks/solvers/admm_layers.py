"""Layer-level check of the ADMM L0 solver against SparseGPT on a real model's layers.

Collects the Grams of every linear sub-layer of the chosen blocks from one forward of the dense model on C4
calibration text (dense inputs: every method solves the same problem), prunes each layer with SparseGPT and with
``admm`` (and optionally other methods), and prints per layer ``f(W)`` relative to SparseGPT's and the solve
time. A JSON summary goes to ``--out`` (default: print only).

    python benchmarks/solvers/admm_layers.py --model smollm2-135m --blocks 0,10,20 --settings 0.7,2:4,0.5 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fista_layers import collect  # noqa: E402  (the same Gram collection as the FISTA layer study)

from optprune.formulations import parse_pattern  # noqa: E402
from optprune.solvers import get_method  # noqa: E402


def _pattern(setting: str):
    return parse_pattern(setting) if ":" in setting else parse_pattern("unstructured", float(setting))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--blocks", default="0,2,4")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--settings", default="0.7,2:4,0.5")
    ap.add_argument("--methods", default="admm", help="comma list compared with sparsegpt")
    ap.add_argument("-O", action="append", default=[], metavar="KEY=VALUE", help="admm option (JSON values)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    try:
        settings = [s.strip() for s in a.settings.split(",") if s.strip()]
        pats = {s: _pattern(s) for s in settings}
        blocks = [int(b) for b in a.blocks.split(",")]
        opts = {}
        for kv in a.O:
            k, _, v = kv.partition("=")
            try:
                opts[k] = json.loads(v)
            except json.JSONDecodeError:
                opts[k] = v
    except ValueError as e:
        print(f"admm_layers: error: {e}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    probs = collect(a.model, blocks, a.nsamples, a.seqlen)
    rows = []
    for s, pat in pats.items():
        for name, p in probs.items():
            t = time.perf_counter()
            sg = get_method("sparsegpt")(p, pat)
            row = {"setting": s, "layer": name, "shape": list(p.shape), "sparsegpt": sg.info["error"],
                   "sparsegpt_s": time.perf_counter() - t}
            for meth in a.methods.split(","):
                t = time.perf_counter()
                r = get_method(meth)(p, pat, **(opts if meth == "admm" else {}))
                row[meth] = p.objective(r.W)
                row[f"{meth}_s"] = time.perf_counter() - t
                row[f"{meth}_info"] = {k: r.info.get(k) for k in ("chosen", "iterations", "stop", "rho_final")}
                assert pat.is_feasible(r.mask), (meth, name)
            rows.append(row)
            print(s, name, tuple(p.shape), " ".join(
                f"{m}={row[m] / row['sparsegpt']:.4f} ({row[m + '_s']:.2f}s {row[m + '_info']})"
                for m in a.methods.split(",")), f"sparsegpt {row['sparsegpt_s']:.2f}s", flush=True)
    for s in pats:
        rs = [r for r in rows if r["setting"] == s]
        for meth in a.methods.split(","):
            ratios = [r[meth] / r["sparsegpt"] for r in rs]
            print(f"{s} {meth}: sum f / sparsegpt = {sum(r[meth] for r in rs) / sum(r['sparsegpt'] for r in rs):.4f}; "
                  f"per layer min {min(ratios):.4f} max {max(ratios):.4f}; above sparsegpt on "
                  f"{sum(x > 1 for x in ratios)} of {len(ratios)} layers; time {sum(r[meth + '_s'] for r in rs):.1f}s "
                  f"vs sparsegpt {sum(r['sparsegpt_s'] for r in rs):.1f}s")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
