"""Per-layer reconstruction error of SPAP and the structured baselines on real MLP (or head) layers.

Dense-input layer problems of every block's ``down_proj`` (``--kind mlp``) or ``o_proj`` (``--kind heads``) of a
model (default stories260K), calibrated on WikiText-2 validation windows, then each method at each sparsity.
Prints the relative error ``f(W)/f(0)`` (FLAP: including its bias compensation) and the time per layer, and the
proven optimum (exhaustive search over group subsets with the exact refit) when ``C(g, k)`` is small (heads).

    python benchmarks/structured/bench_spap_layers.py --sparsities 0.2,0.3,0.5
    python benchmarks/structured/bench_spap_layers.py --model smollm2-135m --blocks 0,15,29 --sparsities 0.3 \
        --methods "spap,spap(direct V)"      # the Woodbury V-step against the factorised one

``--model`` is a built-in name (stories260k, smollm2-135m) or a model folder, loaded as every optprune command does.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from pathlib import Path

import torch

from optprune.llm_adapters.architectures import get_arch
from optprune.llm_adapters.surgery import capture_problems, structure_pattern
from optprune.solvers import get_method
from optprune.solvers.methods.structured_baselines import group_refit

REPO = Path(__file__).resolve().parents[2]
METHODS = [("group_magnitude", "group_magnitude", {}), ("flap", "flap", {}), ("flap+refit", "flap", {"refit": True}),
           ("group_obs", "group_obs", {}), ("spap(init=penalty)", "spap", {"init": "penalty"}), ("spap", "spap", {}),
           ("spap(direct V)", "spap", {"fast_vstep": False})]


def enumerate_optimum(p, pat) -> float:
    groups = pat.group_list(p.n)
    best = float("inf")
    for S in itertools.combinations(range(len(groups)), pat.keep_groups(p.n)):
        cols = torch.zeros(p.n, dtype=torch.bool)
        for j in S:
            cols[groups[j]] = True
        best = min(best, p.objective(group_refit(p, cols)))
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(os.environ.get("OPTPRUNE_MODEL_DIR", Path.home() / ".cache" / "optprune" / "models"))
                                           / "stories260K"))
    ap.add_argument("--data-dir", default=os.environ.get("OPTPRUNE_DATA_DIR", str(Path.home() / ".cache" / "optprune" / "data")))
    ap.add_argument("--kind", default="mlp", choices=["mlp", "heads"])
    ap.add_argument("--sparsities", default="0.2,0.3,0.5")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-subsets", type=int, default=20000, help="enumerate the optimum when C(g,k) ≤ this")
    ap.add_argument("--methods", default=None, help="comma list of the labels to run (default: all): "
                    + ", ".join(m[0] for m in METHODS))
    ap.add_argument("--blocks", default=None, help="comma list of block indices (default: all)")
    args = ap.parse_args(argv)
    methods = METHODS
    if args.methods:
        want = [x.strip() for x in args.methods.split(",")]
        unknown = sorted(set(want) - {m[0] for m in METHODS})
        if unknown:
            ap.error(f"unknown method label(s) {unknown}; choose from {[m[0] for m in METHODS]}")
        methods = [m for m in METHODS if m[0] in want]
    torch.set_num_threads(args.threads)
    from optprune.llm_adapters.loading import load_model
    model, tok, _ = load_model(args.model, dtype=torch.float32)
    model.eval()
    text = (Path(args.data_dir) / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:400_000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, ids.numel() - args.seqlen - 1, (args.nsamples,), generator=g)
    calib = torch.stack([ids[s:s + args.seqlen] for s in starts])
    arch = get_arch(model)
    probs = capture_problems(model, calib, kind=args.kind)
    blocks = list(range(len(probs))) if args.blocks is None else [int(b) for b in args.blocks.split(",")]
    print(f"{Path(args.model).name}, {args.kind}: blocks {blocks} of {len(probs)} layers of shape {list(probs[0].shape)}, "
          f"calibration {args.nsamples}×{args.seqlen} WikiText-2 valid tokens (seed 0), dense inputs")
    for s in (float(x) for x in args.sparsities.split(",")):
        print(f"\nsparsity {s:.0%}  relative error f(W)/f(0) per block; mean; time per layer")
        print(f"{'method':20s} " + " ".join(f"{'b' + str(i):>9s}" for i in blocks) + f" {'mean':>8s} {'time':>7s}")
        _, pat0 = structure_pattern(model, arch, 0, args.kind, s)
        g0, k0 = pat0.n_groups(probs[0].n), pat0.keep_groups(probs[0].n)
        if math.comb(g0, k0) <= args.max_subsets:  # small enough: the proven optimum by enumeration
            errs = []
            for i in blocks:
                p = probs[i]
                _, pat = structure_pattern(model, arch, i, args.kind, s)
                errs.append(enumerate_optimum(p, pat) / p.constant())
            print(f"{'optimum (enumerated)':20s} " + " ".join(f"{e:8.5f}" for e in errs)
                  + f" {sum(errs) / len(errs):8.5f}   C({g0},{k0})")
        for label, meth, opts in methods:
            errs, ts = [], []
            for i in blocks:
                p = probs[i]
                _, pat = structure_pattern(model, arch, i, args.kind, s)
                t = time.perf_counter()
                r = get_method(meth)(p, pat, **opts)
                ts.append(time.perf_counter() - t)
                errs.append(r.info.get("error_with_bias", r.info["error"]) / p.constant())
            print(f"{label:20s} " + " ".join(f"{e:8.7f}" for e in errs) + f" {sum(errs) / len(errs):8.7f} "
                  f"{sum(ts) / len(ts):6.2f}s")


if __name__ == "__main__":
    main()
