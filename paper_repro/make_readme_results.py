"""Generate the results page, ``docs/results.md``, from the files the benchmark scripts wrote.

Reads

* ``paper_repro/results/<paper>_<scale>.json`` (written by ``paper_repro/<paper>.py``; quick runs are ignored),
* ``benchmarks/results/bench_solvers.json`` (``benchmarks/solvers/bench_solvers.py``),
* ``benchmarks/results/bench_models_<model>.json`` (``benchmarks/models/bench_models.py``),
* ``benchmarks/results/certificates_<model>.json`` (``benchmarks/solvers/certificate_report.py``),
* ``benchmarks/results/scale_<machine>.json`` (``benchmarks/models/scale_report.py``: cost against model size),

draws one plot per method of perplexity vs sparsity (matplotlib, Agg backend; PNG under ``docs/img/``) from the
paper-reproduction rows of each scale, and replaces **only** the text between ``<!-- results:start -->`` and
``<!-- results:end -->`` in the output page (the markers are appended, under a "## Results" heading, when absent;
a missing page is created). Every number in the block comes from those files; nothing is typed here. Links and
images are written relative to the page's folder.

    python paper_repro/make_readme_results.py [--output docs/results.md] [--scales stories,cpu,paper]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, fmt_num, parse_setting, render_markdown  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
PAPERS = ["fistapruner", "alphapruning", "spap", "eggs_ptp", "alps"]
SCALE_ORDER = ["paper", "cpu", "stories"]
SCALE_TEXT = {"stories": "stories260K, `smoke` protocol", "cpu": "SmolLM2-135M, `cpu` protocol",
              "paper": "`paper` protocol (GPU)"}


class ResultsPageError(ValueError):
    pass


# ================================================================================================ collection
def load_results(results_dir: Path, scales) -> dict:
    """{scale: {paper: result document}} for the non-quick results present."""
    out = {}
    for sc in scales:
        for p in PAPERS:
            f = Path(results_dir) / f"{p}_{sc}.json"
            if f.is_file():
                out.setdefault(sc, {})[p] = json.loads(f.read_text())
    return out


def series(docs: dict) -> dict:
    """{method: {series label: [(sparsity, ppl, setting label)], ...}} merged over the papers of one scale, plus
    the dense perplexity under key ``None``. Identical configurations measured by two papers are one series."""
    out: dict = {}
    dense = None
    for paper, d in docs.items():
        if d.get("dense") and d["dense"].get("ppl") is not None and dense is None:
            dense = d["dense"]["ppl"]
        for c in d["rows"]:
            if c.get("ppl") is None:
                continue
            st = parse_setting(c["setting"])
            if c.get("structure"):
                kind = f"structured {c['structure']}"
            elif st["pattern"] == "unstructured":
                kind = "unstructured"
            else:
                kind = st["pattern"]
            parts = []
            if c.get("allocation", "uniform") != "uniform":
                parts.append(f"{c['allocation']} allocation")
            if not c.get("structure"):
                parts.append("EC on" if c.get("error_correction") else "EC off")
            if c.get("method_options"):
                parts.append(", ".join(f"{k}={v}" for k, v in sorted(c["method_options"].items())))
            if c.get("min_degree") is not None:
                parts.append(f"B={c['min_degree']}")
            label = ", ".join(parts) or kind
            pts = out.setdefault(c["method"], {}).setdefault(label, {})
            pts.setdefault((kind, st["sparsity"]), (c["ppl"], c["setting_label"], paper))
    return {"dense": dense, "methods": out}


def plot_methods(sv: dict, img_dir: Path, scale: str, model_label: str, metric: str) -> dict:
    """One PNG per method: perplexity vs sparsity (log y), a line per series; N:M settings as markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    img_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for meth, ser in sorted(sv["methods"].items()):
        fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=110)
        markers = {"2:4": "s", "4:8": "^"}
        for i, (label, pts) in enumerate(sorted(ser.items())):
            color = f"C{i % 10}"
            kinds = sorted({k for k, _ in pts})
            for kind in kinds:
                xs = sorted(x for k, x in pts if k == kind)
                ys = [pts[(kind, x)][0] for x in xs]
                if kind in markers or ":" in kind:
                    ax.scatter(xs, ys, marker=markers.get(kind, "D"), s=45, color=color, zorder=3,
                               label=f"{label} ({kind})")
                else:
                    ax.plot(xs, ys, marker="o", color=color, label=f"{label} ({kind})")
        if sv["dense"] is not None:
            ax.axhline(sv["dense"], color="gray", ls="--", lw=1, label=f"dense {sv['dense']:.1f}")
        ax.set_yscale("log")
        structured = all(k.startswith("structured") for pts in ser.values() for k, _ in pts)
        ax.set_xlabel("sparsity (share of MLP neurons removed)" if structured else
                      "sparsity (share of weights removed; N:M at N/M)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{meth} — {model_label} ({scale}); {metric}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        f = img_dir / f"ppl_vs_sparsity_{meth}_{scale}.png"
        fig.savefig(f)
        plt.close(fig)
        files[meth] = f
    return files


# ================================================================================================ Markdown
def _relpath(p: Path, page: Path) -> str:
    return os.path.relpath(Path(p).resolve(), Path(page).resolve().parent).replace(os.sep, "/")


def _hardware(doc: dict) -> str:
    m, v = doc.get("machine") or {}, doc.get("versions") or {}
    if not m:
        return "unknown"
    dev = m.get("cuda") or f"{m.get('device', '?')}, {m.get('cpu_count', '?')} CPU cores, {m.get('torch_threads', '?')} torch thread(s), {m.get('memory_gb', '?')} GB RAM"
    return (f"{dev}; {m.get('platform', '')}; python {v.get('python', '?')}, torch {v.get('torch', '?')}, "
            f"transformers {v.get('transformers', '?')}, optprune commit {v.get('git_commit', '?')}")


def solver_summary(doc: dict) -> list:
    """A condensed view of bench_solvers.json (the full tables are in benchmarks/results/bench_solvers.md)."""
    meta = doc["meta"]
    out = [f"Command: `{meta['command']}` — {meta['hardware']}, torch {meta['torch']}, {meta['threads']} thread(s); "
           f"MIQP time limit {meta['time_limit']} s. Instances are synthetic (`LayerProblem.random(kind="
           f"'{meta.get('kind', '?')}')`, float64).", ""]
    conv = [r for r in doc.get("ladders", []) if r["ladder"] in ("refit QP", "l1 model") and r.get("status") != "skipped"]
    mk = [r for r in doc.get("ladders", []) if r["ladder"].startswith("EGGS") and r.get("status") != "skipped"]
    if conv or mk:
        out.append("| model | reference | largest m×n solved | ref s | torch s | speed-up | max |rel. gap| over the ladder |")
        out.append("|---|---|---|---|---|---|---|")
        groups = {}
        for r in conv + mk:
            groups.setdefault((r["ladder"], r.get("solver", r["reference"])), []).append(r)
        for (lad, ref), rs in groups.items():
            big = max(rs, key=lambda r: r["m"] * r["n"])
            gaps = [abs(r["gap"]) for r in rs if r.get("gap") is not None]
            out.append(f"| {lad} | {ref} | {big['m']}×{big['n']} ({big['variables']} vars) | "
                       f"{fmt_num(big.get('time_s'), '.3f')} | {fmt_num(big['torch_s'], '.4f')} | "
                       f"{fmt_num(big.get('speedup'), '.0f')}× | {fmt_num(max(gaps) if gaps else None, '.1e')} |")
        out.append("")
    l0 = [r for r in doc.get("ladders", []) if r["ladder"].startswith("L0")]
    if l0:
        meths = []
        for r in l0:
            for h in r["heuristics"]:
                if h["method"] not in meths and h.get("gap") is not None:
                    meths.append(h["method"])
        out.append("L0 / group MIQP — relative gap of each heuristic to the reference optimum (proven: enumeration or "
                   "Gurobi; '*' = best incumbent of a time-limited solve, not proven):")
        out.append("")
        out.append("| program | m×n | reference (s) | " + " | ".join(meths) + " |")
        out.append("|---|---|---|" + "---|" * len(meths))
        for r in l0:
            if r["ref_objective"] is None:  # no reference took this size: the ladder's end
                continue
            hs = {h["method"]: h for h in r["heuristics"]}
            cells = [fmt_num(hs[m_].get("gap"), ".2e") if m_ in hs else "" for m_ in meths]
            out.append(f"| {r['ladder'][3:]} | {r['m']}×{r['n']} | {r['ref_solver']}{'' if r['ref_proven'] else '*'} "
                       f"({fmt_num(r['ref_time_s'], '.2f')}) | " + " | ".join(cells) + " |")
        out.append("")
    lay = doc.get("layers") or []
    if lay:
        shapes, meths = [], []
        for r in lay:
            if r["shape"] not in shapes:
                shapes.append(r["shape"])
            if r["method"] not in meths:
                meths.append(r["method"])
        how = sorted({r.get("inputs", "") for r in lay if r.get("inputs")})
        out.append(f"Per-layer time (s) on SmolLM2-135M's layer shapes ({'; '.join(how)}):")
        out.append("")
        out.append("| method | pattern | " + " | ".join(shapes) + " |")
        out.append("|---|---|" + "---|" * len(shapes))
        for m_ in meths:
            rs = {r["shape"]: r for r in lay if r["method"] == m_}
            pl = next(iter(rs.values()))["pattern"]
            out.append(f"| {m_} | {pl} | " + " | ".join(
                ("" if s not in rs else ("error" if rs[s].get("error") else fmt_num(rs[s]["time_s"], ".3f")))
                for s in shapes) + " |")
        out.append("")
    return out


def build_block(page: Path, results_dir: Path, bench_dir: Path, img_dir: Path, scales) -> str:
    res = load_results(results_dir, scales)
    L = ["", "*Generated by `python paper_repro/make_readme_results.py` from the result files below — do not edit "
         "by hand; rerun the scripts and the generator instead.*", ""]
    if not res:
        L.append(f"No paper-reproduction results found in `{_relpath(results_dir, page)}` yet.")
    disagreements = []
    for sc in [s for s in SCALE_ORDER if s in res]:
        for p, d in res[sc].items():
            for c in d["claims"]:
                if c["verdict"] == "DISAGREES":
                    disagreements.append((sc, d["paper"]["title"], c))
    if res:
        L.append("**Where our numbers disagree with the papers' claims**" + (":" if disagreements else ": nowhere in "
                                                                             "the runs below."))
        L.append("")
        for sc, title, c in disagreements:
            pv = (f"paper {fmt_num(c['paper_values'][0])} vs {fmt_num(c['paper_values'][1])} on {c['paper_model']}"
                  if c.get("paper_values") else f"paper: {c['paper_text']}")
            ov = (f"ours {fmt_num(c['ours_values'][0])} vs {fmt_num(c['ours_values'][1])}"
                  + (" (a tie)" if c.get("ours_tie") else "") if c.get("ours_values") else c.get("why", ""))
            kl = ""
            if c.get("ours_kl_values"):
                kl = f"; by KL to dense the claim {'holds' if c['ours_kl_holds'] else 'fails too'}"
            L.append(f"- {title} ({SCALE_TEXT.get(sc, sc)}): *{c['text']}* — {pv}; {ov}{kl}.")
        if disagreements:
            L.append("")
    for sc in [s for s in SCALE_ORDER if s in res]:
        docs = res[sc]
        any_doc = next(iter(docs.values()))
        prot = any_doc["protocol"]
        L.append(f"### {SCALE_TEXT.get(sc, sc)}")
        L.append("")
        L.append(f"Protocol `{prot['name']}`: model {any_doc['model_label']}; calibration {prot['calibration']} "
                 f"{prot['nsamples']}×{prot['seqlen']}, seed {prot['seed']}; evaluation "
                 f"{', '.join(prot['eval_datasets'])}, seqlen {prot['eval_seqlen']}, "
                 f"{'all windows' if not prot['eval_windows'] else 'first ' + str(prot['eval_windows']) + ' windows'}. "
                 f"Hardware and versions (from the run records): {_hardware(any_doc)}.")
        L.append("")
        L.append("Reproduce:")
        L.append("")
        L.append("```bash")
        for p in PAPERS:
            if p in docs:
                L.append(docs[p]["command"])
        L.append("python paper_repro/make_readme_results.py")
        L.append("```")
        L.append("")
        sv = series(docs)
        metric = (f"WikiText-2, seqlen {prot['eval_seqlen']}"
                  + ("" if not prot["eval_windows"] else f", first {prot['eval_windows']} windows"))
        files = plot_methods(sv, img_dir, sc, any_doc["model_label"], metric)
        for p in PAPERS:
            if p not in docs:
                continue
            d = docs[p]
            L.append(f"#### {d['paper']['title']} (arXiv {d['paper']['arxiv']}) — "
                     f"[{_relpath(results_dir / f'{p}_{sc}.md', page)}]({_relpath(results_dir / f'{p}_{sc}.md', page)})")
            L.append("")
            L.append(render_markdown(d, level=4, title=False))
            L.append("")
        if files:
            L.append(f"#### Perplexity vs sparsity per method ({SCALE_TEXT.get(sc, sc)})")
            L.append("")
            L.append("One plot per method from the rows above (log scale; dashed: dense; squares: N:M patterns).")
            L.append("")
            for meth, f in files.items():
                L.append(f"![{meth}: perplexity vs sparsity]({_relpath(f, page)})")
            L.append("")
    sb = Path(bench_dir) / "bench_solvers.json"
    if sb.is_file():
        L.append("### Solvers against their references")
        L.append("")
        L.append(f"Full tables: [{_relpath(sb.with_suffix('.md'), page)}]({_relpath(sb.with_suffix('.md'), page)}).")
        L.append("")
        L.extend(solver_summary(json.loads(sb.read_text())))
    bms = sorted(Path(bench_dir).glob("bench_models_*.json"))
    if bms:
        sys.path.insert(0, str(REPO / "benchmarks" / "models"))
        from bench_models import render_markdown as bm_md
        for f in bms:
            doc = json.loads(f.read_text())
            L.append(bm_md(doc, level=3))
            L.append("")
    quants = sorted(Path(bench_dir).glob("quant_vs_*.jsonl"))
    if quants:
        sys.path.insert(0, str(REPO / "benchmarks" / "quant"))
        from quant_sweep import table as quant_table
        L.append("### Low-bit weights against llm-compressor")
        L.append("")
        L.append("One calibration (the same token ids for both tools) and one evaluator (optprune's, `cpu` protocol "
                 "WikiText-2) per file; rows of `tool: other` are llm-compressor's checkpoints, written in its own "
                 "virtual environment by `benchmarks/quant/llmc_gptq.py` and evaluated here. Commands: "
                 "`benchmarks/quant/quant_sweep.py`'s docstring. The times of these runs were taken on a loaded "
                 "2-core machine at different priorities: they are not a speed comparison. "
                 "SmolLM2-135M's file: 32 C4 windows of 512 tokens from the `cpu` protocol's calibration (a quarter "
                 "of its 128, to fit this machine's time), group 64 (576-wide inputs do not divide by 128).")
        L.append("")
        for f in quants:
            L.append(f"`{_relpath(f, page)}`:")
            L.append("")
            L.append(quant_table(str(f)))
            L.append("")
    for f in sorted(Path(bench_dir).glob("scale_*.json")):  # cost against model size (scale_report.py)
        sys.path.insert(0, str(REPO / "benchmarks" / "models"))
        from scale_report import render_markdown as scale_md
        doc = json.loads(f.read_text())
        if doc.get("plot"):  # the plot sits beside the JSON; link it from the page
            doc["plot"] = _relpath(f.parent / doc["plot"], page)
        L.append(scale_md(doc, level=3))
        L.append("")
    certs = sorted(Path(bench_dir).glob("certificates_*.json"))
    if certs:
        sys.path.insert(0, str(REPO / "benchmarks" / "solvers"))
        from certificate_report import render_markdown as cert_md
        for f in certs:
            doc = json.loads(f.read_text())
            if doc.get("plot"):  # the plot sits beside the JSON; link it from the page
                doc["plot"] = _relpath(f.parent / doc["plot"], page)
            L.append(cert_md(doc, level=3))
            L.append("")
    return "\n".join(L).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    """Replace the text between the markers (markers kept); append them under '## Results' when absent."""
    if text.count(START) > 1 or text.count(END) > 1:
        raise ResultsPageError("the page has more than one results marker pair")
    if START not in text and END not in text:
        sep = "" if text.endswith("\n") else "\n"
        text = text + sep + "\n## Results\n\n" + START + "\n" + END + "\n"
    elif (START in text) != (END in text):
        raise ResultsPageError(f"the page has only one results marker of the pair {START} / {END}")
    i, j = text.index(START), text.index(END)
    if j < i:
        raise ResultsPageError(f"the results marker {END} comes before {START} in the page")
    return text[: i + len(START)] + "\n" + block + text[j:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=str(REPO / "docs" / "results.md"),
                    help="the Markdown page whose marked block is (re)written (default docs/results.md)")
    ap.add_argument("--results-dir", default=str(REPO / "paper_repro" / "results"))
    ap.add_argument("--bench-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--img-dir", default=str(REPO / "docs" / "img"))
    ap.add_argument("--scales", default="paper,cpu,stories")
    args = ap.parse_args(argv)
    page = Path(args.output)
    text = page.read_text() if page.exists() else "# Results\n"
    try:
        replace_block(text, "")  # check the markers before anything is drawn
    except ResultsPageError as e:
        raise SystemExit(f"make_readme_results: error: {e}") from None
    block = build_block(page, Path(args.results_dir), Path(args.bench_dir), Path(args.img_dir),
                        [s for s in args.scales.split(",") if s])
    try:
        new = replace_block(text, block)
    except ResultsPageError as e:
        raise SystemExit(f"make_readme_results: error: {e}") from None
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(new)
    print(f"updated {page}: results block {len(block.splitlines())} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
