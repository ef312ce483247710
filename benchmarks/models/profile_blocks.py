"""Where a block's time goes: the first K blocks of a model pruned in memory, each block's time split into the
forward passes that produce the statistics' inputs, the Gram accumulation, the solves, the error report and the
propagating forward (the pipeline's per-block record), with the FLOP model's share of each.

    OMP_NUM_THREADS=1 python benchmarks/models/profile_blocks.py --model smollm2-135m --blocks 3 \\
        --method sparsegpt --error-correction on --data-dir DIR

Calibration: C4, ``--nsamples`` × ``--seqlen`` (default 128 × 512, the ``cpu`` protocol), seed 0. The last
block profiled runs no propagating forward (as the last block of a whole run); the split is printed for every
block and as the median of the blocks that propagate.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost_model  # noqa: E402
from bench_whole_model import _rss_mb, _Sampler, memory_parts  # noqa: E402

PARTS = ("stats_forward_time_s", "gram_time_s", "method_time_s", "report_time_s", "forward_time_s", "other_time_s")


def split_block(b: dict) -> dict:
    """The block record's time as disjoint parts: statistics' forward passes, Gram accumulation, the method,
    the error report, the propagating forward and the rest (dense copy, write-back, bookkeeping)."""
    out = {"stats_forward_time_s": b["stats_forward_time_s"],
           "gram_time_s": b["stats_time_s"] - b["stats_forward_time_s"],
           "method_time_s": b["solve_time_s"] - b["report_time_s"], "report_time_s": b["report_time_s"],
           "forward_time_s": b["forward_time_s"]}
    out["other_time_s"] = b["time_s"] - sum(out.values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--blocks", type=int, default=3, help="profile the first K blocks")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--error-correction", default="on", choices=["on", "off"])
    ap.add_argument("--mode", default="sequential", choices=["sequential", "dense-input"])
    ap.add_argument("--activation-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="dtype of the held block inputs (default: the model's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="write the per-block records as JSON here")
    args = ap.parse_args(argv)
    if args.blocks < 1:
        print("profile_blocks: --blocks must be ≥ 1", file=sys.stderr)
        return 2

    import torch
    torch.set_num_threads(args.threads)
    from optprune.llm_adapters.data import calibration_tokens
    from optprune.llm_adapters.loading import load_model
    from optprune.llm_adapters.pipeline import PruneConfig, peak_rss_mb, prune_model

    import transformers.models.llama.modeling_llama  # noqa: F401 - the runtime includes the model code
    runtime = _rss_mb()
    with _Sampler() as smp:
        ta = time.perf_counter()
        model, tok, _ = load_model(args.model)
        tb = time.perf_counter()
        loaded = _rss_mb()
        ids = calibration_tokens(tok, "c4", nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                 data_dir=args.data_dir)
        dims = cost_model.llama_dims(model.config)
        ec = args.error_correction == "on"
        cfg = PruneConfig(method=args.method, sparsity=args.sparsity, error_correction=ec, mode=args.mode,
                          blocks=list(range(args.blocks)), device="cpu",
                          activation_dtype=getattr(torch, args.activation_dtype) if args.activation_dtype else None)
        rate0 = cost_model.matmul_rate()
        t0 = time.perf_counter()
        res = prune_model(model, ids, cfg, progress=False)
        wall = time.perf_counter() - t0
    t_cap = t0 + res["time_s"] - sum(b["time_s"] for b in res["blocks"])
    stages = {"load": smp.peak(ta, tb), "capture": smp.peak(t0, t_cap), "blocks": smp.peak(t_cap, t0 + wall)}
    rate = (rate0 + cost_model.matmul_rate()) / 2
    fl = cost_model.block_flops(dims, args.nsamples, args.seqlen, error_correction=ec, mode=args.mode,
                                method=args.method)
    print(f"{args.model} {args.method} {args.sparsity:g}, error correction {args.error_correction}, {args.mode}, "
          f"{args.nsamples}×{args.seqlen}, {args.threads} thread(s): {len(res['blocks'])} blocks in {wall:.1f} s; "
          f"peak RSS {peak_rss_mb():.0f} MB; float32 matmul {rate / 1e9:.1f} GFLOP/s")
    head = "block  total  " + "  ".join(p[:-7] for p in PARTS)
    print(head)
    rows = []
    for b in res["blocks"]:
        s = split_block(b)
        rows.append({"block": b["block"], "time_s": b["time_s"], **s})
        print(f"{b['block']:5d} {b['time_s']:6.2f}  " + "  ".join(f"{s[p]:{len(p) - 7}.2f}" for p in PARTS))
    prop = [r for r in rows[:-1]] or rows
    med = lambda k: sorted(r[k] for r in prop)[len(prop) // 2]
    tot = med("time_s")
    print("median (blocks that propagate): " + ", ".join(f"{p[:-7]} {med(p):.2f} s ({100 * med(p) / tot:.0f}%)"
                                                          for p in PARTS) + f" of {tot:.2f} s")
    act_bytes = getattr(torch, args.activation_dtype).itemsize if args.activation_dtype else 4
    parts = memory_parts(dims, args.nsamples, args.seqlen, low_memory=False, error_correction=ec,
                         act_bytes=act_bytes)
    dense_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    print(f"memory: runtime {runtime:.0f} MB; peak while loading {stages['load']:.0f}, after loading {loaded:.0f}, "
          f"capture {stages['capture']:.0f}, blocks {stages['blocks']:.0f} MB; the weights are {dense_mb:.0f} MB: "
          f"peak {peak_rss_mb() / dense_mb:.2f}× them, above the runtime {(peak_rss_mb() - runtime) / dense_mb:.2f}×; "
          "held: " + ", ".join(f"{k} {v / 2 ** 20:.0f} MB" for k, v in parts.items()))
    if fl["total"] is not None:
        print(f"cost model per block: forward {fl['forward'] / 1e9:.1f} GFLOP ({fl['forward'] / rate:.2f} s), "
              f"statistics {fl['statistics'] / 1e9:.1f} GFLOP ({fl['statistics'] / rate:.2f} s), solve "
              f"{fl['solve'] / 1e9:.1f} GFLOP ({fl['solve'] / rate:.2f} s); limit {fl['total'] / rate:.2f} s, "
              f"measured {tot:.2f} s = {tot / (fl['total'] / rate):.2f}× the limit")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rate_flops": rate, "blocks": rows,
                                              "peak_rss_mb": peak_rss_mb(), "runtime_mb": runtime,
                                              "loaded_mb": loaded, "stage_peak_mb": stages,
                                              "weights_mb": dense_mb}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
