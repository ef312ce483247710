"""Self-generated vs C4 calibration: WikiText-2 perplexity after pruning with each, and whether the
data-free KL(dense ‖ pruned) ranks the pruned models as perplexity does.

    python benchmarks/models/self_vs_c4_calibration.py                       # SmolLM2-135M, `cpu` protocol (long)
    python benchmarks/models/self_vs_c4_calibration.py --quick               # stories260K, `smoke` protocol (minutes)
    python benchmarks/models/self_vs_c4_calibration.py --methods wanda --settings 50% --eval-windows 8

For every calibration source (self, c4) × method (wanda, sparsegpt, fista) × setting (50% unstructured, 2:4):
``optprune.llm_adapters.run.prune(model=..., method=..., sparsity=..., pattern=..., calibration=...,
protocol=...)`` — the same pipeline as ``optprune prune`` — then

* WikiText-2 perplexity of the pruned model (the protocol's windows),
* KL(dense ‖ pruned) and top-1 agreement on held-out self-generated sequences (seed + 1000, never the
  calibration draw; :func:`optprune.llm_adapters.divergence.heldout_divergence`), and with ``--text-kl`` also
  on the WikiText-2 evaluation windows.

Self-generated sequences are cached (``$OPTPRUNE_CACHE_DIR`` or ``~/.cache/optprune``): the first self run pays
the generation, the others reuse it; the generation time is reported separately from the pruning time.

Writes ``<output>/self_vs_c4.json`` and ``<output>/self_vs_c4.md``: the perplexity table (self vs C4, Δ), and
the rank-correlation table (Spearman and Kendall of KL vs perplexity over all pruned variants, per calibration
source, and per setting). Everything named with its protocol.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

SETTINGS = {"50%": (0.5, "unstructured"), "2:4": (0.5, "2:4"), "70%": (0.7, "unstructured"),
            "60%": (0.6, "unstructured"), "4:8": (0.5, "4:8")}


def _rank_corr(xs, ys) -> dict:
    from scipy import stats
    ok = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None and math.isfinite(x)
          and math.isfinite(y)]
    if len(ok) < 3:
        return {"n": len(ok), "spearman": None, "kendall": None}
    a, b = zip(*ok)
    return {"n": len(ok), "spearman": float(stats.spearmanr(a, b).statistic),
            "kendall": float(stats.kendalltau(a, b).statistic)}


def _fmt(v, spec=".3f"):
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default smollm2-135m (stories260k with --quick)")
    ap.add_argument("--protocol", default=None, help="default cpu (smoke with --quick)")
    ap.add_argument("--methods", default=None, help="default wanda,sparsegpt,fista")
    ap.add_argument("--settings", default="50%,2:4", help="comma list of " + ", ".join(SETTINGS).replace("%", "%%"))
    ap.add_argument("--calibrations", default="self,c4")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration samples (default: the protocol's)")
    ap.add_argument("--seqlen", type=int, default=None, help="calibration window (default: the protocol's)")
    ap.add_argument("--eval-windows", type=int, default=None, help="WikiText-2 windows (default: the protocol's)")
    ap.add_argument("--heldout-tokens", type=int, default=4096, help="held-out self-generated tokens for the KL")
    ap.add_argument("--text-kl", action="store_true", help="also KL/top-1 on the WikiText-2 evaluation windows")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--gen-threads", type=int, default=1,
                    help="torch threads for the held-out sampling and the KL forwards (1 is fastest on a busy CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--cache-dir", default=None, help="self-generated sequences cache ($OPTPRUNE_CACHE_DIR)")
    ap.add_argument("--output", default=None, help="folder for self_vs_c4.json/.md (default benchmarks/results/...)")
    ap.add_argument("--quick", action="store_true",
                    help="stories260K on the smoke protocol with 16 calibration samples and 8 eval windows")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cache_dir:
        os.environ["OPTPRUNE_CACHE_DIR"] = str(args.cache_dir)
    model = args.model or ("stories260k" if args.quick else "smollm2-135m")
    protocol = args.protocol or ("smoke" if args.quick else "cpu")
    methods = (args.methods or "wanda,sparsegpt,fista").split(",")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        if s not in SETTINGS:
            ap.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    cals = [c.strip() for c in args.calibrations.split(",") if c.strip()]
    nsamples = args.nsamples if args.nsamples is not None else (16 if args.quick else None)
    eval_windows = args.eval_windows if args.eval_windows is not None else (8 if args.quick else None)
    out_dir = Path(args.output) if args.output else REPO / "benchmarks" / "results" / f"self_vs_c4_{model}"
    out_dir.mkdir(parents=True, exist_ok=True)

    from optprune.llm_adapters import run as R
    from optprune.llm_adapters.divergence import heldout_divergence, kl_eval
    from optprune.llm_adapters.loading import load_model
    from optprune.solvers import get_method
    from optprune.solvers.registry import UnknownMethodError

    common = dict(protocol=protocol, nsamples=nsamples, seqlen=args.seqlen, eval_windows=eval_windows,
                  data_dir=args.data_dir, model_dir=args.model_dir, device=args.device)
    t_all = time.perf_counter()
    print(f"self vs C4 calibration: model {model}, protocol {protocol}"
          f"{' (quick)' if args.quick else ''}, methods {','.join(methods)}, settings {','.join(settings)}",
          flush=True)

    # dense reference: perplexity (same windows) and the model for the KL
    t0 = time.perf_counter()
    dense_rec = R.evaluate(model=model, protocol=protocol, eval_windows=eval_windows, data_dir=args.data_dir,
                           model_dir=args.model_dir, device=args.device, progress=False, verbose=False)
    dense, tok, _ = load_model(model, model_dir=args.model_dir)
    dense.eval()
    dense_ppl = dense_rec["perplexity"]["wikitext2"]["ppl"]
    eval_prot = dense_rec["protocol"]
    print(f"dense: WikiText-2 ppl {dense_ppl:.3f} ({eval_prot.get('eval_seqlen')} × "
          f"{dense_rec['perplexity']['wikitext2']['windows']} windows), {time.perf_counter() - t0:.1f} s", flush=True)
    text_windows = None
    if args.text_kl:
        from optprune.llm_adapters import data as D
        L = dense_rec["perplexity"]["wikitext2"]["seqlen"]
        ids = D.eval_tokens(tok, "wikitext2", seqlen=L, data_dir=args.data_dir)
        n = min(ids.numel() // L, dense_rec["perplexity"]["wikitext2"]["windows"])
        text_windows = ids[: n * L].view(n, L)

    rows = []
    for cal in cals:
        for method in methods:
            try:
                get_method(method)
            except UnknownMethodError:
                print(f"  {method}: not registered here — skipped", flush=True)
                rows.append({"calibration": cal, "method": method, "status": "unavailable"})
                continue
            for setting in settings:
                sp, pat = SETTINGS[setting]
                row = {"calibration": cal, "method": method, "setting": setting, "sparsity": sp, "pattern": pat}
                t0 = time.perf_counter()
                try:
                    mdl, _, rec = R.prune(model=model, method=method, sparsity=sp, pattern=pat, calibration=cal,
                                          output=None, progress=False, verbose=False, return_model=True, kl=False,
                                          **common)
                except Exception as e:  # a failing configuration is a row, not the end of the benchmark
                    row.update(status="error", error=f"{type(e).__name__}: {e}")
                    rows.append(row)
                    print(f"  {cal:>4} {method:<10} {setting:<4} ERROR {row['error']}", flush=True)
                    continue
                calib = rec.get("calibration") or {}
                row.update(status="done", ppl=rec["perplexity"]["wikitext2"]["ppl"],
                           prune_s=rec["timings"].get("prune_s"), calibration_s=rec["timings"].get("calibration_s"),
                           wall_s=time.perf_counter() - t0, sparsity_achieved=rec["summary"]["sparsity"],
                           calibration_info={k: calib.get(k) for k in ("source", "name", "cache_hit", "seed",
                                                                        "generation_time_s", "nsamples", "seqlen")
                                             if k in calib},
                           protocol=rec["protocol"]["name"])
                # the data-free KL against the one dense model loaded above (same held-out set for every row)
                dense.to(mdl.device if hasattr(mdl, "device") else "cpu")
                dv = heldout_divergence(mdl, dense, tok, seed=rec["protocol"]["seed"], tokens=args.heldout_tokens,
                                        num_threads=args.gen_threads)
                dense.to("cpu")
                row.update(kl=dv["kl"], top1=dv["top1"], kl_tokens=dv["tokens"])
                if text_windows is not None:
                    tv = kl_eval(mdl, dense.to(mdl.device), text_windows, batch_size=1)
                    dense.to("cpu")
                    row.update(text_kl=tv["kl"], text_top1=tv["top1"])
                rows.append(row)
                print(f"  {cal:>4} {method:<10} {setting:<4} ppl {row['ppl']:9.3f}  KL {row['kl']:.4f}  "
                      f"top1 {row['top1']:.3f}  prune {row['prune_s'] or 0:.1f} s  calib {row['calibration_s'] or 0:.1f} s"
                      f"{' (cached)' if row['calibration_info'].get('cache_hit') else ''}", flush=True)
                del mdl

    done = [r for r in rows if r.get("status") == "done"]
    corr = {"all": _rank_corr([r["kl"] for r in done], [r["ppl"] for r in done])}
    for cal in cals:
        sub = [r for r in done if r["calibration"] == cal]
        corr[f"calibration={cal}"] = _rank_corr([r["kl"] for r in sub], [r["ppl"] for r in sub])
    for setting in settings:
        sub = [r for r in done if r["setting"] == setting]
        corr[f"setting={setting}"] = _rank_corr([r["kl"] for r in sub], [r["ppl"] for r in sub])
    if text_windows is not None:
        corr["all (KL on WikiText-2)"] = _rank_corr([r.get("text_kl") for r in done], [r["ppl"] for r in done])

    from optprune.llm_adapters.report import library_versions, machine_info
    result = {"benchmark": "self_vs_c4_calibration", "model": model, "protocol": protocol, "quick": args.quick,
              "eval_protocol": eval_prot, "dense_ppl": dense_ppl, "heldout_tokens": args.heldout_tokens,
              "rows": rows, "rank_correlation_kl_vs_ppl": corr, "total_s": time.perf_counter() - t_all,
              "versions": library_versions(), "machine": machine_info(str(args.device or "cpu")),
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    (out_dir / "self_vs_c4.json").write_text(json.dumps(result, indent=1, default=str))

    md = [f"# Self-generated vs C4 calibration — {model}, protocol `{protocol}`{' (quick)' if args.quick else ''}",
          "", f"Command: `python benchmarks/models/{result['command']}`; {platform.node()}, torch {torch.__version__}, "
          f"total {result['total_s']:.0f} s.",
          f"Dense WikiText-2 perplexity {dense_ppl:.3f} (seqlen {eval_prot.get('eval_seqlen')}, "
          f"{dense_rec['perplexity']['wikitext2']['windows']} windows). KL(dense ‖ pruned) in nats/token and top-1 "
          f"agreement on ≥{args.heldout_tokens} held-out self-generated tokens (seed + 1000).", "",
          "| method | setting | " + " | ".join(f"ppl ({c})" for c in cals)
          + (" | Δppl (self − c4)" if {"self", "c4"} <= set(cals) else "")
          + " | " + " | ".join(f"KL ({c}) | top-1 ({c})" for c in cals) + " |",
          "|---|---|" + "---:|" * (len(cals) * 3 + (1 if {"self", "c4"} <= set(cals) else 0))]
    for method in methods:
        for setting in settings:
            by = {r["calibration"]: r for r in done if r["method"] == method and r["setting"] == setting}
            if not by:
                continue
            cells = [_fmt(by.get(c, {}).get("ppl")) for c in cals]
            if {"self", "c4"} <= set(cals):
                d = (by["self"]["ppl"] - by["c4"]["ppl"]) if ("self" in by and "c4" in by) else None
                cells.append(_fmt(d, "+.3f"))
            for c in cals:
                cells += [_fmt(by.get(c, {}).get("kl"), ".4f"), _fmt(by.get(c, {}).get("top1"))]
            md.append(f"| {method} | {setting} | " + " | ".join(cells) + " |")
    skipped = [r for r in rows if r.get("status") != "done"]
    if skipped:
        md += ["", "Not run: " + "; ".join(f"{r['calibration']}/{r['method']}/{r.get('setting', '*')}: "
                                           f"{r.get('error', r['status'])}" for r in skipped)]
    md += ["", "Rank correlation of KL (held-out self-generated) with WikiText-2 perplexity over the pruned variants:",
           "", "| variants | n | Spearman ρ | Kendall τ |", "|---|---:|---:|---:|"]
    for k, v in corr.items():
        md.append(f"| {k} | {v['n']} | {_fmt(v['spearman'])} | {_fmt(v['kendall'])} |")
    gen = [r["calibration_info"] for r in done if r["calibration"] == "self"]
    if gen:
        g = next((x for x in gen if not x.get("cache_hit")), gen[0])
        md += ["", f"Self-calibration generation time (first, uncached run): "
                   f"{_fmt(g.get('generation_time_s'), '.1f')} s; later runs read the cache."]
    (out_dir / "self_vs_c4.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwritten: {out_dir}/self_vs_c4.json, self_vs_c4.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
