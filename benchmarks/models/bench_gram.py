"""Gram accumulation: the symmetric rank-k update (the upper triangle in row blocks, as the pipeline's
accumulator does it) against the full product ``H += XᵀX``, CPU time per update and whether the results are
equal to the last bit, for several input widths.

    python benchmarks/models/bench_gram.py --threads 2 --tokens 2048 --widths 576,1536,2048,4096,5632

CPU time (``time.process_time``) is reported, not wall time: on a shared machine it moves less with the load.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per update (one calibration batch)")
    ap.add_argument("--widths", default="576,1536,2048,4096,5632")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    import torch
    from optprune.formulations.problem import SYRK_BLOCK, mirror_upper_, sym_rank_k_update_
    torch.set_num_threads(args.threads)

    def cpu_time(f, *a):
        f(*a)
        t = time.process_time()
        for _ in range(args.reps):
            f(*a)
        return (time.process_time() - t) / args.reps

    print(f"row blocks of {SYRK_BLOCK}, {args.tokens} tokens per update, {args.threads} threads")
    for n in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.tokens, n)
        full, sym = torch.zeros(n, n), torch.zeros(n, n)
        t_full = cpu_time(lambda: full.addmm_(x.T, x))
        t_sym = cpu_time(lambda: sym_rank_k_update_(sym, x, min_n=0))
        a, b = torch.zeros(n, n).addmm_(x.T, x), torch.zeros(n, n)
        sym_rank_k_update_(b, x, min_n=0)
        mirror_upper_(b)
        print(f"  n={n:>5}: full {t_full * 1e3:8.1f} ms, symmetric {t_sym * 1e3:8.1f} ms = {t_sym / t_full:4.2f}× "
              f"(bit-identical: {torch.equal(a, b)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
