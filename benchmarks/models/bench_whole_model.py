"""Whole-model prune time, peak memory and where the time goes, per method.

Each method runs in a fresh process (so that its peak RSS is its own) through the public run function with the
protocol's calibration and no evaluation, then the script prints, per method: the prune time (the block walk),
the whole call's time (load, calibration, prune, save), the peak RSS against the dense model's size, the mean time
per block, and how the block walk splits into statistics (Gram/diagonal accumulation), solves and forward passes
(from the run record's per-block timings).

    python benchmarks/models/bench_whole_model.py --model smollm2-135m --methods sparsegpt,wanda --threads 2 \\
        --data-dir DIR --reference sparsegpt=508,wanda=370

``--reference METHOD=SECONDS`` gives another tool's prune time for the same job measured on the same machine (e.g.
llm-compressor's ``oneshot``); the script then prints our time as a ratio of it. It does not run that tool.
Compare ratios taken in one run on one machine: absolute times move with the machine's load.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path


def _worker(kw: dict, threads: int, q) -> None:
    import torch
    torch.set_num_threads(threads)
    from optprune.llm_adapters.run import prune
    t0 = time.perf_counter()
    try:
        rec = prune(**kw)
    except Exception as e:  # noqa: BLE001 - reported as the row
        q.put({"error": f"{type(e).__name__}: {e}"})
        return
    blocks = rec.get("blocks") or []
    split = {k: sum(float(b.get(k) or 0.0) for b in blocks) for k in ("stats_time_s", "solve_time_s", "forward_time_s")}
    q.put({"call_s": time.perf_counter() - t0, "timings": rec.get("timings"), "blocks": len(blocks),
           "block_s": [float(b.get("time_s") or 0.0) for b in blocks], "split": split,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "n_params": (rec.get("model") or {}).get("n_params"), "calibration": rec.get("calibration", {}).get("source")
           if isinstance(rec.get("calibration"), dict) else None})


def _parse_reference(items) -> dict:
    out = {}
    for it in items or []:
        for part in str(it).split(","):
            if not part.strip():
                continue
            k, sep, v = part.partition("=")
            if not sep:
                raise SystemExit(f"bench_whole_model: --reference {part!r} is not METHOD=SECONDS")
            out[k.strip()] = float(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="sparsegpt,wanda", help="comma list")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--protocol", default="cpu", help="calibration settings (cpu: C4 128×512, seed 0)")
    ap.add_argument("--calibration", default=None, help="calibration source (default: the protocol's)")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--error-correction", default="off", choices=["on", "off"],
                    help="off: the published SparseGPT/Wanda propagation; on: optprune's error-corrected statistics")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--reference", action="append", metavar="METHOD=SECONDS",
                    help="another tool's prune time for the same job on this machine (printed as a ratio)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    ref = _parse_reference(args.reference)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        print("bench_whole_model: --methods is empty", file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    rows = []
    for m in methods:
        kw = dict(model=args.model, method=m, sparsity=args.sparsity, protocol=args.protocol,
                  calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                  error_correction=args.error_correction == "on", evaluate=False, kl=False, data_dir=args.data_dir,
                  progress=False)
        q = ctx.Queue()
        p = ctx.Process(target=_worker, args=(kw, args.threads, q))
        t0 = time.perf_counter()
        p.start()
        res = q.get()
        p.join()
        res.update(method=m, wall_s=time.perf_counter() - t0, threads=args.threads)
        rows.append(res)
        if "error" in res:
            print(f"{m}: error: {res['error']}", file=sys.stderr)
            continue
        t = res["timings"] or {}
        dense_mb = 4 * (res["n_params"] or 0) / 2**20
        nb = max(1, res["blocks"])
        sp = res["split"]
        line = (f"{m:>10}: prune {t.get('prune_s', 0):7.1f} s (calibration {t.get('calibration_s', 0):6.1f} s, load "
                f"{t.get('load_s', 0):5.1f} s, whole call {res['call_s']:7.1f} s) · peak RSS {res['peak_rss_mb']:6.0f} MB"
                f" = {res['peak_rss_mb'] / dense_mb:4.2f}× the float32 model · per block {sum(res['block_s']) / nb:5.2f} s"
                f" (statistics {sp['stats_time_s'] / nb:5.2f}, solves {sp['solve_time_s'] / nb:5.2f}, forward "
                f"{sp['forward_time_s'] / nb:5.2f})")
        if m in ref:
            line += f" · {t.get('prune_s', 0) / ref[m]:4.2f}× the reference's {ref[m]:.0f} s"
        print(line, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
