"""Time the pruning pipeline (llm_adapters/pipeline.py) on stories260K and print a table.

    python benchmarks/models/bench_pipeline.py [--threads 1] [--methods magnitude,wanda,sparsegpt] [--eval]

Calibration: the `smoke` protocol of docs/protocols.md (32 × 128 tokens of WikiText-2 validation, seed 0).
Per configuration: wall time of prune_model (capture + statistics + solve + propagate), its split, the summed
layer reconstruction error, and (with --eval) WikiText-2 perplexity on the smoke protocol's 64 windows of 512.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from optprune.llm_adapters.data import calibration_tokens, eval_tokens
    from optprune.llm_adapters.pipeline import PruneConfig, prune_model

    mdir = Path(os.environ.get("OPTPRUNE_MODEL_DIR", REPO.parent / "shared" / "models")) / "stories260K"
    tok = AutoTokenizer.from_pretrained(str(mdir))
    ids = calibration_tokens(tok, "wikitext2", nsamples=32, seqlen=128, seed=0)
    load = lambda: AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32).eval()
    ev = eval_tokens(tok, "wikitext2") if args.eval else None

    def ppl(model):
        if ev is None:
            return float("nan")
        from optprune.llm_adapters.evaluation import perplexity
        return perplexity(model, ev, 512, max_windows=64, progress=False, device=args.device)["ppl"]

    print(f"stories260K, calibration 32×128 WikiText-2 valid, torch threads {args.threads}, device {args.device}")
    if args.eval:
        print(f"dense: wikitext2 ppl {ppl(load()):.2f}")
    hdr = f"{'method':<10} {'pattern':<13} {'mode':<11} {'EC':<3} {'time_s':>7} {'stats':>6} {'solve':>6} " \
          f"{'fwd':>6} {'Σerror':>10} {'sparsity':>8} {'ppl':>8}"
    print(hdr)
    print("-" * len(hdr))
    for method in args.methods.split(","):
        for pattern in args.patterns.split(","):
            for mode, ec in (("sequential", True), ("sequential", False), ("dense-input", True)):
                model = load()
                t0 = time.perf_counter()
                rep = prune_model(model, ids, PruneConfig(method=method, pattern=pattern, mode=mode,
                                                          error_correction=ec, device=args.device), progress=False)
                wall = time.perf_counter() - t0
                b = rep["blocks"]
                err = sum(r["error"] for r in rep["layers"] if r["error"] is not None)
                print(f"{method:<10} {pattern:<13} {mode:<11} {'on' if ec else 'off':<3} {wall:7.2f} "
                      f"{sum(x['stats_time_s'] for x in b):6.2f} {sum(x['solve_time_s'] for x in b):6.2f} "
                      f"{sum(x['forward_time_s'] for x in b):6.2f} {err:10.1f} {rep['sparsity']:8.4f} "
                      f"{ppl(model):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
