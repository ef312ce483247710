"""Where SPAP's result comes from, layer by layer, in the run records a sweep keeps.

Every SPAP layer solve records the objective of each start it tried on *the same* layer problem
(``start_errors``: the structured baselines and the penalty path started from nothing), which start won
(``best_source``: a baseline, ``penalty``, or ``reopen`` when the damped z-steps around the incumbent found a
better support), how often the continuation path changed ``z`` and how much the final result improved on the
best start. This script turns those records into one table per run: how much of SPAP's perplexity is the
method itself and how much is the warm start.

    python benchmarks/structured/spap_path_summary.py benchmarks/results/cpu_smollm2.runs

Reads only the JSON records (``<sweep out stem>.runs/*.json``); nothing is recomputed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
from collections import Counter


def _q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def _final_error(layer: dict) -> float:
    """SPAP's objective on the layer: from the best baseline start and the recorded improvement over it (both in
    the solver's float64), else the pipeline's re-evaluated error."""
    imp, base = layer.get("improvement_over_best_start"), [v for k, v in layer["start_errors"].items() if k != "penalty"]
    return min(base) * (1 - imp) if imp is not None and base else layer["error"]


def summarise(record: dict) -> dict | None:
    """One row for a run record whose layers were solved by SPAP; None for other methods."""
    layers = [layer for layer in record.get("layers", []) if layer.get("method") == "spap" and "start_errors" in layer]
    if not layers:
        return None
    cfg = record.get("config", {})
    wins = Counter(layer["best_source"] for layer in layers)
    # gap of each start to the final SPAP objective on the same layer problem (>= 0 by construction)
    gaps: dict[str, list[float]] = {}
    for layer in layers:
        final = _final_error(layer)
        for name, err in layer["start_errors"].items():
            gaps.setdefault(name, []).append(err / final - 1 if final > 0 else 0.0)
    # improvement over the best *baseline* start (None when no baseline was tried: init=penalty)
    imp = [layer["improvement_over_best_start"] for layer in layers
           if layer.get("improvement_over_best_start") is not None]
    return {
        "method_options": cfg.get("method_options") or None, "sparsity": cfg.get("sparsity"),
        "ppl": (next(iter((record.get("perplexity") or {}).values()), None) or {}).get("ppl"),
        "layers": len(layers), "wins": dict(wins),
        "z_changes": sum(layer["path"]["z_changes"] for layer in layers),
        "reopen_accepted": sum(layer["reopen"]["accepted"] for layer in layers),
        "improved_layers": sum(i > 0 for i in imp), "compared_layers": len(imp),
        "improvement_median": statistics.median(imp) if imp else None, "improvement_max": max(imp, default=None),
        "start_gap_median": {k: statistics.median(v) for k, v in gaps.items()},
        "start_gap_p90": {k: _q(v, 0.9) for k, v in gaps.items()},
        "time_per_layer_s": statistics.mean(layer["method_time_s"] for layer in layers),
    }


def load(folder: str) -> list[dict]:
    rows = []
    for f in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(f) as fh:
            row = summarise(json.load(fh))
        if row:
            row["record"] = os.path.basename(f)
            rows.append(row)
    return sorted(rows, key=lambda r: (json.dumps(r["method_options"], sort_keys=True), r["sparsity"] or 0))


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "no SPAP run records found\n"
    starts = sorted({k for r in rows for k in r["start_gap_median"]})
    head = (["options", "sparsity", "ppl", "layers", "best start (layers)", "z changes on path", "reopen accepted",
             "layers improved over best start", "max improvement"]
            + [f"{s}: median / p90 gap to SPAP" for s in starts] + ["SPAP s/layer"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [json.dumps(r["method_options"]) if r["method_options"] else "default", f"{r['sparsity']:g}",
                 f"{r['ppl']:.2f}" if r["ppl"] is not None else "–", str(r["layers"]),
                 ", ".join(f"{k} {v}" for k, v in sorted(r["wins"].items())), str(r["z_changes"]),
                 str(r["reopen_accepted"]), f"{r['improved_layers']}/{r['compared_layers']}" if r["compared_layers"] else "–",
                 f"{100 * r['improvement_max']:.2f}%" if r["compared_layers"] else "–"]
        cells += [f"{100 * r['start_gap_median'][s]:.2f}% / {100 * r['start_gap_p90'][s]:.2f}%"
                  if s in r["start_gap_median"] else "–" for s in starts]
        cells.append(f"{r['time_per_layer_s']:.1f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a sweep's run-record folder (<out stem>.runs)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.folder):
        raise SystemExit(f"no such folder: {args.folder}")
    rows = load(args.folder)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows), end="")


if __name__ == "__main__":
    main()
