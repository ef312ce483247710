"""SPAP and the structured baselines against the proven optimum of the group-selection MIQP on tiny layers.

The optimum is found by exhaustive search over group subsets with the closed-form refit (for column groups
the refit of a support is exact: ``W_S = B_S Ĥ_SS⁻¹``), so it is proven. Instances: ``LayerProblem.random``
of the four kinds (random, correlated, outliers, dead), half of them error-corrected (Ĥ ≠ H), group size 1 or
2, g = 4..12 groups, m = 2..8 rows, sparsity 10..90%.

    python benchmarks/solvers/spap_exactness.py --instances 200

Prints, per method: fraction of instances solved exactly (relative gap ≤ 1e-9), median / 90th percentile / max
relative gap ``(f − f*)/f*``, and the smallest gap (must never be below −1e-9: nothing beats a proven optimum).
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from optprune.formulations import ColumnGroups, LayerProblem
from optprune.solvers import get_method
from optprune.solvers.methods.structured_baselines import group_refit

KINDS = ("random", "correlated", "outliers", "dead")


def instance(i: int):
    g = torch.Generator().manual_seed(10_000 + i)
    gs = int(torch.randint(1, 3, (1,), generator=g))
    ng = int(torch.randint(4, 13, (1,), generator=g))
    m = int(torch.randint(2, 9, (1,), generator=g))
    s = float(torch.rand(1, generator=g)) * 0.8 + 0.1
    n = gs * ng
    p = LayerProblem.random(m, n, N=max(2 * n, 12) if i % 3 == 0 else None, seed=i, kind=KINDS[i % 4],
                            corrected=(i % 2 == 1))
    return p, ColumnGroups(gs, sparsity=s)


def enumerate_optimum(p: LayerProblem, pat: ColumnGroups) -> float:
    groups = pat.group_list(p.n)
    best = float("inf")
    for S in itertools.combinations(range(len(groups)), pat.keep_groups(p.n)):
        cols = torch.zeros(p.n, dtype=torch.bool)
        for j in S:
            cols[groups[j]] = True
        best = min(best, p.objective(group_refit(p, cols)))
    return best


METHODS = {
    "spap": ("spap", {}),
    "spap(init=penalty)": ("spap", {"init": "penalty"}),
    "spap(no re-open)": ("spap", {"reopen": False}),
    "group_obs": ("group_obs", {}),
    "flap+refit": ("flap", {"refit": True}),
    "group_magnitude+refit": ("group_magnitude", {"refit": True}),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # thousands of tiny factorisations: OpenMP start-up dominates otherwise
    gaps = {k: [] for k in METHODS}
    feasible = {k: True for k in METHODS}
    t0 = time.perf_counter()
    used = 0
    for i in range(args.instances):
        p, pat = instance(i)
        if pat.keep_groups(p.n) == pat.n_groups(p.n):
            continue  # nothing removed
        used += 1
        opt = enumerate_optimum(p, pat)
        for name, (meth, opts) in METHODS.items():
            r = get_method(meth)(p, pat, **opts)
            feasible[name] &= pat.is_feasible(r.mask)
            gaps[name].append((p.objective(r.W) - opt) / max(opt, 1e-300))
    print(f"{used} instances with something removed (of {args.instances}); {time.perf_counter() - t0:.1f} s")
    print(f"{'method':24s} {'exact':>7s} {'median':>10s} {'p90':>10s} {'max':>10s} {'min':>10s} feasible")
    for name, v in gaps.items():
        v = torch.tensor(v, dtype=torch.float64)
        print(f"{name:24s} {float((v <= 1e-9).double().mean()):7.1%} {float(v.median()):10.2e} "
              f"{float(v.quantile(0.9)):10.2e} {float(v.max()):10.2e} {float(v.min()):10.2e} {feasible[name]}")


if __name__ == "__main__":
    main()
