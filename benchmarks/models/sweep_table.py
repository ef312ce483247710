"""Markdown tables from a ``benchmarks/models/sweep.py`` JSONL file: one row per configuration (method, error
correction, allocation, calibration, options), one column per setting; perplexity, KL to dense and times.

    python benchmarks/models/sweep_table.py benchmarks/results/cpu_smollm2.jsonl [--metric wikitext2] [--out table.md]

Nothing is typed by hand: every number is a field of a row. Failed runs show their error; missing cells "–".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _setting(c: dict) -> str:
    if c.get("method") == "dense":
        return "dense"
    p = c.get("pattern") or "unstructured"
    if p == "unstructured":
        return f"{c.get('sparsity', 0):.0%}" + (" MLP" if c.get("structure") else "")
    return p if ":" in p else f"{p} {c.get('sparsity', 0):.0%}"


def _default_calibration(protocol) -> str | None:
    """The protocol's own calibration source: a row that names it is the same configuration as one that doesn't."""
    try:
        from optprune.llm_adapters.data import PROTOCOLS
        return PROTOCOLS[protocol].calibration
    except Exception:  # optprune not importable, or an unknown protocol: keep every label
        return None


def _label(c: dict) -> str:
    if c.get("method") == "dense":
        return "dense"
    parts = [c["method"]]
    if c.get("error_correction") is not None:
        parts.append("EC on" if c["error_correction"] else "EC off")
    if c.get("allocation") not in (None, "uniform"):
        parts.append(f"alloc {c['allocation']}")
    if c.get("calibration") and c["calibration"] != _default_calibration(c.get("protocol")):
        parts.append(f"calib {c['calibration']}")
    if c.get("min_degree") is not None:
        parts.append(f"B={c['min_degree']}")
    if c.get("method_options"):
        parts.append(",".join(f"{k}={v}" for k, v in c["method_options"].items()))
    return " · ".join(parts)


def _order(s: str) -> tuple:
    if s == "dense":
        return (0, 0.0, s)
    if s.endswith("%") or s.endswith("MLP"):
        return (1, float(s.split("%")[0]), s)
    return (2, 0.0, s)


def load(path: Path) -> list:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def tables(rows: list, metric: str = "wikitext2") -> str:
    cells, labels, settings = {}, [], []
    for r in rows:
        c = r.get("config") or {}
        lab, st = _label(c), _setting(c)
        if lab not in labels:
            labels.append(lab)
        if st not in settings:
            settings.append(st)
        cells[(lab, st)] = r  # a later row (a rerun) wins
    settings.sort(key=_order)
    machine = next((r.get("machine") for r in rows if r.get("machine")), None) or {}
    versions = next((r.get("versions") for r in rows if r.get("versions")), None) or {}
    proto = sorted({(r.get("config") or {}).get("protocol") for r in rows} - {None})
    out = [f"Rows: {len(rows)}; protocol {', '.join(proto) or '?'}; machine: "
           f"{machine.get('cuda') or machine.get('processor') or machine.get('machine') or machine.get('device') or '?'} "
           f"({machine.get('cpu_count', '?')} cores, "
           f"{machine.get('torch_threads', '?')} torch threads); torch {versions.get('torch', '?')}, "
           f"transformers {versions.get('transformers', '?')}.", ""]

    def grid(title: str, fmt) -> None:
        out.extend([f"**{title}**", "", "| configuration | " + " | ".join(settings) + " |",
                    "|---|" + "---|" * len(settings)])
        for lab in labels:
            vals = []
            for st in settings:
                r = cells.get((lab, st))
                vals.append("–" if r is None else (f"error: {r['error'][:60]}" if r.get("error") else fmt(r)))
            if any(v != "–" for v in vals):
                out.append(f"| {lab} | " + " | ".join(vals) + " |")
        out.append("")

    def ppl(r):
        v = (r.get("perplexity") or {}).get(metric)
        return "–" if v is None else f"{v:.2f}"

    def kl(r):
        return "–" if r.get("kl") is None else f"{r['kl']:.3f} / {r.get('top1') or 0:.3f}"

    def times(r):
        t = r.get("timings") or {}
        p = t.get("prune_s")
        return f"{r.get('wall_s', 0):.0f}" + (f" ({p:.0f})" if p is not None else "")

    grid(f"{metric} perplexity (lower is better)", ppl)
    grid("KL to dense (nats/token) / top-1 agreement, held-out self-generated text", kl)
    grid("wall time of the run, s (pruning alone)", times)
    graph = [(lab, st, cells[(lab, st)]["graph"]) for lab in labels for st in settings
             if isinstance((cells.get((lab, st)) or {}).get("graph"), dict)]
    if graph:
        out.extend(["**Graph of the N:M masks (worst case or mean over the pruned layers; solvers/methods/graph_metrics.py)**",
                    "", "| configuration | pattern | layers | min in-degree (/rows) | isolated inputs (layers) | "
                    "max components | min tile column degree | σ2/Ramanujan mean (max) | relative gap mean |",
                    "|---|---|---|---|---|---|---|---|---|"])
        for lab, st, g in graph:
            def f(v, fmt="{:.3f}"):
                return "–" if v is None else fmt.format(v)
            out.append(f"| {lab} | {st} | {g['layers']} | {g['min_in_degree']} ({f(g['min_in_degree_frac'])}) | "
                       f"{g['isolated_inputs']} ({g['layers_with_isolated_inputs']}) | {g['max_components']} | "
                       f"{f(g.get('min_tile_degree'), '{}')} | {f(g.get('mean_sigma2_over_bound'))} "
                       f"({f(g.get('max_sigma2_over_bound'))}) | {f(g.get('mean_relative_gap'))} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl")
    ap.add_argument("--metric", default="wikitext2")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    md = tables(load(Path(a.jsonl)), a.metric)
    if a.out:
        Path(a.out).write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
