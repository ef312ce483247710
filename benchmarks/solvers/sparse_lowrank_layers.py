"""Sparse + low-rank against sparse alone on a real model's layers: the layer error of ``sparse-lowrank`` at an
equal parameter count and with the rank's parameters added, next to SparseGPT + refit.

Collects dense-input Grams of every linear sub-layer of the chosen blocks (C4 calibration text), then per layer:
SparseGPT + refit at the pattern, ``sparse-lowrank`` with ``equal_params`` (S pruned by ``r(m + n)`` more weights)
and without it (``r(m + n)`` parameters on top), the error ratios, the parameter counts and the remaining block
gap of S given L. One JSON line per layer in ``--out`` and a line per layer printed.

    python benchmarks/solvers/sparse_lowrank_layers.py --model stories260k --blocks 0,2,4 --rank 8 \\
        --out benchmarks/results/sparse_lowrank_layers_stories260k.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from optprune.formulations import Unstructured  # noqa: E402
from optprune.solvers import get_method  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--blocks", default="0")
    ap.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity per matrix")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", default=None, help="JSON lines")
    a = ap.parse_args(argv)
    try:
        blocks = [int(b) for b in a.blocks.split(",")]
        pat = Unstructured(a.sparsity)
        if a.rank < 1:
            raise ValueError("--rank must be ≥ 1")
    except ValueError as e:
        print(f"sparse_lowrank_layers: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    from fista_layers import collect
    sg, sl = get_method("sparsegpt"), get_method("sparse-lowrank")
    for name, p in collect(a.model, blocks, a.nsamples, a.seqlen).items():
        p = p.to(torch.float64)
        f_sg = sg(p, pat, refit=True).info["error"]
        t = time.perf_counter()
        eq = sl(p, pat, rank=a.rank, equal_params=True)
        t_eq = time.perf_counter() - t
        more = sl(p, pat, rank=a.rank)
        row = {"layer": name, "shape": list(p.shape), "sparsegpt_refit": f_sg, "slr_equal": eq.info["error"],
               "slr_equal_ratio": eq.info["error"] / f_sg, "slr_equal_params": eq.info["params"],
               "sparse_params": pat.kept_count(p.shape), "slr_more": more.info["error"],
               "slr_more_ratio": more.info["error"] / f_sg, "slr_more_params": more.info["params"],
               "block_gap_S": eq.info["block_gaps"]["S_given_L"], "slr_equal_s": t_eq}
        print(f"{name} {tuple(p.shape)}: SparseGPT+refit {f_sg:.4g}; S+L at equal parameters "
              f"{row['slr_equal_ratio']:.3f}×; S+L with +{more.info['params'] - pat.kept_count(p.shape)} parameters "
              f"{row['slr_more_ratio']:.3f}× ({t_eq:.1f} s)", flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
