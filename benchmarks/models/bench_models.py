"""Whole-model benchmark: pruning wall time and peak memory per method, and the pruned models'
inference latency / throughput against the dense model on the same machine.

Every run is a fresh worker process (so that its peak memory is its own): it prunes the model through the public
run function (``optprune.llm_adapters.run.prune(..., evaluate=False, kl=False, return_model=True)``, the protocol's calibration), records
the pipeline's prune time, the whole call's time and the process's peak RSS (``ru_maxrss``; peak CUDA memory on a
GPU), then times the pruned model against a freshly loaded dense model, alternating dense/pruned (ABAB…) and
taking medians:

* prefill: one forward of ``--prefill`` tokens per sequence at each batch size (latency, tokens/s);
* decode: ``--decode`` greedy steps with the KV cache after a 16-token prompt (ms per step, tokens/s).

What the speed numbers mean per kind of sparsity:

* **structured** (spap, flap, group_obs, group_magnitude): surgery really shrinks the MLP (and heads) — a
  smaller dense model, so the speed-up is real on any hardware;
* **unstructured** (magnitude, wanda, sparsegpt, fista, ria at 50%): the zeros are stored in dense matrices;
  no sparse kernel is used, so the expected speed-up is 1.0 (measured, as a control);
* **2:4** (sparsegpt/eggs 2:4): on a CUDA GPU (compute capability ≥ 8.0) the pruned model is saved and timed
  with torch's semi-structured kernels by ``benchmarks/semistructured/bench_semistructured.py``; on a CPU there is no 2:4
  kernel in torch — the script says so and the CPU latency is that of the dense-with-zeros model.

Rows go to a resumable JSONL file (a run whose key is there is skipped), then JSON + Markdown summaries.

    python benchmarks/models/bench_models.py                                   # stories260K, smoke protocol
    python benchmarks/models/bench_models.py --model smollm2-135m              # SmolLM2-135M, cpu protocol
    python benchmarks/models/bench_models.py --runs dense,spap:0.3 --repeats 9 # a subset
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_RUNS = ("dense,magnitude:0.5,wanda:0.5,ria:0.5,sparsegpt:0.5,fista:0.5,sparsegpt:2:4,eggs:2:4,"
                "group_magnitude:0.3,flap:0.3,group_obs:0.3,spap:0.2,spap:0.3,spap:0.5")


def parse_run(item: str) -> dict:
    """``method`` or ``method:setting`` (``sparsegpt:0.5``, ``eggs:2:4``)."""
    item = item.strip()
    if ":" not in item:
        return {"method": item, "setting": None}
    meth, st = item.split(":", 1)
    return {"method": meth, "setting": st}


def _setting(st: str) -> dict:
    if st is None:
        return {"pattern": None, "sparsity": None}
    if ":" in st:
        n, m = st.split(":")
        return {"pattern": st, "sparsity": 1 - int(n) / int(m)}
    return {"pattern": "unstructured", "sparsity": float(st)}


def run_key(d: dict) -> str:
    keys = ("model", "protocol", "method", "setting", "structure", "nsamples", "batches", "prefill", "decode",
            "device", "threads", "tag")
    return json.dumps({k: d.get(k) for k in keys}, sort_keys=True, default=str)


# ================================================================================================ worker
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(dev):
    import torch
    if str(dev).startswith("cuda"):
        torch.cuda.synchronize()


def _prefill(model, ids, dev):
    import torch
    with torch.no_grad():
        _sync(dev)
        t = time.perf_counter()
        model(ids, use_cache=False)
        _sync(dev)
        return time.perf_counter() - t


def _decode(model, prompt, steps, dev):
    import torch
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        _sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
        _sync(dev)
        return (time.perf_counter() - t) / steps


def _params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def latency(dense, pruned, *, batches, prefill, decode, repeats, dev, seed=0) -> list:
    """Medians of ABAB-alternated timings: prefill and decode, per batch size."""
    import torch
    g = torch.Generator().manual_seed(seed)
    vocab = dense.config.vocab_size
    rows = []
    for b in batches:
        ids = torch.randint(0, vocab, (b, prefill), generator=g).to(dev)
        prompt = torch.randint(0, vocab, (b, 16), generator=g).to(dev)
        for phase in ("prefill", "decode"):
            fn = (lambda m: _prefill(m, ids, dev)) if phase == "prefill" else (lambda m: _decode(m, prompt, decode, dev))
            fn(dense), fn(pruned)  # warm-up
            td, tp = [], []
            for _ in range(repeats):
                td.append(fn(dense))
                tp.append(fn(pruned))
            md, mp = statistics.median(td), statistics.median(tp)
            ntok = b * (prefill if phase == "prefill" else 1)
            rows.append({"phase": phase, "batch": b, "tokens": ntok, "dense_ms": md * 1e3, "pruned_ms": mp * 1e3,
                         "speedup": md / mp, "dense_tok_s": ntok / md, "pruned_tok_s": ntok / mp,
                         "dense_ms_all": [t * 1e3 for t in td], "pruned_ms_all": [t * 1e3 for t in tp]})
    return rows


def worker(job: dict) -> dict:
    import torch
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    t_start = time.perf_counter()
    from optprune.llm_adapters.run import prune as run_prune  # returns (model, tokenizer, record) with return_model
    from optprune.llm_adapters.loading import load_model
    from optprune.solvers import get_method
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"device": dev}
    st = _setting(job["setting"])
    if job["method"] == "dense":
        from optprune.llm_adapters import data as D
        from optprune.llm_adapters.run import resolve_settings
        t0 = time.perf_counter()
        model, tok, meta = load_model(job["model"])
        out["load_s"] = time.perf_counter() - t0
        s = resolve_settings(job["model"], protocol=job["protocol"], nsamples=job.get("nsamples"), need_eval=False)
        if s["calibration"] != "self":
            D.calibration_tokens(tok, s["calibration"], nsamples=s["nsamples"], seqlen=min(s["seqlen"],
                                 getattr(model.config, "max_position_embeddings", s["seqlen"])), seed=s["seed"])
        out.update(peak_rss_mb=_rss_mb(), params=_params(model), what="load + calibration tokens only",
                   n_params_dense=_params(model))
        out["wall_s"] = time.perf_counter() - t_start
        return out
    spec = get_method(job["method"])
    kw = dict(model=job["model"], method=job["method"], sparsity=st["sparsity"], protocol=job["protocol"],
              evaluate=False, kl=False, return_model=True, progress=False)
    if spec.structured:
        kw["structure"] = job.get("structure") or "mlp"
    else:
        kw["pattern"] = st["pattern"]
    if job.get("nsamples"):
        kw["nsamples"] = int(job["nsamples"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    pruned, tok, rec = run_prune(**kw)
    out.update(peak_rss_mb=_rss_mb(), peak_cuda_mb=rec.get("peak_cuda_mb"),
               prune_s=(rec.get("timings") or {}).get("prune_s"), prune_call_s=(rec.get("timings") or {}).get("total_s"),
               load_s=(rec.get("timings") or {}).get("load_s"), calibration_s=(rec.get("timings") or {}).get("calibration_s"),
               sparsity_prunable=(rec.get("summary") or {}).get("sparsity"),
               mean_rel_error=(rec.get("summary") or {}).get("mean_rel_error"),
               protocol_record=rec.get("protocol"), machine=rec.get("machine"), versions=rec.get("versions"),
               structured=bool(spec.structured))
    pruned.eval()
    dense, _, _ = load_model(job["model"])
    dense.eval()
    out["n_params_dense"] = _params(dense)
    out["n_params_pruned"] = _params(pruned)
    kind = "structured" if spec.structured else ("2:4" if st["pattern"] and ":" in st["pattern"] else "unstructured")
    out["kind"] = kind
    if kind == "2:4":
        out["semistructured"] = _semistructured(pruned, tok, job)
    pruned.to(dev)
    dense.to(dev)
    out["latency"] = latency(dense, pruned, batches=job["batches"], prefill=job["prefill"], decode=job["decode"],
                             repeats=job["repeats"], dev=dev)
    out["kernel_note"] = {"structured": "smaller dense matrices (surgery): real shrinking",
                          "unstructured": "zeros stored in dense matrices; no sparse kernel (control: expect 1.0×)",
                          "2:4": out.get("semistructured", {}).get("note", "")}[kind]
    out["wall_s"] = time.perf_counter() - t_start
    return out


def _semistructured(pruned, tok, job) -> dict:
    """2:4 kernels: only on CUDA (bench_semistructured.py); on a CPU say that none exists."""
    sys.path.insert(0, str(REPO / "benchmarks" / "semistructured"))
    try:
        import bench_semistructured as bs
    except ImportError as e:
        return {"note": f"benchmarks/semistructured/bench_semistructured.py not importable: {e}"}
    why = bs.no_kernel_reason()
    if why:
        print(f"[bench_models] {why}", flush=True)
        return {"note": "no 2:4 kernel here — latency below is the dense-with-zeros model. " + why}
    with tempfile.TemporaryDirectory() as d:
        pruned.to("cpu").save_pretrained(d)
        tok.save_pretrained(d)
        jf = os.path.join(d, "ss.json")
        bs.main(["--model", d, "--no-layers", "--json", jf, "--batch", str(max(job["batches"])),
                 "--seqlen", str(job["prefill"])])
        rows = json.loads(Path(jf).read_text()) if os.path.exists(jf) else []
    r = rows[-1] if rows else {}
    return {"note": f"2:4 semi-structured kernels (bench_semistructured.py, fp16): speed-up {r.get('speedup')}",
            **{k: v for k, v in r.items() if k != "skipped"}}


# ================================================================================================ driver
def run_worker(job: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = dict(os.environ)
    if job.get("threads"):
        env.setdefault("OMP_NUM_THREADS", str(job["threads"]))
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exit {p.returncode}: " + " | ".join(tail), "wall_s": time.time() - t0}


def default_protocol(model: str) -> str:
    return {"stories260k": "smoke", "smollm2-135m": "cpu"}.get(model.lower(), "cpu")


def summarise(rows: list, meta: dict) -> dict:
    dense = next((r for r in rows if r["config"]["method"] == "dense" and not r.get("error")), None)
    base = dense["peak_rss_mb"] if dense else None
    table = []
    for r in rows:
        c = r["config"]
        e = {"method": c["method"], "setting": c["setting"], "error": r.get("error"), "kind": r.get("kind"),
             "prune_s": r.get("prune_s"), "prune_call_s": r.get("prune_call_s"), "peak_rss_mb": r.get("peak_rss_mb"),
             "peak_rss_over_dense_mb": (r["peak_rss_mb"] - base) if (base and r.get("peak_rss_mb")) else None,
             "peak_cuda_mb": r.get("peak_cuda_mb"), "n_params_dense": r.get("n_params_dense"),
             "n_params_pruned": r.get("n_params_pruned"), "sparsity_prunable": r.get("sparsity_prunable"),
             "kernel_note": r.get("kernel_note"), "semistructured": r.get("semistructured")}
        for lr in r.get("latency") or []:
            e[f"{lr['phase']}_b{lr['batch']}_speedup"] = lr["speedup"]
            e[f"{lr['phase']}_b{lr['batch']}_dense_ms"] = lr["dense_ms"]
            e[f"{lr['phase']}_b{lr['batch']}_pruned_ms"] = lr["pruned_ms"]
            e[f"{lr['phase']}_b{lr['batch']}_pruned_tok_s"] = lr["pruned_tok_s"]
            e[f"{lr['phase']}_b{lr['batch']}_dense_tok_s"] = lr["dense_tok_s"]
            pairs = list(zip(lr.get("dense_ms_all") or [], lr.get("pruned_ms_all") or []))
            # sign test over the alternated pairs: k of n pairs where the pruned model was faster
            e[f"{lr['phase']}_b{lr['batch']}_pairs"] = [sum(p < d for d, p in pairs), len(pairs)]
        table.append(e)
    done = [r for r in rows if r.get("machine")]
    return {"meta": meta, "machine": done[-1]["machine"] if done else None,
            "versions": done[-1]["versions"] if done else None,
            "protocol": done[-1].get("protocol_record") if done else None, "table": table, "rows": rows}


def render_markdown(doc: dict, level: int = 2) -> str:
    h = "#" * level
    m, meta = doc.get("machine") or {}, doc["meta"]
    batches = meta["batches"]
    out = [f"{h} Whole-model pruning cost and inference speed — {meta['model']}", ""]
    hw = (m.get("cuda") or f"{m.get('device', '?')}, {m.get('cpu_count', '?')} cores, "
          f"{meta.get('threads') or 'default'} torch thread(s)") if m else "unknown"
    prot = doc.get("protocol") or {}
    out.append(f"Protocol `{prot.get('name', meta['protocol'])}` calibration ({prot.get('calibration', '?')} "
               f"{prot.get('nsamples', '?')}×{prot.get('seqlen', '?')}); hardware: {hw}. Each run is a fresh "
               f"process; peak RSS is that process's (model, calibration, pruning); the 'dense' row loads the model "
               f"and its calibration tokens only. Speed-up = dense time / pruned time (median of "
               f"{meta['repeats']} alternated runs; prefill {meta['prefill']} tokens/sequence, decode "
               f"{meta['decode']} steps; in brackets: in how many of the alternated pairs the pruned model was "
               f"faster — n/n or 0/n is a sign-test result, anything between is within this machine's noise). "
               f"Command: `{meta['command']}`.")
    out.append("")
    hdr = ["method", "setting", "kind", "prune s", "peak RSS MB", "Δ vs dense MB", "params"]
    for b in batches:
        hdr += [f"prefill b={b} speed-up", f"decode b={b} speed-up"]
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))
    for e in doc["table"]:
        if e.get("error"):
            out.append(f"| {e['method']} | {e['setting'] or ''} | error: {e['error'][:120]} |" + " |" * (len(hdr) - 3))
            continue
        row = [e["method"], e["setting"] or "", e.get("kind") or "", _f(e.get("prune_s"), ".2f"),
               _f(e.get("peak_rss_mb"), ".0f"), _f(e.get("peak_rss_over_dense_mb"), "+.0f"),
               (f"{e['n_params_pruned'] / 1e6:.3f}M" if e.get("n_params_pruned") else
                (f"{e['n_params_dense'] / 1e6:.3f}M" if e.get("n_params_dense") else ""))]
        for b in batches:
            for ph in ("prefill", "decode"):
                k = e.get(f"{ph}_b{b}_pairs")
                row.append(_f(e.get(f"{ph}_b{b}_speedup"), ".3f", suffix="×") + (f" ({k[0]}/{k[1]})" if k else ""))
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    dense = next((e for e in doc["table"] if e["method"] != "dense" and e.get(f"prefill_b{batches[0]}_dense_ms")), None)
    if dense:
        out.append("Dense reference latency (from the first pruned run's alternation): " + ", ".join(
            f"prefill b={b} {dense.get(f'prefill_b{b}_dense_ms'):.1f} ms ({dense.get(f'prefill_b{b}_dense_tok_s'):.0f} "
            f"tok/s), decode b={b} {dense.get(f'decode_b{b}_dense_ms'):.2f} ms/step" for b in batches
            if dense.get(f"prefill_b{b}_dense_ms") is not None) + ".")
        out.append("")
    notes = sorted({e["kernel_note"] for e in doc["table"] if e.get("kernel_note")})
    for n in notes:
        out.append(f"- {n}")
    out.append("")
    return "\n".join(out)


def _f(v, spec, suffix=""):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec) + suffix


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--protocol", default=None, help="default: smoke for stories260k, cpu otherwise")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="comma list of method[:setting]; 'dense' = load only")
    ap.add_argument("--structure", default="mlp", help="structured methods: mlp, heads (query heads), heads:kv (whole key/value groups under GQA), or a comma list such as mlp,heads")
    ap.add_argument("--nsamples", type=int, default=None, help="override the protocol's calibration samples")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None, help="JSONL (default benchmarks/results/bench_models_<model>.jsonl); "
                                                ".json and .md are written next to it")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker(json.loads(args.worker))
        print("RESULT " + json.dumps(res, default=str), flush=True)
        return 0
    import torch
    protocol = args.protocol or default_protocol(args.model)
    out = Path(args.out) if args.out else RESULTS / f"bench_models_{Path(args.model).name.lower()}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    jobs = []
    for item in args.runs.split(","):
        if not item.strip():
            continue
        pr = parse_run(item)
        jobs.append({"model": args.model, "protocol": protocol, **pr, "structure": args.structure,
                     "nsamples": args.nsamples, "batches": batches, "prefill": args.prefill, "decode": args.decode,
                     "repeats": args.repeats, "threads": args.threads, "device": dev, "tag": args.tag})
    if not torch.cuda.is_available() and any(j["setting"] and ":" in j["setting"] for j in jobs):
        print("[bench_models] 2:4 runs: torch has no 2:4 (semi-structured) sparse kernel on a CPU; their latency is "
              "that of the dense-with-zeros model (run on a CUDA GPU for the 2:4 kernels).", flush=True)
    rows = []
    for j in jobs:
        key = run_key(j)
        if key in done:
            rows.append(done[key])
            continue
        print(f"[bench_models] {j['method']} {j['setting'] or ''} ...", flush=True)
        t0 = time.time()
        try:
            r = run_worker(j, args.timeout)
        except subprocess.TimeoutExpired:
            r = {"error": f"worker timed out after {args.timeout:.0f} s"}
        row = {"key": key, "config": j, "wall_s_total": time.time() - t0, **r}
        with out.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        rows.append(row)
        lat = {f"{x['phase']} b={x['batch']}": round(x["speedup"], 3) for x in row.get("latency") or []}
        print(f"[bench_models]   prune {row.get('prune_s')} s, peak RSS {row.get('peak_rss_mb')} MB, speed-up {lat}"
              + (f" ERROR {row['error']}" if row.get("error") else ""), flush=True)
    cmd = "python benchmarks/models/bench_models.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None:
        cmd = "python benchmarks/models/bench_models.py " + " ".join(sys.argv[1:])
    meta = {"model": args.model, "protocol": protocol, "batches": batches, "prefill": args.prefill,
            "decode": args.decode, "repeats": args.repeats, "threads": args.threads, "device": dev,
            "command": cmd.strip(), "jsonl": str(out)}
    doc = summarise(rows, meta)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
    md = render_markdown(doc)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
