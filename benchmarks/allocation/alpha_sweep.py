"""Uniform / OWL / alpha allocation × pruner × sparsity, perplexity under one protocol.

The AlphaPruning claim: at high sparsity (70–80%) allocating by α beats uniform and OWL for the same pruner.
Every run goes through ``optprune.llm_adapters.run.prune`` (the same code path as ``optprune prune``), so the calibration,
the pipeline and the evaluation are the protocol's. Results are appended to the JSON after each run
(``--resume`` skips finished cells), and a Markdown table is written at the end.

    # the evidence run (SmolLM2-135M, `cpu` protocol: 128×512 C4 calibration, WikiText-2 first 40 windows of 2048)
    python benchmarks/allocation/alpha_sweep.py --protocol cpu --out out/alpha_sweep_cpu
    # a quick check of the script itself (stories260K, `smoke` protocol)
    python benchmarks/allocation/alpha_sweep.py --protocol smoke --methods wanda --sparsities 0.7 --out /tmp/sweep
    # any allocation spec is a column, e.g. the robust aggregate and the held-out selection
    python benchmarks/allocation/alpha_sweep.py --protocol smoke --allocations uniform,alpha,alpha:weighted,auto

Cost on the 2-core CPU: 18 pruning runs; a SmolLM2 run is a few minutes (SparseGPT longer), the evaluation
~40 forwards of 2048 tokens (~4 min) per run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ALLOCS = ("uniform", "owl", "alpha")


def _cell_key(method, sparsity, allocation):
    return f"{method}|{sparsity:.4f}|{allocation}"


def run_cell(args, method, sparsity, allocation) -> dict:
    from optprune.llm_adapters import run as api  # the record-returning run function (the CLI's)
    t0 = time.perf_counter()
    kw = dict(model=args.model, method=method, sparsity=sparsity, allocation=allocation, protocol=args.protocol,
              output=None, data_dir=args.data_dir, model_dir=args.model_dir, device=args.device, seed=args.seed,
              progress=False, verbose=False)
    if allocation != "uniform" and args.eps is not None:
        kw["allocation_eps"] = args.eps
    if args.eval_windows is not None:
        kw["eval_windows"] = args.eval_windows
    rec = api.prune(**kw)
    ppl = {k: v["ppl"] for k, v in (rec.get("perplexity") or {}).items()}
    alloc = rec.get("allocation") or {}
    return {"method": method, "sparsity": sparsity, "allocation": allocation, "perplexity": ppl,
            "achieved_sparsity": rec["summary"]["sparsity"], "target_mean": rec["summary"]["sparsity_target"],
            "allocation_weighted_mean": alloc.get("weighted_mean", sparsity),
            "unit_sparsities": alloc.get("unit_sparsities"), "eps": alloc.get("eps", alloc.get("lam")),
            "mean_rel_error": rec["summary"].get("mean_rel_error"), "protocol": rec.get("protocol"),
            "chosen": alloc.get("chosen"), "chosen_score": alloc.get("chosen_score"),
            "uniform_score": alloc.get("uniform_score"),
            "model": (rec.get("model") or {}).get("name"), "wall_s": time.perf_counter() - t0}


def markdown(res: dict) -> str:
    rows = res["runs"]
    allocs = res.get("allocations") or list(ALLOCS)
    ds = sorted({d for r in rows.values() for d in r["perplexity"]})
    lines = [f"Protocol `{res['protocol']}`, model `{res['model']}`; perplexity (lower is better), best per row in bold.",
             ""]
    for d in ds:
        lines += [f"**{d}**", "", "| pruner | sparsity | " + " | ".join(allocs) + " |",
                  "|---|---|" + "---|" * len(allocs)]
        for m in res["methods"]:
            for s in res["sparsities"]:
                vals = {a: rows.get(_cell_key(m, s, a), {}).get("perplexity", {}).get(d) for a in allocs}
                have = [v for v in vals.values() if v is not None]
                best = min(have) if have else None
                cells = []
                for a in allocs:
                    v = vals[a]
                    cells.append("—" if v is None else (f"**{v:.2f}**" if v == best else f"{v:.2f}"))
                lines.append(f"| {m} | {s:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("| pruner | sparsity | allocation | achieved sparsity | allocation mean | wall s |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows.values():
        lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['allocation']} | {r['achieved_sparsity']:.4f} | "
                     f"{r['allocation_weighted_mean']:.6f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", default="cpu", help="cpu (SmolLM2-135M, the evidence) or smoke (stories260K)")
    ap.add_argument("--model", default=None, help="default: the protocol's model")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--sparsities", default="0.6,0.7,0.8")
    ap.add_argument("--allocations", default=",".join(ALLOCS))
    ap.add_argument("--eps", type=float, default=None, help="alpha ε (default 0.3) / owl λ = εS (default λ = 0.08)")
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="alpha_sweep", help="writes <out>.json and <out>.md")
    ap.add_argument("--resume", action="store_true", help="skip cells already in <out>.json")
    a = ap.parse_args(argv)
    from optprune.llm_adapters.data import get_protocol
    proto = get_protocol(a.protocol)
    a.model = a.model or proto.model
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    sps = [float(s) for s in a.sparsities.split(",") if s.strip()]
    allocs = [x.strip() for x in a.allocations.split(",") if x.strip()]
    out_json, out_md = Path(f"{a.out}.json"), Path(f"{a.out}.md")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    res = {"protocol": a.protocol, "model": a.model, "methods": methods, "sparsities": sps, "allocations": allocs,
           "eps": a.eps, "runs": {}}
    if a.resume and out_json.is_file():
        res["runs"] = json.loads(out_json.read_text()).get("runs", {})
    for m in methods:
        for s in sps:
            for al in allocs:
                k = _cell_key(m, s, al)
                if k in res["runs"]:
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {m} {s:.0%} {al} ...", flush=True)
                r = run_cell(a, m, s, al)
                res["runs"][k] = r
                print(f"    ppl {r['perplexity']}  achieved {r['achieved_sparsity']:.4f}  ({r['wall_s']:.0f} s)",
                      flush=True)
                out_json.write_text(json.dumps(res, indent=1))
    out_json.write_text(json.dumps(res, indent=1))
    md = markdown(res)
    out_md.write_text(md)
    print(md)
    print(f"wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
