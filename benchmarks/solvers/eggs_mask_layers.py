"""Layer-level study of mask-only EGGS: the layer objective ``f(W0 ⊙ mask)`` of the expander N:M masks chosen by
score (``mask=score``) and then improved for the objective itself (``mask=error``), against Wanda's
unconstrained N:M mask (no weight update for any of them).

Collects the Grams of every linear sub-layer of the chosen blocks from one forward of the dense model on C4
calibration text (dense inputs: every method solves the same problem) and prints per layer ``f`` relative to
Wanda's, the search's sweeps and the time. A JSON summary goes to ``--out`` (default: print only).

    python benchmarks/solvers/eggs_mask_layers.py --model smollm2-135m --blocks 0,10,20 --pattern 2:4 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fista_layers import collect  # noqa: E402  (the same Gram collection as the FISTA layer study)

from optprune.formulations import NM, parse_pattern  # noqa: E402
from optprune.solvers import get_method  # noqa: E402

VARIANTS = {  # label -> eggs options
    "eggs_score": {"mask": "score"},
    "eggs_error": {"mask": "error"},
    "eggs_error_wanda": {"mask": "error", "score": "wanda"},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--blocks", default="0,2,4")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--pattern", default="2:4", help="N:M (B = --min-degree)")
    ap.add_argument("--min-degree", type=int, default=1)
    ap.add_argument("--sweeps", type=int, default=None, help="mask=error sweeps (default: the method's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    try:
        pat = parse_pattern(a.pattern)
        if not isinstance(pat, NM):
            raise ValueError(f"--pattern must be N:M, got {a.pattern!r}")
        blocks = [int(b) for b in a.blocks.split(",")]
    except ValueError as e:
        print(f"eggs_mask_layers: error: {e}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    probs = collect(a.model, blocks, a.nsamples, a.seqlen)
    rows = []
    for name, p in probs.items():
        t = time.perf_counter()
        w = get_method("wanda")(p, pat)
        row = {"layer": name, "shape": list(p.shape), "wanda": p.objective(w.W), "wanda_s": time.perf_counter() - t}
        for label, opts in VARIANTS.items():
            o = dict(opts, min_degree=a.min_degree, graph=False)
            if opts["mask"] == "error" and a.sweeps is not None:
                o["sweeps"] = a.sweeps
            t = time.perf_counter()
            r = get_method("eggs")(p, pat, **o)
            row[label] = p.objective(r.W)
            row[f"{label}_s"] = time.perf_counter() - t
            row[f"{label}_sweeps"] = r.info.get("search_sweeps")
        rows.append(row)
        print(name, tuple(p.shape), " ".join(
            f"{lb}={row[lb] / row['wanda']:.4f} ({row[lb + '_s']:.2f}s"
            + (f", {row[lb + '_sweeps']} sweeps)" if row[lb + "_sweeps"] is not None else ")") for lb in VARIANTS),
            flush=True)
    summary = {lb: {"median_ratio_to_wanda": statistics.median(r[lb] / r["wanda"] for r in rows),
                    "max_ratio_to_wanda": max(r[lb] / r["wanda"] for r in rows),
                    "total_s": sum(r[f"{lb}_s"] for r in rows)} for lb in VARIANTS}
    for lb, s in summary.items():
        print(f"{lb}: f/f_wanda median {s['median_ratio_to_wanda']:.4f}, max {s['max_ratio_to_wanda']:.4f}, "
              f"{s['total_s']:.1f} s in all")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "blocks": blocks, "pattern": a.pattern,
                                           "min_degree": a.min_degree, "sweeps": a.sweeps, "rows": rows,
                                           "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
