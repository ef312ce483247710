"""FISTAPruner against SparseGPT / Wanda / magnitude in one run on one machine.

For each setting (50% unstructured, 2:4, 70% unstructured by default) it prunes a fresh copy of the model with
each variant through :func:`optprune.llm_adapters.run.prune` (the sequential pipeline; the model's protocol, e.g. ``smoke``
for stories260K, ``cpu`` for SmolLM2-135M) and prints perplexity, pruning wall time and the summed layer
reconstruction error ``Σ f(W)`` of the variant. Variants:

* ``sparsegpt`` / ``wanda`` / ``magnitude`` without intra-block error correction (as published: each
  sub-layer solved on its own inputs) — ``noEC``;
* the same with error correction (X̂ from pruned upstream sub-layers, dense target W0 X) — ``EC``;
* ``fista`` with EC (the paper's setting: SparseGPT warm start, K=20, T=3, ξ=0.3, best rounded iterate);
* ``fista+debias`` with EC: the same with ``debias_iters=20`` (masked CG on every rounded iterate; not in
  the paper) — and ``fista+refit`` (the optional final least-squares refit) when ``--refit`` is given.

    python benchmarks/models/fista_compare.py [--model stories260k] [--settings 0.5,2:4,0.7] [--variants ...]
                                       [--eval-windows N] [--json out.json] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

VARIANTS = {
    "magnitude noEC": dict(method="magnitude", error_correction=False),
    "wanda noEC": dict(method="wanda", error_correction=False),
    "sparsegpt noEC": dict(method="sparsegpt", error_correction=False),
    "wanda EC": dict(method="wanda", error_correction=True),
    "sparsegpt EC": dict(method="sparsegpt", error_correction=True),
    "fista EC": dict(method="fista", error_correction=True),
    "fista+debias EC": dict(method="fista", error_correction=True, method_options={"debias_iters": 20}),
    "fista noEC": dict(method="fista", error_correction=False),
    "fista+refit EC": dict(method="fista", error_correction=True, method_options={"refit": True}),
    "fista(wanda) EC": dict(method="fista", error_correction=True, method_options={"warm_start": "wanda"}),
}
DEFAULT = ["magnitude noEC", "wanda noEC", "sparsegpt noEC", "sparsegpt EC", "fista EC", "fista+debias EC"]


def setting(s: str) -> dict:
    return {"pattern": s, "sparsity": 0.5} if ":" in s else {"pattern": "unstructured", "sparsity": float(s)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--settings", default="0.5,2:4,0.7")
    ap.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated from: {', '.join(VARIANTS)}")
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from optprune.llm_adapters import run as api  # the record-returning run function (the CLI's)

    rows = []
    for st in a.settings.split(","):
        for name in a.variants.split(","):
            v = dict(VARIANTS[name.strip()])
            t0 = time.perf_counter()
            rec = api.prune(model=a.model, device=a.device, progress=False, eval_windows=a.eval_windows,
                            nsamples=a.nsamples, **setting(st), **v)
            wall = time.perf_counter() - t0
            layers = rec["layers"]
            err = [l.get("error") for l in layers]
            row = {"setting": st, "variant": name, "ppl": rec["perplexity"]["wikitext2"]["ppl"],
                   "prune_s": rec["timings"]["prune_s"], "wall_s": wall,
                   "sum_error": sum(err) if None not in err else None,
                   "sparsity": rec["summary"]["sparsity"], "protocol": rec["protocol"]["name"]}
            if v["method"] == "fista":
                row["sum_warm_error"] = sum(l["warm_error"] for l in layers)
                row["layers_warm_returned"] = sum(bool(l["returned_warm_start"]) for l in layers)
                row["layers"] = len(layers)
            rows.append(row)
            extra = (f"  warm Σf {row['sum_warm_error']:.5g}, warm start kept in {row['layers_warm_returned']}/"
                     f"{row['layers']} layers") if "sum_warm_error" in row else ""
            print(f"{st:>5s} {name:18s} ppl {row['ppl']:9.3f}  prune {row['prune_s']:7.1f} s  "
                  f"Σf {row['sum_error'] if row['sum_error'] is None else format(row['sum_error'], '.5g')}"
                  f"  sparsity {row['sparsity']:.4f}{extra}", flush=True)
    print(f"model {a.model}, protocol {rows[0]['protocol'] if rows else '-'}, device {a.device}, "
          f"threads {torch.get_num_threads()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
