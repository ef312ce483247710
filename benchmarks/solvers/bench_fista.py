"""FISTA speed on the layer shapes of SmolLM2-135M.

Per shape (q/o 576×576, k/v 192×576, up/gate 1536×576, down 576×1536) it prints

* the FISTA time per iteration (the production engine, float32, ``run`` of ``--iters`` iterations with
  gradient restart, whole matrix at once) and its achieved FLOP rate, counting the one (m×n)(n×n) matmul an
  iteration needs (2·m·n² FLOP), against a plain ``torch.mm`` of the same shapes timed in the same run,
  interleaved with it (``ratio`` = t_matmul / t_iteration; the target is ≥ 0.70);
* the whole-layer time of ``fista`` (SparseGPT warm start + T=3 rounds of K=20 iterations + projections +
  objective evaluations), of its FISTA part alone (``fista − warm start``), of the ``debias_iters=20``
  variant, and of SparseGPT alone on the same layer.

Inputs: random weights (Gaussian) and a Gram of random activations with a few outlier features (N = 2048
tokens); not the SmolLM2 weights — the timings depend only on the shapes. The machine may be shared: every
figure is the minimum over ``--repeats`` interleaved trials, and the ratio is taken per trial (median).

    python benchmarks/solvers/bench_fista.py [--iters 20] [--repeats 5] [--threads N] [--device cpu|cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from optprune.formulations import LayerProblem, parse_pattern
from optprune.solvers import get_method
from optprune.solvers.methods.fista import FistaEngine, default_lambda

SHAPES = [("q_proj/o_proj", 576, 576), ("k_proj/v_proj", 192, 576), ("up_proj/gate_proj", 1536, 576),
          ("down_proj", 576, 1536)]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_problem(m, n, dev, seed=0, N=2048):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g)
    X[:, torch.randperm(n, generator=g)[: max(1, n // 32)]] *= 10.0  # LLM-like outlier features
    W0 = torch.randn(m, n, generator=g) * n ** -0.5
    p = LayerProblem.from_activations(W0, X, dtype=torch.float32, name=f"random-{m}x{n}")
    return p.to(device=dev)


def bench_shape(label, m, n, dev, iters, repeats):
    p = make_problem(m, n, dev)
    pat = parse_pattern("unstructured", 0.5)
    eng = FistaEngine(p, dtype=torch.float32)
    lam = 0.1 * default_lambda(p, pat)
    W = p.W0.clone()
    A = torch.randn(m, n, device=dev)
    Mm = eng.M.clone()
    out = torch.empty(m, n, device=dev)
    # warm up both
    eng.run(W, lam, 3)
    torch.mm(A, Mm, out=out)
    t_it, t_mm, ratios = [], [], []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        eng.run(W, lam, iters)
        sync(dev)
        ti = (time.perf_counter() - t0) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(A, Mm, out=out)
        sync(dev)
        tm = (time.perf_counter() - t0) / iters
        t_it.append(ti)
        t_mm.append(tm)
        ratios.append(tm / ti)
    flop = 2.0 * m * n * n
    row = {"shape": label, "m": m, "n": n, "iter_ms": 1e3 * min(t_it), "matmul_ms": 1e3 * min(t_mm),
           "iter_gflops": flop / min(t_it) / 1e9, "matmul_gflops": flop / min(t_mm) / 1e9,
           "ratio_median": statistics.median(ratios), "ratio_of_minima": min(t_mm) / min(t_it)}
    # whole layer: fista (paper settings) vs SparseGPT, interleaved
    lay = {"sparsegpt": [], "fista": [], "fista_part": [], "fista_debias": [], "fista_debias_part": []}
    for _ in range(max(1, repeats // 2)):
        sync(dev)
        t0 = time.perf_counter()
        get_method("sparsegpt")(p, pat)
        sync(dev)
        lay["sparsegpt"].append(time.perf_counter() - t0)
        for key, opts in (("fista", {}), ("fista_debias", {"debias_iters": 20})):
            t0 = time.perf_counter()
            r = get_method("fista")(p, pat, **opts)
            sync(dev)
            t = time.perf_counter() - t0
            lay[key].append(t)
            lay[key + "_part"].append(t - r.info["warm_time_s"])
    for k, v in lay.items():
        row[f"{k}_s"] = min(v)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
          f"{a.iters} iterations x {a.repeats} trials; random weights and Grams (N=2048 tokens)")
    hdr = (f"{'shape':18s} {'m×n':>9s} {'iter ms':>8s} {'mm ms':>7s} {'iter GF/s':>9s} {'mm GF/s':>8s} "
           f"{'ratio':>6s} | {'SparseGPT s':>11s} {'FISTA s':>8s} {'FISTA-part s':>12s} {'+debias s':>9s}")
    print(hdr)
    rows = []
    for label, m, n in SHAPES:
        r = bench_shape(label, m, n, dev, a.iters, a.repeats)
        rows.append(r)
        print(f"{label:18s} {m:>4d}×{n:<4d} {r['iter_ms']:8.2f} {r['matmul_ms']:7.2f} {r['iter_gflops']:9.1f} "
              f"{r['matmul_gflops']:8.1f} {r['ratio_median']:6.2f} | {r['sparsegpt_s']:11.3f} {r['fista_s']:8.3f} "
              f"{r['fista_part_s']:12.3f} {r['fista_debias_s']:9.3f}", flush=True)
    print("ratio = t(plain matmul of the same shapes) / t(FISTA iteration), median over trials; target ≥ 0.70")
    print("FISTA s = whole layer incl. the SparseGPT warm start; FISTA-part = FISTA s − warm-start time")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
