"""Per-layer reconstruction error of SPAP and the structured baselines on real MLP (or head) layers.

Dense-input layer problems of every block's ``down_proj`` (``--kind mlp``) or ``o_proj`` (``--kind heads``) of a
model (default stories260K), calibrated on WikiText-2 validation windows, then each method at each sparsity.
Prints the relative error ``f(W)/f(0)`` (FLAP: including its bias compensation) and the time per layer, and the
proven optimum (exhaustive search over group subsets with the exact refit) when ``C(g, k)`` is small (heads).

    python benchmarks/bench_spap_layers.py --sparsities 0.2,0.3,0.5
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
from optprune.solvers.structured_baselines import group_refit

REPO = Path(__file__).resolve().parents[1]
METHODS = [("group_magnitude", "group_magnitude", {}), ("flap", "flap", {}), ("flap+refit", "flap", {"refit": True}),
           ("group_obs", "group_obs", {}), ("spap(init=penalty)", "spap", {"init": "penalty"}), ("spap", "spap", {})]


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
    ap.add_argument("--model", default=str(Path(os.environ.get("OPTPRUNE_MODEL_DIR", REPO.parent / "shared" / "models"))
                                           / "stories260K"))
    ap.add_argument("--data-dir", default=os.environ.get("OPTPRUNE_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--kind", default="mlp", choices=["mlp", "heads"])
    ap.add_argument("--sparsities", default="0.2,0.3,0.5")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-subsets", type=int, default=20000, help="enumerate the optimum when C(g,k) ≤ this")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    text = (Path(args.data_dir) / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:400_000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, ids.numel() - args.seqlen - 1, (args.nsamples,), generator=g)
    calib = torch.stack([ids[s:s + args.seqlen] for s in starts])
    arch = get_arch(model)
    probs = capture_problems(model, calib, kind=args.kind)
    print(f"{Path(args.model).name}, {args.kind}: {len(probs)} layers of shape {list(probs[0].shape)}, "
          f"calibration {args.nsamples}×{args.seqlen} WikiText-2 valid tokens (seed 0), dense inputs")
    for s in (float(x) for x in args.sparsities.split(",")):
        print(f"\nsparsity {s:.0%}  relative error f(W)/f(0) per block; mean; time per layer")
        print(f"{'method':20s} " + " ".join(f"{'b' + str(i):>8s}" for i in range(len(probs))) + f" {'mean':>8s} {'time':>7s}")
        _, pat0 = structure_pattern(model, arch, 0, args.kind, s)
        g0, k0 = pat0.n_groups(probs[0].n), pat0.keep_groups(probs[0].n)
        if math.comb(g0, k0) <= args.max_subsets:  # small enough: the proven optimum by enumeration
            errs = []
            for i, p in enumerate(probs):
                _, pat = structure_pattern(model, arch, i, args.kind, s)
                errs.append(enumerate_optimum(p, pat) / p.constant())
            print(f"{'optimum (enumerated)':20s} " + " ".join(f"{e:8.5f}" for e in errs)
                  + f" {sum(errs) / len(errs):8.5f}   C({g0},{k0})")
        for label, meth, opts in METHODS:
            errs, ts = [], []
            for i, p in enumerate(probs):
                _, pat = structure_pattern(model, arch, i, args.kind, s)
                t = time.perf_counter()
                r = get_method(meth)(p, pat, **opts)
                ts.append(time.perf_counter() - t)
                errs.append(r.info.get("error_with_bias", r.info["error"]) / p.constant())
            print(f"{label:20s} " + " ".join(f"{e:8.5f}" for e in errs) + f" {sum(errs) / len(errs):8.5f} "
                  f"{sum(ts) / len(ts):6.2f}s")


if __name__ == "__main__":
    main()
