"""Run a grid of pruning configurations through the public API and collect one JSONL row per run.

Resumable: a row whose key is already in the results file is skipped, so a long sweep (SmolLM2 on the
`cpu` protocol takes minutes per run on 2 cores) can be stopped and continued. Tables are made from the
JSONL file by ``paper_repro/common.py`` (the paper scripts) and ``paper_repro/make_readme_results.py``; nothing is typed by hand.

    python benchmarks/models/sweep.py --model smollm2-135m --protocol cpu \
        --methods magnitude,wanda,sparsegpt,fista --settings 0.5,2:4,0.7 --out results/cpu_baselines.jsonl

A *setting* is a sparsity (``0.5``: unstructured) or an N:M pattern (``2:4``). ``--dense`` adds the dense
model's evaluation as a row. ``-O method:key=value`` passes a method option to one method.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path


def portable(obj, repo: Path = Path(__file__).resolve().parents[2]):
    """``obj`` with this machine's folders written as names a reader can resolve anywhere: the data and model
    folders (``$OPTPRUNE_DATA_DIR`` / ``$OPTPRUNE_MODEL_DIR``) and the repository (a relative path). Result files
    are committed and read elsewhere; they should not carry one machine's paths."""
    subs = []
    for var in ("OPTPRUNE_DATA_DIR", "OPTPRUNE_MODEL_DIR"):
        v = os.environ.get(var)
        if v:
            subs.append((os.path.realpath(v).rstrip("/"), f"${var}"))
            subs.append((v.rstrip("/"), f"${var}"))
    cache = os.environ.get("OPTPRUNE_CACHE_DIR") or os.path.expanduser("~/.cache/optprune")
    subs.append((cache.rstrip("/"), "$OPTPRUNE_CACHE_DIR"))
    subs.append((str(repo) + "/", ""))
    subs = [(a, b) for a, b in subs if a not in ("", "/")]

    def fix(v):
        if isinstance(v, str):
            for a, b in subs:
                v = v.replace(a, b)
            return v
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v
    return fix(obj)


def parse_setting(s: str) -> dict:
    s = s.strip()
    if ":" in s:
        n, m = s.split(":")
        return {"pattern": s, "sparsity": 1 - int(n) / int(m)}
    if s.startswith("row"):
        return {"pattern": "row", "sparsity": float(s[3:])}
    return {"pattern": "unstructured", "sparsity": float(s)}


def row_key(d: dict) -> str:
    keys = ("model", "protocol", "method", "pattern", "sparsity", "allocation", "error_correction", "mode",
            "calibration", "refit", "structure", "method_options", "min_degree", "tag")
    return json.dumps({k: d.get(k) for k in keys}, sort_keys=True, default=str)


def summarise(rec: dict) -> dict:
    """The numbers a table needs from a run record."""
    ppl = {k: (v.get("ppl") if isinstance(v, dict) else v) for k, v in (rec.get("perplexity") or {}).items()}
    div = rec.get("divergence_self") or rec.get("divergence") or {}
    t = rec.get("timings") or rec.get("time") or {}
    return {"perplexity": ppl, "kl": div.get("kl") if isinstance(div, dict) else None,
            "top1": div.get("top1") if isinstance(div, dict) else None,
            "sparsity_achieved": (rec.get("summary") or {}).get("sparsity"),
            "mean_rel_error": (rec.get("summary") or {}).get("mean_rel_error"),
            "timings": t, "peak_rss_mb": rec.get("peak_rss_mb"),
            "error_sum": sum((l.get("error") or 0.0) for l in rec.get("layers", []) if isinstance(l, dict)),
            "versions": rec.get("versions"), "machine": rec.get("machine"),
            "graph": graph_summary(rec.get("layers") or []),
            "allocation_choice": ({k: rec["allocation"].get(k) for k in ("chosen", "chosen_score", "uniform_score")}
                                  if (rec.get("allocation") or {}).get("chosen") else None)}


def graph_summary(layers: list) -> dict | None:
    """Worst case / mean over the layers of the N:M masks' graph metrics (solvers/methods/graph_metrics.py), or None."""
    g = [l["graph"] for l in layers if isinstance(l, dict) and isinstance(l.get("graph"), dict)]
    if not g:
        return None
    ratio = [x["sigma2_over_bound"] for x in g if x.get("sigma2_over_bound") is not None]
    tile = [x["tile_min_degree"] for x in g if x.get("tile_min_degree") is not None]
    return {"layers": len(g),
            "min_in_degree": min(x["in_degree"]["min"] for x in g),
            "min_in_degree_frac": min(x["in_degree"]["min"] / max(x["shape"][0], 1) for x in g),
            "isolated_inputs": sum(x["isolated_inputs"] for x in g),
            "layers_with_isolated_inputs": sum(x["isolated_inputs"] > 0 for x in g),
            "max_components": max(x["components"] for x in g),
            "min_tile_degree": min(tile) if tile else None,
            "mean_sigma2_over_bound": sum(ratio) / len(ratio) if ratio else None,
            "max_sigma2_over_bound": max(ratio) if ratio else None,
            "mean_relative_gap": sum(x.get("relative_gap") or 0.0 for x in g) / len(g)}


def record_path(out: Path, key: str) -> Path:
    """Where the full run record (per-layer errors, sparsities, graph metrics, timings) of a sweep row is kept."""
    return out.with_name(out.stem + ".runs") / (hashlib.sha1(key.encode()).hexdigest()[:12] + ".json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--protocol", default="cpu")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--settings", default="0.5,2:4,0.7")
    ap.add_argument("--allocations", default="uniform")
    ap.add_argument("--allocation-eps", type=float, default=None)
    ap.add_argument("--calibrations", default=None, help="comma list (e.g. c4,self); default: protocol's")
    ap.add_argument("--error-correction", default="auto",
                    help="on, off, or auto (= on for fista — the paper's setting — off for the baselines, "
                         "as in their published code)")
    ap.add_argument("--mode", default="sequential")
    ap.add_argument("--structure", default=None, help="structured methods: mlp, heads, heads:kv or a comma list")
    ap.add_argument("--min-degree", type=int, default=None,
                    help="EGGS: at least B kept per column per M×M tile (ignored by methods without that pattern)")
    ap.add_argument("--refit", action="store_true")
    ap.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    ap.add_argument("-O", "--method-opt", action="append", default=[], metavar="METHOD:KEY=VALUE")
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--eval-datasets", default=None,
                    help="comma list overriding the protocol's evaluation texts (e.g. wikitext2,ptb); not part of "
                         "the row key: each row's perplexity dict says which texts it was evaluated on")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--tag", default=None, help="free label stored in the row key")
    ap.add_argument("--no-kl", dest="kl", action="store_false",
                    help="skip the data-free KL/top-1 against the dense model (faster; rows get kl = null)")
    ap.add_argument("--out", required=True, help="JSONL results file (appended; resumable)")
    ap.add_argument("--save-dir", default=None, help="keep each pruned model under this folder")
    ap.add_argument("--no-records", dest="records", action="store_false",
                    help="do not keep each run's full JSON record (default: <out stem>.runs/<key hash>.json)")
    args = ap.parse_args(argv)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import optprune
    from optprune.llm_adapters.run import prune as run_prune  # the record-returning run function (the CLI's)
    from optprune.solvers import get_method

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                done.add(json.loads(line)["key"])

    mopts: dict = {}
    for item in args.method_opt:
        meth, kv = item.split(":", 1)
        k, v = kv.split("=", 1)
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            pass
        mopts.setdefault(meth, {})[k] = v

    jobs = []
    if args.dense:
        jobs.append({"model": args.model, "protocol": args.protocol, "method": "dense", "tag": args.tag})
    cals = args.calibrations.split(",") if args.calibrations else [None]
    for cal in cals:
        for alloc in args.allocations.split(","):
            for meth in [m.strip() for m in args.methods.split(",") if m.strip()]:  # --methods "" --dense: dense only
                for st in args.settings.split(","):
                    ec = {"on": True, "off": False}.get(args.error_correction, meth == "fista")
                    # --min-degree is EGGS's expander constraint: give it only to methods that take that pattern
                    md = args.min_degree if "expander" in get_method(meth).patterns else None
                    jobs.append({"model": args.model, "protocol": args.protocol, "method": meth,
                                 **parse_setting(st), "allocation": alloc, "error_correction": ec,
                                 "mode": args.mode, "calibration": cal, "refit": args.refit,
                                 "structure": args.structure if get_method(meth).structured else None,
                                 "min_degree": md,
                                 "method_options": mopts.get(meth) or None, "tag": args.tag})
    print(f"sweep: {len(jobs)} runs, {sum(row_key(j) in done for j in jobs)} already in {out}", flush=True)
    for j in jobs:
        key = row_key(j)
        if key in done:
            continue
        t0 = time.time()
        print(f"\n=== {key}", flush=True)
        try:
            if j["method"] == "dense":
                rec = optprune.evaluate(model=j["model"], protocol=j["protocol"], eval_windows=args.eval_windows,
                                        eval_datasets=args.eval_datasets)
            else:
                kw = {k: v for k, v in j.items() if k not in ("tag", "calibration", "structure", "min_degree",
                                                            "method_options") and v is not None}
                if j["calibration"]:
                    kw["calibration"] = j["calibration"]
                if j["structure"]:
                    kw["structure"] = j["structure"]
                if j["min_degree"] is not None:
                    kw["min_degree"] = j["min_degree"]
                if j["method_options"]:
                    kw["method_options"] = j["method_options"]
                if args.eval_windows:
                    kw["eval_windows"] = args.eval_windows
                if args.nsamples:
                    kw["nsamples"] = args.nsamples
                if args.eval_datasets:
                    kw["eval_datasets"] = args.eval_datasets
                if args.allocation_eps is not None:
                    kw["allocation_eps"] = args.allocation_eps
                if not args.kl:
                    kw["kl"] = False
                if args.save_dir:
                    kw["output"] = os.path.join(args.save_dir, f"{j['method']}-{j['pattern'].replace(':', 'of')}-"
                                                               f"{j['sparsity']:.2f}-{j['allocation']}")
                rec = run_prune(**kw)
            row = {"key": key, "config": j, "wall_s": time.time() - t0, **summarise(rec)}
            if args.records:
                rp = record_path(out, key)
                rp.parent.mkdir(parents=True, exist_ok=True)
                rp.write_text(json.dumps(portable(rec), default=str, indent=1))
                row["record"] = os.path.relpath(rp, out.parent)
        except Exception as e:  # record the failure, keep going
            traceback.print_exc()
            row = {"key": key, "config": j, "wall_s": time.time() - t0, "error": f"{type(e).__name__}: {e}"}
        with out.open("a") as f:
            f.write(json.dumps(portable(row), default=str) + "\n")
        print(f"=== done in {row['wall_s']:.0f} s: {row.get('perplexity') or row.get('error')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
