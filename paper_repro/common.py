"""Shared machinery of the paper-reproduction scripts.

Each ``paper_repro/<paper>.py`` declares a :class:`PaperSpec` — the rows it reruns (:class:`Variant`: a method
with its options), the paper's sparsity settings, the paper's reported numbers as data (:class:`PaperNumber`,
each with the line of the methods brief it is quoted from) and the paper's claims (:class:`Claim`: "A beats B
at setting s") — and calls :func:`main`. :func:`main`

1. runs every variant through ``benchmarks/models/sweep.py`` (imported, its ``main`` called with arguments), so
   every result is a resumable JSONL row written by the public API (``optprune.prune`` / ``evaluate``);
2. builds our table from those rows only (never from typed numbers), puts the paper's reported numbers
   next to it (the paper's model is named in the header: the papers ran OPT / LLaMA, we run stories260K or
   SmolLM2) and evaluates each claim on our rows (orderings and ratios);
3. writes ``<out>/<paper>_<scale>.json`` and ``.md`` and prints the Markdown.

Scales: ``stories`` (stories260K, ``smoke`` protocol, seconds per run), ``cpu`` (SmolLM2-135M, ``cpu``
protocol, minutes per run on 2 cores), ``paper`` (``paper`` protocol; refuses to start without CUDA).
``--quick`` keeps the variants marked ``quick``, the first setting only, 4 calibration samples, 2 evaluation
windows and no KL (used by the tests); its files are ``<paper>_<scale>_quick.*``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "paper_repro" / "results"

SCALES = {
    "stories": {"model": "stories260k", "protocol": "smoke", "model_label": "stories260K",
                "where": "CPU; seconds per run"},
    "cpu": {"model": "smollm2-135m", "protocol": "cpu", "model_label": "SmolLM2-135M",
            "where": "CPU; minutes per run on 2 cores"},
    "paper": {"model": "smollm2-135m", "protocol": "paper", "model_label": "SmolLM2-135M",
              "where": "a CUDA GPU (the published setting)", "needs_cuda": True},
}
QUICK = {"eval_windows": 2, "nsamples": 4}

__all__ = ["Variant", "PaperNumber", "Claim", "PaperSpec", "main", "run_paper", "build_result",
           "render_markdown", "load_sweep", "methods_md_path", "check_sources", "fmt_num", "parse_setting",
           "SCALES", "RESULTS", "REPO"]


# ================================================================================================ data model
@dataclass
class Variant:
    """One row of a paper's table: a method and how it is run (one ``sweep.py`` call)."""
    id: str                       # short id; the sweep tag is ``<paper>/<id>``
    label: str                    # row label in the tables
    method: str
    error_correction: bool = False
    allocation: str = "uniform"
    method_options: Optional[dict] = None
    structure: Optional[str] = None
    min_degree: Optional[int] = None
    settings: Optional[list] = None   # default: the paper's settings
    quick: bool = False               # kept by --quick
    note: str = ""


@dataclass
class PaperNumber:
    """A number the paper reports, as quoted in the methods brief (``line``: 1-based line number)."""
    variant: str       # Variant.id it corresponds to
    setting: str       # e.g. "0.5", "2:4", "0.7"
    value: float
    model: str         # the paper's model (OPT-125M, LLaMA-7B, ...)
    metric: str        # e.g. "WikiText-2 ppl (seqlen 2048)"
    line: int          # line in docs/methods.md
    quote: str         # the text on that line that holds the number


@dataclass
class Claim:
    """``a`` beats ``b`` (lower perplexity), each a (variant id, setting) cell; the paper's evidence."""
    text: str
    a: tuple
    b: tuple
    paper_values: Optional[tuple] = None   # (value a, value b) as reported, or None: claimed without a number here
    paper_model: str = ""
    paper_line: Optional[int] = None
    paper_text: str = ""                  # what the paper says when there is no number
    paper_source: str = ""                # where, when not a docs/methods.md line (e.g. the paper's abstract)
    ours_only: bool = False               # not a paper claim: a check of ours (verdict holds / does not hold)


@dataclass
class PaperSpec:
    name: str          # file stem: fistapruner, alphapruning, spap, eggs_ptp
    title: str
    seed: str
    arxiv: str
    settings: list     # sweep settings ("0.5", "2:4", "0.7", ...)
    setting_labels: dict
    variants: list
    numbers: list
    claims: list
    notes: list = field(default_factory=list)
    allocation_eps: Optional[float] = None
    extra: Optional[Callable] = None   # fn(args, scale_cfg, result) -> adds sections (e.g. speed) to the result


# ================================================================================================ helpers
def load_sweep():
    """``benchmarks/models/sweep.py`` as a module (benchmarks/ is a folder of scripts, not a package)."""
    return _load_script("benchmarks/models/sweep.py", "_optprune_bench_sweep")


def _load_script(rel: str, modname: str):
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def parse_setting(s: str) -> dict:
    return load_sweep().parse_setting(s)


#: the section of docs/methods.md that describes each paper (by arXiv id)
SECTION = {"2408.03728": "§2", "2410.10912": "§3", "2505.03373": "§4", "2508.09471": "§5", "2406.07831": "§7"}


def methods_md_path() -> Path:
    return REPO / "docs" / "methods.md"


def check_sources(numbers: list) -> list:
    """For every paper number: does docs/methods.md quote it (the value, in the paper's model's context)?"""
    p = methods_md_path()
    out = []
    text = p.read_text() if p.is_file() else None
    for n in numbers:
        if text is None:
            ok, why = None, f"{p} not found"
        else:
            ok = _num_str(n.value) in text and n.model.split()[0] in text
            why = "" if ok else f"{_num_str(n.value)} ({n.model}) not quoted in docs/methods.md"
        out.append({"variant": n.variant, "setting": n.setting, "value": n.value, "line": n.line, "ok": ok,
                    "why": why})
    return out


def _num_str(v: float) -> str:
    return f"{v:.2f}"


def fmt_num(v, spec=".2f", none="–") -> str:
    if v is None:
        return none
    if isinstance(v, str):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _same_setting(cfg: dict, setting: str) -> bool:
    want = parse_setting(setting)
    return cfg.get("pattern") == want["pattern"] and abs(float(cfg.get("sparsity", -1)) - want["sparsity"]) < 1e-9


def read_rows(path: Path) -> list:
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _tag(spec: PaperSpec, v: Variant, quick: bool) -> str:
    return f"{spec.name}/{v.id}" + ("+quick" if quick else "")


def _variants(spec: PaperSpec, quick: bool, only: Optional[list]) -> list:
    vs = [v for v in spec.variants if (v.quick or not quick)]
    if only:
        vs = [v for v in vs if v.id in only]
    return vs


def _settings(spec: PaperSpec, v: Optional[Variant], quick: bool) -> list:
    st = list(v.settings) if (v is not None and v.settings) else list(spec.settings)
    return st[:1] if quick else st


def scale_config(scale: str, model: Optional[str] = None) -> dict:
    if scale not in SCALES:
        raise SystemExit(f"unknown --scale {scale!r}; choose from {', '.join(SCALES)}")
    cfg = dict(SCALES[scale], scale=scale)
    if model:
        cfg["model"] = model
        cfg["model_label"] = model
    return cfg


def require_cuda(cfg: dict) -> None:
    if cfg.get("needs_cuda"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit(f"--scale {cfg['scale']} runs the '{cfg['protocol']}' protocol (128×2048 calibration, "
                             f"full WikiText-2 + PTB + C4 evaluation) and needs a CUDA GPU; none is available here "
                             f"(torch.cuda.is_available() is False). Use --scale stories or --scale cpu.")


# ================================================================================================ running
def sweep_argv(spec: PaperSpec, v: Variant, cfg: dict, out: Path, *, quick: bool, threads: Optional[int],
               dense: bool, eval_windows=None, nsamples=None, kl: bool = True, eval_datasets=None) -> list:
    argv = ["--model", cfg["model"], "--protocol", cfg["protocol"], "--methods", v.method,
            "--settings", ",".join(_settings(spec, v, quick)), "--allocations", v.allocation,
            "--error-correction", "on" if v.error_correction else "off", "--tag", _tag(spec, v, quick),
            "--out", str(out)]
    for k, val in (v.method_options or {}).items():
        argv += ["-O", f"{v.method}:{k}={json.dumps(val) if not isinstance(val, str) else val}"]
    if v.structure:
        argv += ["--structure", v.structure]
    if v.min_degree is not None:
        argv += ["--min-degree", str(v.min_degree)]
    if spec.allocation_eps is not None and v.allocation != "uniform":
        argv += ["--allocation-eps", str(spec.allocation_eps)]
    ew = eval_windows if eval_windows is not None else (QUICK["eval_windows"] if quick else None)
    ns = nsamples if nsamples is not None else (QUICK["nsamples"] if quick else None)
    if ew:
        argv += ["--eval-windows", str(ew)]
    if ns:
        argv += ["--nsamples", str(ns)]
    if threads:
        argv += ["--threads", str(threads)]
    if eval_datasets:
        argv += ["--eval-datasets", eval_datasets]
    if dense:
        argv += ["--dense"]
    if quick or not kl:
        argv += ["--no-kl"]
    return argv


def run_paper(spec: PaperSpec, cfg: dict, out: Path, *, quick: bool, threads: Optional[int], only=None,
              eval_windows=None, nsamples=None, kl: bool = True, eval_datasets=None) -> list:
    """Run (or resume) every variant through sweep.py; returns the sweep argument lists used."""
    sweep = load_sweep()
    calls = []
    for i, v in enumerate(_variants(spec, quick, only)):
        argv = sweep_argv(spec, v, cfg, out, quick=quick, threads=threads, dense=(i == 0),
                          eval_windows=eval_windows, nsamples=nsamples, kl=kl, eval_datasets=eval_datasets)
        calls.append(argv)
        print(f"\n[{spec.name}] {v.label}: python benchmarks/models/sweep.py {shlex.join(argv)}", flush=True)
        sweep.main(argv)
    return calls


# ================================================================================================ tables
def _ppl_main(row: dict):
    ppl = row.get("perplexity") or {}
    if not ppl:
        return None, None
    name = "wikitext2" if "wikitext2" in ppl else next(iter(ppl))
    return name, ppl[name]


def build_result(spec: PaperSpec, cfg: dict, rows: list, *, quick: bool, jsonl: Path, command: str,
                 sweep_calls: Optional[list] = None) -> dict:
    """The result document: our cells (from ``rows`` only), the paper's numbers and the claims."""
    from optprune.llm_adapters.data import PROTOCOLS
    prot = PROTOCOLS[cfg["protocol"]]
    cells, shared = [], []
    for v in _variants(spec, quick, None):
        tag = _tag(spec, v, quick)
        for st in _settings(spec, v, quick):
            match = [r for r in rows if (r.get("config") or {}).get("tag") == tag
                     and r["config"].get("method") == v.method and _same_setting(r["config"], st)
                     and (r["config"].get("allocation") or "uniform") == v.allocation]
            r = match[-1] if match else None
            if r is not None and r.get("shared_from_tag"):
                shared.append(f"{v.label} @ {spec.setting_labels.get(st, st)} (from {r['shared_from_tag']})")
            cell = {"variant": v.id, "label": v.label, "method": v.method, "setting": st,
                    "setting_label": spec.setting_labels.get(st, st), "allocation": v.allocation,
                    "error_correction": v.error_correction, "method_options": v.method_options,
                    "structure": v.structure, "min_degree": v.min_degree, "tag": tag, "status": "missing",
                    "ppl": None, "ppl_text": None, "perplexity": None, "kl": None, "top1": None,
                    "sparsity_achieved": None, "mean_rel_error": None, "wall_s": None, "prune_s": None,
                    "peak_rss_mb": None, "error": None, "key": None}
            if r is not None:
                text, val = _ppl_main(r)
                cell.update(status="error" if r.get("error") else "done", ppl=val, ppl_text=text,
                            perplexity=r.get("perplexity"), kl=r.get("kl"), top1=r.get("top1"),
                            sparsity_achieved=r.get("sparsity_achieved"), mean_rel_error=r.get("mean_rel_error"),
                            wall_s=r.get("wall_s"), prune_s=(r.get("timings") or {}).get("prune_s"),
                            peak_rss_mb=r.get("peak_rss_mb"), error=r.get("error"), key=r.get("key"))
            cells.append(cell)
    dense = [r for r in rows if (r.get("config") or {}).get("method") == "dense"
             and str((r.get("config") or {}).get("tag", "")).startswith(spec.name + "/")
             and str(r["config"].get("tag", "")).endswith("+quick") == quick]
    dense_row = dense[-1] if dense else None
    dense_cell = None
    if dense_row is not None:
        text, val = _ppl_main(dense_row)
        dense_cell = {"ppl": val, "ppl_text": text, "perplexity": dense_row.get("perplexity"),
                      "key": dense_row.get("key"), "error": dense_row.get("error")}
    done = [r for r in rows if not r.get("error") and r.get("machine")]
    machine = done[-1].get("machine") if done else None
    versions = done[-1].get("versions") if done else None
    claims = [_claim(c, cells, spec) for c in spec.claims]
    protocol = {"name": prot.name, "model": cfg["model"], "calibration": prot.calibration,
                "nsamples": QUICK["nsamples"] if quick else prot.nsamples, "seqlen": prot.seqlen, "seed": prot.seed,
                "eval_datasets": list(prot.eval_datasets), "eval_seqlen": prot.eval_seqlen,
                "eval_windows": QUICK["eval_windows"] if quick else prot.eval_windows}
    if quick:
        protocol["name"] = prot.name + "+quick"
    notes = list(spec.notes)
    want = set(protocol["eval_datasets"])
    short = [c for c in cells if c["status"] == "done" and c["perplexity"] and not want <= set(c["perplexity"])]
    if short:
        got = sorted({", ".join(sorted(c["perplexity"])) for c in short})
        notes.append(f"{len(short)} of {sum(c['status'] == 'done' for c in cells)} rows were evaluated on "
                     f"{' / '.join(got)} only (not every text the protocol names; run with --eval-datasets to save "
                     f"GPU time); the tables' metric, {protocol['eval_datasets'][0]}, is complete for every row.")
    if shared:
        notes.append("Rows copied from another run of the identical configuration (another paper script's, or a "
                     "sweep file given to --import-rows; same method, setting, allocation, error correction and "
                     "options; only the tag differs): " + "; ".join(shared) + ".")
    return {
        "paper": {"name": spec.name, "title": spec.title, "seed": spec.seed, "arxiv": spec.arxiv},
        "scale": cfg["scale"], "model": cfg["model"], "model_label": cfg["model_label"], "quick": quick,
        "protocol": protocol, "settings": _settings(spec, None, quick),
        "setting_labels": spec.setting_labels, "jsonl": _rel(jsonl), "command": command,
        "sweep_commands": [load_sweep().portable(f"python benchmarks/models/sweep.py {shlex.join(a)}")
                           for a in (sweep_calls or [])],
        "dense": dense_cell, "rows": cells,
        "paper_numbers": [asdict(n) for n in spec.numbers], "sources": check_sources(spec.numbers),
        "claims": claims, "notes": notes, "allocation_eps": spec.allocation_eps,
        "machine": machine, "versions": versions, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def _cell(cells: list, variant: str, setting: str) -> Optional[dict]:
    for c in cells:
        if c["variant"] == variant and c["setting"] == setting:
            return c
    return None


def _claim(c: Claim, cells: list, spec: PaperSpec) -> dict:
    ca, cb = _cell(cells, *c.a), _cell(cells, *c.b)
    d = {"text": c.text, "a": list(c.a), "b": list(c.b), "paper_model": c.paper_model, "paper_line": c.paper_line,
         "paper_values": list(c.paper_values) if c.paper_values else None, "paper_text": c.paper_text,
         "paper_source": f"docs/methods.md {SECTION.get(spec.arxiv, '')}".strip() if c.paper_line
        else c.paper_source,
         "ours_only": c.ours_only,
         "paper_holds": None if c.ours_only else ((c.paper_values[0] < c.paper_values[1]) if c.paper_values else True),
         "paper_ratio": (c.paper_values[0] / c.paper_values[1]) if c.paper_values else None,
         "ours_values": None, "ours_ratio": None, "ours_holds": None, "ours_kl_values": None, "ours_kl_holds": None,
         "verdict": "not run", "why": ""}
    if ca is None or cb is None:
        d["verdict"] = "not in this run"
        d["why"] = "a row of this claim is not part of this run (--quick or --variants)"
        return d
    bad = [x for x in (ca, cb) if x["ppl"] is None]
    if bad:
        errs = [x["error"] for x in bad if x.get("error")]
        d["verdict"] = "not measurable" if errs else "not run"
        first = next((x for x in bad if x.get("error")), None)
        d["why"] = f"not runnable: {first['label']} @ {first['setting_label']}: {first['error'][:110]}" if first else ""
        return d
    if ca.get("kl") is not None and cb.get("kl") is not None:
        d["ours_kl_values"] = [ca["kl"], cb["kl"]]
        d["ours_kl_holds"] = bool(ca["kl"] < cb["kl"])
    a, b = ca["ppl"], cb["ppl"]
    d["ours_values"] = [a, b]
    d["ours_ratio"] = a / b if b else None
    d["ours_holds"] = bool(a < b)
    d["ours_tie"] = bool(a == b)
    if c.ours_only:
        d["verdict"] = "holds" if d["ours_holds"] else "does not hold"
    else:
        d["verdict"] = "agrees" if d["ours_holds"] == d["paper_holds"] else "DISAGREES"
    return d


# ================================================================================================ Markdown
def render_markdown(res: dict, level: int = 1, title: bool = True) -> str:
    """The side-by-side Markdown of one result document (also printed to the terminal)."""
    h = "#" * level
    p, prot = res["paper"], res["protocol"]
    out = []
    if title:
        out.append(f"{h} {p['title']} — reproduction at `--scale {res['scale']}`"
                   + (" (quick)" if res["quick"] else ""))
        out.append("")
    mach = res.get("machine") or {}
    ver = res.get("versions") or {}
    hw = _hardware(mach)
    out.append(f"arXiv {p['arxiv']}. **Ours: {res['model_label']}**, protocol `{prot['name']}`: "
               f"calibration {prot['calibration']} {prot['nsamples']}×{prot['seqlen']} seed {prot['seed']}; "
               f"evaluation {', '.join(prot['eval_datasets'])} seqlen {prot['eval_seqlen']}, "
               f"{'all' if not prot['eval_windows'] else 'first ' + str(prot['eval_windows'])} windows. "
               f"Hardware: {hw}; torch {ver.get('torch', '?')}, transformers {ver.get('transformers', '?')}, "
               f"optprune {ver.get('git_commit', ver.get('optprune', '?'))}.")
    out.append("")
    out.append(f"**The paper's numbers are on other models** ({_paper_models(res)}), with the paper's protocol; "
               f"ours are on {res['model_label']}. Absolute values are not comparable — compare the claims "
               f"(orderings, ratios) below.")
    out.append("")
    out.append(f"Reproduce: `{res['command']}` (rows: `{res['jsonl']}`).")
    out.append("")
    # ---- main table
    settings = res["settings"]
    labels = res["setting_labels"]
    pnum = {}
    for n in res["paper_numbers"]:
        pnum[(n["variant"], n["setting"])] = n
    paper_cols = {st for (_, st) in pnum} & set(settings)
    metric = _metric(res)
    hdr = ["method"]
    for st in settings:
        hdr.append(f"{labels.get(st, st)} ours")
        if st in paper_cols:
            models = sorted({n["model"] for (v, s), n in pnum.items() if s == st})
            hdr.append(f"{labels.get(st, st)} paper ({', '.join(models)})")
    out.append(f"Perplexity ({metric}; lower is better). Ours: {res['model_label']}. "
               f"Paper columns: the paper's model as named.")
    out.append("")
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))
    if res.get("dense") and res["dense"].get("ppl") is not None:
        row = ["dense"]
        for st in settings:
            row.append(fmt_num(res["dense"]["ppl"]))
            if st in paper_cols:
                row.append("")
        out.append("| " + " | ".join(row) + " |")
    seen = []
    for c in res["rows"]:
        if c["variant"] not in seen:
            seen.append(c["variant"])
    for vid in seen:
        vc = [c for c in res["rows"] if c["variant"] == vid]
        row = [vc[0]["label"]]
        for st in settings:
            c = next((x for x in vc if x["setting"] == st), None)
            row.append(_cell_text(c))
            if st in paper_cols:
                n = pnum.get((vid, st))
                row.append(fmt_num(n["value"]) if n else "")
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    if any(c.get("kl") is not None for c in res["rows"]):
        out.append("KL divergence to the dense model (nats/token, 8×512 held-out sequences sampled from the dense "
                   "model; lower is better) / top-1 agreement with it:")
        out.append("")
        hdr2 = ["method"] + [labels.get(st, st) for st in settings]
        out.append("| " + " | ".join(hdr2) + " |")
        out.append("|" + "---|" * len(hdr2))
        for vid in seen:
            vc = [c for c in res["rows"] if c["variant"] == vid]
            row = [vc[0]["label"]]
            for st in settings:
                c = next((x for x in vc if x["setting"] == st), None)
                row.append(f"{fmt_num(c['kl'], '.3f')} / {fmt_num(c['top1'], '.3f')}"
                           if c and c.get("kl") is not None else _cell_text(c))
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    off = []
    for c in res["rows"]:
        if c.get("structure") or c.get("sparsity_achieved") is None:
            continue
        target = parse_setting(c["setting"])["sparsity"]
        if abs(c["sparsity_achieved"] - target) > 0.005:
            off.append(f"{c['label']} @ {c['setting_label']}: {c['sparsity_achieved']:.2%} zeros (target {target:.0%})")
    if off:
        out.append("Achieved sparsity differs from the target (N:M keeps *at most* N; per-row rules round per row): "
                   + "; ".join(off) + ".")
        out.append("")
    errs = [c for c in res["rows"] if c.get("error")]
    if errs:
        out.append("† Runs that could not be done here:")
        for c in errs:
            out.append(f"- {c['label']} @ {c['setting_label']}: {c['error']}")
        out.append("")
    # ---- claims
    out.append(f"{h}# Claims: paper vs ours" if title else "Claims, paper vs ours:")
    out.append("")
    out.append("Verdicts compare perplexity, the papers' metric. The last column repeats the comparison with the "
               "KL divergence to the dense model on held-out self-generated text (nats/token), an in-domain quality "
               "measure" + (" — it matters here: stories260K is a TinyStories model, WikiText-2 is out of its domain "
                            "(dense 122 on the full test set), and pruning can even lower its WikiText-2 perplexity."
                            if res["model"] == "stories260k" else "."))
    out.append("")
    out.append("| claim | paper | ours (perplexity) | verdict | ours by KL to dense |")
    out.append("|---|---|---|---|---|")
    shown = [c for c in res["claims"] if c["verdict"] != "not in this run"]
    for c in shown:
        if c.get("ours_only"):
            pv = f"— (not a paper claim: {c['paper_text']})" if c["paper_text"] else "— (not a paper claim)"
        elif c["paper_values"]:
            pv = (f"yes ({fmt_num(c['paper_values'][0])} vs {fmt_num(c['paper_values'][1])}, ratio "
                  f"{c['paper_ratio']:.3f}; {c['paper_model']}, {c['paper_source']})")
        else:
            pv = f"yes — {c['paper_text'] or 'claimed'}" + (f" ({c['paper_source']})" if c["paper_source"] else "")
        if c["ours_values"]:
            ov = (f"{'yes' if c['ours_holds'] else ('no — a tie' if c.get('ours_tie') else 'no')} "
                  f"({fmt_num(c['ours_values'][0])} vs {fmt_num(c['ours_values'][1])}, ratio {c['ours_ratio']:.3f})")
        else:
            ov = c["why"] or "–"
        verdict = {"DISAGREES": "**DISAGREES**", "does not hold": "**does not hold**"}.get(c["verdict"], c["verdict"])
        kv = c.get("ours_kl_values")
        kl = (f"{'yes' if c['ours_kl_holds'] else 'no'} ({fmt_num(kv[0], '.3f')} vs {fmt_num(kv[1], '.3f')})"
              if kv else "–")
        out.append(f"| {c['text']} | {pv} | {ov} | {verdict} | {kl} |")
    out.append("")
    hidden = len(res["claims"]) - len(shown)
    paper_claims = [c for c in shown if not c.get("ours_only")]
    dis = [c for c in paper_claims if c["verdict"] == "DISAGREES"]
    agree = [c for c in paper_claims if c["verdict"] == "agrees"]
    unmeasured = [c for c in paper_claims if c["verdict"] not in ("agrees", "DISAGREES")]
    summary = (f"Of {len(paper_claims)} paper claims in this run: {len(agree)} agree, {len(dis)} disagree"
               + (f", {len(unmeasured)} not measurable here" if unmeasured else "") + ".")
    if hidden:
        summary += f" ({hidden} further claims need rows outside this run.)"
    out.append(summary)
    if dis:
        out.append("")
        out.append("**Where our numbers disagree with the paper:** "
                   + "; ".join(f"{c['text']}: ours "
                               + (f"{fmt_num(c['ours_values'][0])} vs {fmt_num(c['ours_values'][1])}"
                                  if c.get("ours_values") else (c.get("why") or "see below"))
                               + (f" (paper {fmt_num(c['paper_values'][0])} vs {fmt_num(c['paper_values'][1])})"
                                  if c["paper_values"] else "")
                               + (f"; by KL to dense the claim {'holds' if c['ours_kl_holds'] else 'fails too'}"
                                  if c.get("ours_kl_values") else "")
                               for c in dis) + ".")
    out.append("")
    for sec in res.get("sections", []):
        out.append(f"{h}# {sec['title']}" if title else f"{sec['title']}:")
        out.append("")
        out.extend(sec["lines"])
        out.append("")
    if res.get("notes"):
        out.append(f"{h}# Notes" if title else "Notes:")
        out.append("")
        for n in res["notes"]:
            out.append(f"- {n}")
        out.append("")
    bad = [s for s in res.get("sources", []) if s["ok"] is False]
    if bad:
        out.append("Source check: " + "; ".join(f"{s['variant']}@{s['setting']} {s['why']}" for s in bad))
        out.append("")
    return "\n".join(out)


def _metric(res: dict) -> str:
    prot = res["protocol"]
    w = "all windows" if not prot["eval_windows"] else f"first {prot['eval_windows']} windows"
    return f"WikiText-2 test, seqlen {prot['eval_seqlen']}, {w}"


def _paper_models(res: dict) -> str:
    ms = sorted({n["model"] for n in res["paper_numbers"]} | {c["paper_model"] for c in res["claims"]
                                                              if c.get("paper_model")})
    return ", ".join(ms) if ms else "the paper's models; no perplexity is quoted in docs/methods.md"


def _hardware(m: dict) -> str:
    if not m:
        return "unknown (no completed run)"
    dev = m.get("device", "?")
    if m.get("cuda"):
        return f"{m['cuda']} ({dev})"
    return (f"{dev}, {m.get('cpu_count', '?')} CPU cores ({m.get('processor') or m.get('machine', '')}), "
            f"{m.get('torch_threads', '?')} torch thread(s), {m.get('memory_gb', '?')} GB RAM")


def _cell_text(c: Optional[dict]) -> str:
    if c is None:
        return ""
    if c["ppl"] is not None:
        return fmt_num(c["ppl"])
    if c.get("error"):
        return "n/a†"
    return "not run"


# ================================================================================================ CLI
def _expected_config(v: Variant, cfg: dict, setting: str) -> dict:
    """The sweep config of a variant's cell without its tag (what sweep.py would run for it)."""
    return {"model": cfg["model"], "protocol": cfg["protocol"], "method": v.method, **parse_setting(setting),
            "allocation": v.allocation, "error_correction": bool(v.error_correction), "mode": "sequential",
            "calibration": None, "refit": False, "structure": v.structure, "min_degree": v.min_degree,
            "method_options": v.method_options or None}


def import_rows(spec: PaperSpec, cfg: dict, jsonl: Path, sources: list, *, quick: bool) -> int:
    """Copy rows of identical configurations from other sweep files into ``jsonl`` for cells (and the dense row)
    that have none, re-tagged for this script and marked ``shared_from_tag`` with the source file, so the tables
    say which rows were copied. Only error-free rows whose whole configuration matches are taken; the source
    files must have been run with the protocol's own window and sample counts (a row's key does not hold them).
    Returns the number of rows copied."""
    sweep = load_sweep()
    have = read_rows(jsonl)
    src_rows = []
    for f in sources:
        src_rows += [(Path(f), r) for r in read_rows(Path(f)) if not r.get("error")]

    from optprune.llm_adapters.data import PROTOCOLS
    default_cal = PROTOCOLS[cfg["protocol"]].calibration

    def norm(c: dict) -> str:  # sweep's own row key without the tag; calibration None = the protocol's source
        c = {"allocation": "uniform", "mode": "sequential", "refit": False, **c, "tag": None}
        c["calibration"] = c.get("calibration") or default_cal
        return sweep.row_key(c)

    def same(c: dict, want: dict) -> bool:
        return norm(c) == norm(want)

    def copy(f: Path, r: dict, tag: str) -> dict:
        c = dict(r["config"], tag=tag)
        out = {**r, "key": sweep.row_key(c), "config": c, "shared_from_tag": _rel(f)}
        if r.get("record"):  # the run record's path is relative to the source file's folder
            out["record"] = os.path.relpath(f.parent / r["record"], jsonl.parent)
        return out

    new = []
    variants = _variants(spec, quick, None)
    if variants and not any((r.get("config") or {}).get("method") == "dense" for r in have):
        want = {"model": cfg["model"], "protocol": cfg["protocol"], "method": "dense"}
        hit = [(f, r) for f, r in src_rows if same(r.get("config") or {}, want)]
        if hit:
            new.append(copy(*hit[-1], _tag(spec, variants[0], quick)))
    for v in variants:
        tag = _tag(spec, v, quick)
        for st in _settings(spec, v, quick):
            want = _expected_config(v, cfg, st)
            if any((r.get("config") or {}).get("tag") == tag and same(r["config"], want) for r in have):
                continue
            hit = [(f, r) for f, r in src_rows if same(r.get("config") or {}, want)]
            if hit:
                new.append(copy(*hit[-1], tag))
    if new:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        with jsonl.open("a") as fh:
            for r in new:
                fh.write(json.dumps(r, default=str) + "\n")
    return len(new)


def build_parser(spec: PaperSpec) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=f"{spec.title} ({spec.seed}): the paper's headline comparisons at "
                                             f"our scales, side by side with its reported numbers.")
    ap.add_argument("--scale", default="stories", choices=list(SCALES))
    ap.add_argument("--quick", action="store_true",
                    help="fewer rows (marked quick), first setting only, 8 calibration samples, 4 eval windows")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSONL/JSON/Markdown go")
    ap.add_argument("--model", default=None, help="override the scale's model (e.g. a larger model on a GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared 2-core machine)")
    ap.add_argument("--variants", default=None, help="comma list of variant ids to run (default all)")
    ap.add_argument("--eval-windows", type=int, default=None, help="override the protocol's window count")
    ap.add_argument("--nsamples", type=int, default=None, help="override the protocol's calibration samples")
    ap.add_argument("--no-kl", dest="kl", action="store_false",
                    help="skip the data-free KL to the dense model (rows get kl = null; quicker on SmolLM2)")
    ap.add_argument("--eval-datasets", default=None,
                    help="comma list overriding the protocol's evaluation texts for the runs made now (rows keep "
                         "the same key: each row's perplexities say which texts it was evaluated on)")
    ap.add_argument("--no-run", action="store_true", help="only rebuild the tables from the JSONL rows")
    ap.add_argument("--no-extra", action="store_true", help="skip the paper's extra section (e.g. speed)")
    ap.add_argument("--import-rows", action="append", default=[], metavar="JSONL",
                    help="copy rows of identical configurations from another sweep file (e.g. "
                         "benchmarks/results/cpu_smollm2.jsonl) into the missing cells; the tables name them")
    return ap


def main(spec: PaperSpec, argv=None) -> dict:
    args = build_parser(spec).parse_args(argv)
    cfg = scale_config(args.scale, args.model)
    if not args.no_run:  # rebuilding tables from stored rows needs no GPU
        require_cuda(cfg)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{spec.name}_{args.scale}" + ("_quick" if args.quick else "")
    # sweep.py's row key does not hold the window/sample counts: runs with other counts get their own files
    stem += (f"_ew{args.eval_windows}" if args.eval_windows else "") + (f"_ns{args.nsamples}" if args.nsamples else "")
    jsonl = out_dir / f"{stem}.jsonl"
    only = args.variants.split(",") if args.variants else None
    cmd = f"python paper_repro/{spec.name}.py --scale {args.scale}" + (" --quick" if args.quick else "") + \
        (f" --model {args.model}" if args.model else "") + \
        (f" --eval-windows {args.eval_windows}" if args.eval_windows else "") + \
        (f" --nsamples {args.nsamples}" if args.nsamples else "")
    calls = []
    t0 = time.time()
    if args.import_rows:
        n = import_rows(spec, cfg, jsonl, args.import_rows, quick=args.quick)
        print(f"imported {n} row(s) from {', '.join(args.import_rows)} into {jsonl}")
    if not args.no_run:
        calls = run_paper(spec, cfg, jsonl, quick=args.quick, threads=args.threads, only=only,
                          eval_windows=args.eval_windows, nsamples=args.nsamples, kl=args.kl,
                          eval_datasets=args.eval_datasets)
    else:
        calls = [sweep_argv(spec, v, cfg, jsonl, quick=args.quick, threads=args.threads, dense=(i == 0),
                            eval_windows=args.eval_windows, nsamples=args.nsamples, kl=args.kl)
                 for i, v in enumerate(_variants(spec, args.quick, only))]
    rows = read_rows(jsonl)
    res = build_result(spec, cfg, rows, quick=args.quick, jsonl=jsonl, command=cmd, sweep_calls=calls)
    if args.eval_windows or args.nsamples:
        res["protocol"]["name"] += "+custom"
        if args.eval_windows:
            res["protocol"]["eval_windows"] = args.eval_windows
        if args.nsamples:
            res["protocol"]["nsamples"] = args.nsamples
    res["sections"] = []
    if spec.extra is not None and not args.no_extra:
        spec.extra(args, cfg, res, out_dir, stem)
    res["wall_s"] = time.time() - t0
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    md = render_markdown(res)
    (out_dir / f"{stem}.md").write_text(md + "\n")
    print("\n" + md)
    print(f"wrote {out_dir / (stem + '.json')} and .md ({len(rows)} JSONL rows in {jsonl})")
    return res
