"""How far from optimal are our layers? The certified gaps of ``optprune prune --certify`` runs, over all layers.

Reads the ``run.json`` of one or more ``--certify`` runs (each layer record carries a ``certificate``: our
objective, a valid lower bound on the optimum of the layer's L0 program and ``rel_gap = (objective − bound) /
objective``; FISTA's records add the certified duality gap of its ℓ1 model) and writes

* ``<out>.json`` — per run: the distribution of ``rel_gap`` over its layers (min, quartiles, p90, max), the median
  per layer type (``q_proj``, ``down_proj``, ...), the weakest layers, and FISTA's ℓ1 duality gaps;
* ``<out>.md`` — the same as tables (``paper_repro/make_readme_results.py`` puts it into ``docs/results.md``);
* ``<out>.png`` — the gap distribution of every run, and per layer type (box plots).

    python benchmarks/solvers/certificate_report.py --title "SmolLM2-135M, cpu-protocol calibration" \\
        --out benchmarks/results/certificates_smollm2 RUN_DIR_OR_JSON [...]

Nothing is computed from the models here: every number comes from the run records.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path


class ReportError(ValueError):
    pass


def _quantile(v: list, f: float) -> float:
    v = sorted(v)
    if len(v) == 1:
        return v[0]
    x = f * (len(v) - 1)
    i = int(x)
    j = min(i + 1, len(v) - 1)
    return v[i] + (v[j] - v[i]) * (x - i)


def _dist(v: list) -> dict:
    return {"n": len(v), "min": min(v), "q25": _quantile(v, 0.25), "median": _quantile(v, 0.5),
            "q75": _quantile(v, 0.75), "p90": _quantile(v, 0.9), "max": max(v)}


def _layer_type(name: str) -> str:
    return re.sub(r".*\.", "", name or "?")


def load_run(path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "run.json"
    if not p.is_file():
        raise ReportError(f"{path}: no run.json")
    rec = json.loads(p.read_text())
    layers = [r for r in rec.get("layers", []) if r.get("certificate")]
    if not layers:
        raise ReportError(f"{p}: no layer carries a certificate (run it with --certify)")
    cfg = rec.get("config", {})
    return {"path": str(p), "record": rec, "layers": layers, "method": cfg.get("method"),
            "pattern": cfg.get("pattern") or "unstructured", "sparsity": cfg.get("sparsity"),
            "model": (rec.get("model") or {}).get("name") or cfg.get("model")}


def summarise(run: dict) -> dict:
    L = run["layers"]
    gaps = [float(r["certificate"]["rel_gap"]) for r in L]
    by_type: dict = {}
    for r in L:
        by_type.setdefault(_layer_type(r.get("name")), []).append(float(r["certificate"]["rel_gap"]))
    out = {"method": run["method"], "pattern": run["pattern"], "sparsity": run["sparsity"], "model": run["model"],
           "source": Path(run["path"]).parent.name, "layers": len(L), "rel_gap": _dist(gaps),
           "within_10pct": sum(g <= 0.10 for g in gaps), "within_25pct": sum(g <= 0.25 for g in gaps),
           "by_type": {t: _dist(v) for t, v in by_type.items()},
           "weakest": [{"name": r.get("name"), "rel_gap": float(r["certificate"]["rel_gap"]),
                        "jacobi_t": r["certificate"].get("jacobi_t")}
                       for r in sorted(L, key=lambda r: -float(r["certificate"]["rel_gap"]))[:5]],
           "tightest": [{"name": r.get("name"), "rel_gap": float(r["certificate"]["rel_gap"])}
                        for r in sorted(L, key=lambda r: float(r["certificate"]["rel_gap"]))[:3]],
           "objective_sum": sum(float(r["certificate"]["objective"]) for r in L),
           "bound_sum": sum(float(r["certificate"]["lower_bound"]) for r in L)}
    l1 = [r.get("l1_certificate") or r["certificate"].get("l1") for r in L]
    l1 = [c for c in l1 if c]
    if l1:
        out["l1_rel_gap"] = _dist([float(c["rel_gap"]) for c in l1])
        out["l1_stopped_on_gap"] = sum(bool(c.get("stopped_on_gap")) for c in l1)
    warm = [r for r in L if "returned_warm_start" in r]
    if warm:
        out["returned_warm_start"] = sum(bool(r["returned_warm_start"]) for r in warm)
    t = (run["record"].get("timings") or {})
    out["prune_s"] = t.get("prune_s")
    out["command"] = _command(run["record"])
    return out


def _command(rec: dict) -> str:
    """The CLI call that makes this record (from its config; machine paths left out)."""
    c = rec.get("config") or {}
    prot = (rec.get("protocol") or {}).get("name")
    a = ["optprune", "prune", "--model", str(c.get("model")), "--method", str(c.get("method")),
         "--sparsity", f"{float(c.get('sparsity')):g}", "--pattern", str(c.get("pattern") or "unstructured")]
    if prot:
        a += ["--protocol", prot]
    if c.get("error_correction") is False:
        a.append("--no-error-correction")
    a += ["--certify", "--no-eval", "--no-kl"]
    if c.get("data_dir"):
        a += ["--data-dir", "DATA"]
    return shlex.join(a)


def _pat(s: dict) -> str:
    return s["pattern"] if s["pattern"] != "unstructured" else f"{100 * float(s['sparsity']):.0f}%"


def render_markdown(doc: dict, level: int = 3) -> str:
    h = "#" * level
    runs = doc["runs"]
    L = [f"{h} Certified gaps over all layers: {doc['title']}", ""]
    L.append("`rel_gap = (our error − lower bound) / our error` per layer, from `--certify` (methods §8): no mask of "
             "the layer's pattern can lower its reconstruction error by more than this fraction. "
             f"Generated by `benchmarks/solvers/certificate_report.py` from {len(runs)} run record(s).")
    L.append("")
    L.append("| method | pattern | layers | min | q25 | median | q75 | p90 | max | ≤ 10% | ≤ 25% | Σ error / Σ bound | "
             "ℓ1 duality gap, median (max) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in runs:
        d = s["rel_gap"]
        l1 = (f"{s['l1_rel_gap']['median']:.3f} ({s['l1_rel_gap']['max']:.3f})" if s.get("l1_rel_gap") else "–")
        ratio = s["objective_sum"] / s["bound_sum"] if s["bound_sum"] > 0 else float("inf")
        L.append(f"| {s['method']} | {_pat(s)} | {s['layers']} | {d['min']:.3f} | {d['q25']:.3f} | {d['median']:.3f} | "
                 f"{d['q75']:.3f} | {d['p90']:.3f} | {d['max']:.3f} | {s['within_10pct']} | {s['within_25pct']} | "
                 f"{ratio:.2f} | {l1} |")
    L.append("")
    types = []
    for s in runs:
        for t in s["by_type"]:
            if t not in types:
                types.append(t)
    L.append("Median `rel_gap` per layer type:")
    L.append("")
    L.append("| method | pattern | " + " | ".join(types) + " |")
    L.append("|---|---|" + "---|" * len(types))
    for s in runs:
        L.append(f"| {s['method']} | {_pat(s)} | "
                 + " | ".join(f"{s['by_type'][t]['median']:.3f}" if t in s["by_type"] else "–" for t in types) + " |")
    L.append("")
    L.append("Weakest layers (largest certified gap; `t` is the Jacobi factor of the bound — small `t` means "
             "strongly correlated inputs, where the bound is weak):")
    L.append("")
    for s in runs:
        w = ", ".join(f"`{x['name']}` {x['rel_gap']:.3f}"
                      + (f" (t = {x['jacobi_t']:.2g})" if x.get("jacobi_t") is not None else "") for x in s["weakest"][:3])
        L.append(f"- {s['method']} {_pat(s)}: {w}")
    L.append("")
    extra = [s for s in runs if s.get("returned_warm_start") is not None and s["method"] == "fista"]
    for s in extra:
        L.append(f"- fista {_pat(s)}: returned its warm start on {s['returned_warm_start']} of {s['layers']} layers; "
                 f"ℓ1 gap stopping rule triggered on {s.get('l1_stopped_on_gap', 0)} layers.")
    if extra:
        L.append("")
    if doc.get("plot"):
        L.append(f"![certified gaps]({doc['plot']})")
        L.append("")
    L.append("Commands:")
    L.append("")
    L.append("```bash")
    for s in runs:
        if s.get("command"):
            L.append(s["command"])
    L.append(doc["command"])
    L.append("```")
    return "\n".join(L) + "\n"


def plot(doc: dict, runs_layers: list, path: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = doc["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    ax = axes[0]
    data = [[float(r["certificate"]["rel_gap"]) for r in L] for L in runs_layers]
    ax.boxplot(data, whis=(0, 100))
    ax.set_xticks(range(1, len(runs) + 1))
    ax.set_xticklabels([f"{s['method']}\n{_pat(s)}" for s in runs], fontsize=8)
    ax.set_ylabel("certified relative gap")
    ax.set_ylim(0, 1)
    ax.set_title("all layers", fontsize=9)
    ax = axes[1]
    types = []
    for s in runs:
        for t in s["by_type"]:
            if t not in types:
                types.append(t)
    w = 0.8 / max(1, len(runs))
    for k, (s, L) in enumerate(zip(runs, runs_layers)):
        pos = [i + (k - (len(runs) - 1) / 2) * w for i in range(len(types))]
        vals = [[float(r["certificate"]["rel_gap"]) for r in L if _layer_type(r.get("name")) == t] or [float("nan")]
                for t in types]
        b = ax.boxplot(vals, positions=pos, widths=w * 0.9, whis=(0, 100), patch_artist=True, manage_ticks=False)
        for patch in b["boxes"]:
            patch.set_facecolor(plt.cm.tab10(k))
            patch.set_alpha(0.6)
        ax.plot([], [], "s", color=plt.cm.tab10(k), label=f"{s['method']} {_pat(s)}")
    ax.set_xticks(range(len(types)))
    ax.set_xticklabels(types, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("per layer type", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Certified gaps: {doc['title']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (or their run.json) of --certify runs")
    ap.add_argument("--out", required=True, help="output stem: writes <out>.json, <out>.md, <out>.png")
    ap.add_argument("--title", default=None, help="what the runs are (default: the model's name)")
    ap.add_argument("--no-plot", dest="plot", action="store_false")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
    except (ReportError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    doc = {"title": args.title or str(runs[0]["model"]), "runs": [summarise(r) for r in runs],
           "command": "python benchmarks/solvers/certificate_report.py " + shlex.join(
               ([f"--title={args.title}"] if args.title else []) + [f"--out={args.out}"] + list(args.runs))}
    if args.plot:
        png = out.with_suffix(".png")
        plot(doc, [r["layers"] for r in runs], png)
        doc["plot"] = png.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(render_markdown(doc))
    print(render_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
