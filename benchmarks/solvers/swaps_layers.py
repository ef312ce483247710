"""Swap search and the optimal-diagonal bound on a real model's layers: both sides of the certified gap.

Collects the Grams of every linear sub-layer of the chosen blocks from one forward of the dense model on C4
calibration text (dense inputs), keeps the first ``--rows`` output rows of each (rows are independent under
per-row and N:M patterns, so a row slice is a layer problem of its own), and per pattern records:
SparseGPT + refit, ``swaps`` from that mask (error, swaps made, certified, time), the lower bound from the
fixed diagonal combinations, from the optimal diagonal (SDP in the diagonal) and the best bound (with the
Lagrangian over the count per matrix, or branch-and-bound on the loosest rows within ``--bnb-s``), and the
certified relative gaps ``(f − bound)/f`` of each solution under each bound. One JSON line per (layer, pattern) in ``--out``
(resumes: lines already there are skipped), and a Markdown summary (medians per pattern) printed at the end.

    python benchmarks/solvers/swaps_layers.py --model smollm2-135m --blocks 0,15,29 --patterns row,2:4 --rows 64 \
        --out benchmarks/results/swaps_layers_smollm2.jsonl
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

from optprune.formulations import parse_pattern  # noqa: E402
from optprune.solvers import get_method  # noqa: E402


def _pattern(s: str):
    if s in ("row", "unstructured"):
        return parse_pattern(s, 0.5)
    return parse_pattern(s)


def summary(rows: list[dict]) -> str:
    """Medians per pattern, as a Markdown table, from the JSON lines."""
    out = ["| pattern | layers | f(swaps)/f(SparseGPT+refit) | swaps certified | certified gap of SparseGPT+refit, "
           "diagonal → best bound | certified gap of swaps: diagonal → optimal diagonal → best bound "
           "| best bound | bound time (s) |",
           "|---|---|---|---|---|---|---|---|"]
    for pat in sorted({r["pattern"] for r in rows}):
        rs = [r for r in rows if r["pattern"] == pat]
        med = lambda k: statistics.median(r.get(k, r["gap_sw_new"]) for r in rs)  # noqa: E731
        kinds = sorted({r["bound_method"].split(" (")[0].split(",")[0] for r in rs})
        out.append(f"| {pat} | {len(rs)} | {med('ratio'):.3f} | {sum(r['certified'] for r in rs)}/{len(rs)} | "
                   f"{med('gap_sg_old'):.3f} → {med('gap_sg_new'):.3f} | {med('gap_sw_old'):.3f} → "
                   f"{med('gap_sw_sdp'):.3f} → {med('gap_sw_new'):.3f} | {'; '.join(kinds)} | {med('bound_s'):.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--blocks", default="0")
    ap.add_argument("--patterns", default="row,2:4", help="comma list: row (50%% per row), unstructured (50%% per "
                    "matrix), N:M")
    ap.add_argument("--bnb-s", type=float, default=2.0, help="branch-and-bound budget per layer and pattern (s)")
    ap.add_argument("--rows", type=int, default=64, help="output rows kept per layer (0: all)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON lines (resumable)")
    a = ap.parse_args(argv)
    try:
        pats = {s.strip(): _pattern(s.strip()) for s in a.patterns.split(",") if s.strip()}
        blocks = [int(b) for b in a.blocks.split(",")]
        if a.rows < 0:
            raise ValueError("--rows must be ≥ 0")
    except ValueError as e:
        print(f"swaps_layers: error: {e}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    from fista_layers import collect
    from optprune.solvers.verification.certificates import l0_lower_bound
    from optprune.solvers.methods.swaps import polish
    done, rows = set(), []
    if a.out and Path(a.out).exists():
        rows = [json.loads(s) for s in Path(a.out).read_text().splitlines() if s.strip()]
        done = {(r["layer"], r["pattern"]) for r in rows}
    probs = collect(a.model, blocks, a.nsamples, a.seqlen)
    for name, full in probs.items():
        p = full.slice(rows=slice(0, a.rows) if a.rows else None).to(torch.float64)
        for s, pat in pats.items():
            if (name, s) in done:
                continue
            t = time.perf_counter()
            sg = get_method("sparsegpt")(p, pat, refit=True)
            t_sg = time.perf_counter() - t
            t = time.perf_counter()
            sw = polish(p, pat, sg)
            t_sw = time.perf_counter() - t
            t = time.perf_counter()
            b = l0_lower_bound(p, pat, bnb_time_s=a.bnb_s, upper_rows=p.objective(sw.W, per_row=True))
            t_b = time.perf_counter() - t
            old, new = b.info["mixtures_bound"], b.bound
            sdp = b.info["sdp_bound"] if b.info["sdp_bound"] is not None else old
            f_sg, f_sw = sg.info["error"], sw.info["error"]
            gap = lambda f, lb: (f - lb) / f if f > 0 else 0.0  # noqa: E731
            row = {"layer": name, "pattern": s, "shape": list(p.shape), "sparsegpt_refit": f_sg, "swaps": f_sw,
                   "ratio": f_sw / f_sg if f_sg > 0 else 1.0, "swaps_made": sw.info["swaps"],
                   "certified": bool(sw.info["certified_1swap"]), "bound_old": old, "bound_new": new,
                   "bound_sdp": sdp, "bound_lagrangian": b.info.get("lagrangian_bound"), "bnb": b.info.get("bnb"),
                   "bound_method": b.method, "gap_sg_old": gap(f_sg, old), "gap_sg_new": gap(f_sg, new),
                   "gap_sw_sdp": gap(f_sw, max(old, sdp)),
                   "gap_sw_old": gap(f_sw, old), "gap_sw_new": gap(f_sw, new), "sparsegpt_s": t_sg,
                   "swaps_s": t_sw, "bound_s": t_b}
            rows.append(row)
            if a.out:
                with open(a.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            print(f"{name} {s} {tuple(p.shape)}: swaps/SparseGPT+refit {row['ratio']:.4f} ({sw.info['swaps']} swaps, "
                  f"{t_sw:.1f}s); gap SparseGPT+refit {row['gap_sg_old']:.3f}→{row['gap_sg_new']:.3f}, swaps "
                  f"{row['gap_sw_old']:.3f}→{row['gap_sw_new']:.3f} (bound {t_b:.1f}s)", flush=True)
    if rows:
        print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
