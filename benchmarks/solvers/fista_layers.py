"""Layer-level study: does the ℓ1 model find better (mask, weights) than SparseGPT on a real model's layers?

Collects the Grams ``H = X Xᵀ`` of every linear sub-layer of the chosen blocks from one forward of the dense
model on calibration text (dense inputs, no error correction: every method solves the same problem), then
reports per setting the summed layer error ``Σ f(W)`` of each variant relative to SparseGPT's:

* ``sparsegpt+refit`` — SparseGPT's mask with the exact least-squares weights (what any mask can reach);
* ``fista`` — the paper's rule (SparseGPT warm start, K=20, T=3, ξ=0.3, best *rounded* iterate);
* ``fista+refit`` — the same plus the final least-squares refit on its support;
* ``fista+debias`` — ``debias_iters=20``: every rounded iterate is debiased by masked CG before comparison;
* ``l1-path+refit`` — the best over a λ grid of (converged ℓ1 solution → projection → exact refit): the
  mask quality of the convex model itself, without the K=20 / T=3 budget;
* ``wanda`` for scale.

    python benchmarks/solvers/fista_layers.py [--model stories260k|smollm2-135m] [--blocks 0,2,4] [--nsamples 16]
                                      [--seqlen 256] [--settings 0.5,2:4,0.7] [--no-path] [--no-refit]
"""
from __future__ import annotations

import argparse
import time

import torch

from optprune.formulations import LayerProblem, parse_pattern
from optprune.solvers import get_method
from optprune.solvers.methods.baselines import refit_weights
from optprune.solvers.methods.fista import FistaEngine, default_lambda


def collect(model_name, blocks, nsamples, seqlen):
    from optprune.llm_adapters import data as D
    from optprune.llm_adapters.architectures import get_arch, get_module, linear_weight
    from optprune.llm_adapters.loading import load_model
    model, tok, _ = load_model(model_name)
    model.eval()
    arch = get_arch(model)
    ids = D.calibration_tokens(tok, "c4", nsamples=nsamples, seqlen=seqlen, seed=0)
    blocks_mod = get_module(model, arch.blocks)
    grams, weights, hooks = {}, {}, []
    for bi in blocks:
        for sub in arch.sublayer_names():
            mod = get_module(blocks_mod[bi], sub)
            name = f"{bi}.{sub}"
            weights[name] = linear_weight(mod, sub in arch.transposed).detach().float().clone()

            def pre(m, a, name=name):
                x = a[0].reshape(-1, a[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x
            hooks.append(mod.register_forward_pre_hook(pre))
    with torch.no_grad():
        for i in range(0, nsamples, 4):
            model(ids[i:i + 4])
    for h in hooks:
        h.remove()
    return {k: LayerProblem(W0=weights[k], H=grams[k].float(), name=k) for k in weights}


def l1_path_refit(p, pat, fracs=(0.03, 0.1, 0.2, 0.3, 0.5)):
    eng = FistaEngine(p)
    lref = default_lambda(p, pat)
    best = float("inf")
    W = p.W0
    for fr in fracs:
        W = eng.run(W, fr * lref, 300).clone()
        best = min(best, p.objective(refit_weights(p, pat.project(W.abs()))))
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--blocks", default="0,2,4")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--settings", default="0.5,2:4,0.7")
    ap.add_argument("--no-path", action="store_true", help="skip the (slow) converged ℓ1-path study")
    ap.add_argument("--no-refit", action="store_true",
                    help="skip the exact-refit variants (per-row Cholesky: slow for n = 1536)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    probs = collect(a.model, [int(b) for b in a.blocks.split(",")], a.nsamples, a.seqlen)
    print(f"{a.model}: {len(probs)} sub-layers of blocks {a.blocks}, Grams from {a.nsamples}×{a.seqlen} C4 tokens "
          f"(dense inputs) in {time.perf_counter() - t0:.1f} s")
    variants = {
        "sparsegpt+refit": None,
        "fista": {},
        "fista+refit": {"refit": True},
        "fista+debias": {"debias_iters": 20},
        "wanda": None,
    }
    if a.no_refit:
        variants = {k: v for k, v in variants.items() if "refit" not in k}
    for st in a.settings.split(","):
        pat = parse_pattern(st, 0.5) if ":" in st else parse_pattern("unstructured", float(st))
        tot = {"sparsegpt": 0.0}
        times = {}
        kept = 0
        for name, p in probs.items():
            sg = get_method("sparsegpt")(p, pat)
            tot["sparsegpt"] += sg.info["error"]
            times["sparsegpt"] = times.get("sparsegpt", 0) + sg.info["time_s"]
            for v, opts in variants.items():
                t = time.perf_counter()
                if v == "sparsegpt+refit":
                    e = p.objective(refit_weights(p, sg.mask))
                elif v == "wanda":
                    e = get_method("wanda")(p, pat).info["error"]
                else:
                    r = get_method("fista")(p, pat, **opts)
                    e = r.info["error"]
                    if v == "fista":
                        kept += bool(r.info["returned_warm_start"])
                tot[v] = tot.get(v, 0.0) + e
                times[v] = times.get(v, 0) + time.perf_counter() - t
            if not a.no_path:
                t = time.perf_counter()
                tot["l1-path+refit"] = tot.get("l1-path+refit", 0.0) + l1_path_refit(p, pat)
                times["l1-path+refit"] = times.get("l1-path+refit", 0) + time.perf_counter() - t
        base = tot["sparsegpt"]
        print(f"[{st}] Σf relative to SparseGPT (Σf = {base:.5g}); fista kept the warm start in {kept}/{len(probs)}")
        for k, v in tot.items():
            print(f"   {k:16s} {v / base:7.4f}   ({times.get(k, 0):.1f} s)")


if __name__ == "__main__":
    main()
