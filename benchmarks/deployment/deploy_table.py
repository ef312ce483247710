"""The deployment table of docs/deployment.md: each output format × which tools load it × size on disk × speed.

For the dense source model and every optprune output given (``--run LABEL=DIR``, any ``--save-format``), and for
GGUF files this script writes from the dense-format outputs (``--gguf f16,q8_0``):

* **loads with** — tried here, each a real load followed by a forward pass: stock transformers
  (``from_pretrained(DIR)``, or ``from_pretrained(DIR, gguf_file=…)`` for a GGUF output), optprune's loader
  (``load_model``: shrunk per-block models, GGUF folders), and llama.cpp through ``llama-cpp-python`` when that
  package is importable; the logits of each load are compared with those of optprune's load (max |Δ|);
* **size** — bytes on disk of the output folder (model files only: ``run.json``/``LOADING.md`` excluded);
* **speed vs dense** — stock transformers on the CPU: prefill of ``--prefill`` tokens and greedy decoding of
  ``--decode`` tokens, medians of ``--repeats`` ABAB-alternated timings against the dense source model in the
  same process (``benchmarks/models/bench_models.py``'s timers); with llama-cpp-python, prefill/decode tokens/s
  against the dense source's own GGUF at the same type.

    python benchmarks/deployment/deploy_table.py --model smollm2-135m \\
        --run "wanda 2:4=out/wanda24" --run "wanda 2:4 → gguf=out/wanda24-gguf" --gguf f16,q8_0 \\
        --json benchmarks/results/deploy_smollm2.json --md benchmarks/results/deploy_smollm2.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "models"))

NOT_MODEL = ("run.json", "LOADING.md")


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name not in NOT_MODEL)


def _gguf_file(path: Path):
    files = sorted(Path(path).glob("*.gguf"))
    return files[0] if len(files) == 1 else None


def _stock_load(path: Path):
    """Stock transformers, as a user would call it; raises what transformers raises."""
    import torch
    from transformers import AutoModelForCausalLM
    g = _gguf_file(path)
    if g is not None:
        return AutoModelForCausalLM.from_pretrained(str(path), gguf_file=g.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _logits(model, ids):
    import torch
    with torch.no_grad():
        return model(ids).logits.float()


def _llama_cpp():
    try:
        import llama_cpp
        return llama_cpp
    except ImportError as e:
        return str(e)


def _llama_speed(gguf_path: Path, prompt: list, decode: int, repeats: int, threads: int) -> dict:
    """llama.cpp through llama-cpp-python: prefill and decode tokens/s (medians)."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=len(prompt) + decode + 8, n_threads=threads,
                          n_batch=len(prompt), logits_all=False, verbose=False)
    pre, dec = [], []
    for _ in range(repeats + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pre.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(decode):
            tok = int(llm.sample(temp=0.0)) if hasattr(llm, "sample") else 0
            llm.eval([tok])
        dec.append((time.perf_counter() - t) / decode)
    pre, dec = pre[1:], dec[1:]
    return {"prefill_tok_s": len(prompt) / statistics.median(pre), "decode_tok_s": 1 / statistics.median(dec)}


def measure(label: str, path: Path, dense, ids, prompt, args, rows: list, dense_gguf: dict) -> None:
    import torch
    from bench_models import _decode, _prefill
    from optprune.llm_adapters.loading import load_model
    row = {"output": label, "path": Path(path).name, "bytes": model_bytes(path)}  # no machine paths
    rec = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}
    saved = rec.get("saved") or {}
    row["format"] = saved.get("save_format") or ("gguf" if _gguf_file(path) else "dense")
    ppl = (rec.get("perplexity") or {}).get("wikitext2")
    row["wikitext2"] = ppl.get("ppl") if isinstance(ppl, dict) else ppl
    row["protocol"] = (rec.get("protocol") or {}).get("name") if isinstance(rec.get("protocol"), dict) \
        else rec.get("protocol")
    g = _gguf_file(path)
    shrunk = ("safetensors, smaller config" if saved.get("stock_loadable") else
              "safetensors, per-block widths" if not saved.get("uniform") else "safetensors, widths the config refuses")
    row["detail"] = saved.get("gguf_type") or (g.name.split(".")[-2].lower() if g is not None else "") or \
        {"hf": "safetensors", "optprune-shrunk": shrunk}.get(saved.get("format"), "safetensors")
    ours = stock = None
    try:
        ours, _, meta = load_model(str(path), dtype=torch.float32)
        ours.eval()
        row["optprune_load"] = meta.get("format")
    except Exception as e:  # noqa: BLE001  (what a user gets is the finding)
        row["optprune_load"] = f"no: {type(e).__name__}: {str(e).splitlines()[-1][:120]}"
    try:
        stock = _stock_load(path)
        row["transformers"] = "yes"
        if ours is not None:
            row["transformers"] += f" (max Δlogit {(_logits(stock, ids) - _logits(ours, ids)).abs().max():.1e} " \
                                   f"to optprune's load)"
    except Exception as e:  # noqa: BLE001
        row["transformers"] = f"no: {type(e).__name__}: {str(e).splitlines()[-1][:120]}"
    model = stock if stock is not None else ours
    lc = _llama_cpp()
    if g is not None:
        if isinstance(lc, str):
            row["llama_cpp"] = f"not measured (llama-cpp-python not importable: {lc[:80]})"
        else:
            try:
                sp = _llama_speed(g, prompt[0].tolist(), args.decode, args.repeats, args.threads)
                base = dense_gguf.get(row["detail"])
                row["llama_cpp"] = "yes"
                row.update({f"llama_{k}": v for k, v in sp.items()})
                if base:
                    row["llama_prefill_speedup"] = sp["prefill_tok_s"] / base["prefill_tok_s"]
                    row["llama_decode_speedup"] = sp["decode_tok_s"] / base["decode_tok_s"]
            except Exception as e:  # noqa: BLE001
                row["llama_cpp"] = f"no: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if model is None:  # nothing in Python loads it: no transformers speed
        rows.append(row)
        print(json.dumps(row), flush=True)
        return
    # transformers CPU speed against the dense model, ABAB-alternated in this process
    pre_d, pre_p, dec_d, dec_p = [], [], [], []
    for fn, a, b in ((lambda m: _prefill(m, ids, "cpu"), pre_d, pre_p),
                     (lambda m: _decode(m, prompt, args.decode, "cpu"), dec_d, dec_p)):
        fn(dense), fn(model)
        for _ in range(args.repeats):
            a.append(fn(dense))
            b.append(fn(model))
    row["prefill_speedup"] = statistics.median(pre_d) / statistics.median(pre_p)
    row["decode_speedup"] = statistics.median(dec_d) / statistics.median(dec_p)
    row["dense_prefill_ms"] = statistics.median(pre_d) * 1e3
    row["prefill_ms"] = statistics.median(pre_p) * 1e3
    row["dense_decode_ms"] = statistics.median(dec_d) * 1e3
    row["decode_ms"] = statistics.median(dec_p) * 1e3
    rows.append(row)
    print(json.dumps(row), flush=True)


def render(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"Measured by `benchmarks/deployment/deploy_table.py` on {m['model']} ({m['machine']}; torch "
             f"{m['torch']}, transformers {m['transformers']}, gguf {m['gguf']}, llama-cpp-python "
             f"{m['llama_cpp']}); speed: {m['threads']} thread{'s' * (m['threads'] != 1)}, prefill {m['prefill']} tokens, decode "
             f"{m['decode']} tokens, medians of {m['repeats']} ABAB-alternated runs against the dense model.", "",
             "| output | format | size on disk | stock transformers loads it | llama.cpp (llama-cpp-python) | "
             "prefill vs dense (transformers CPU) | decode vs dense (transformers CPU) | WikiText-2 (run.json) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lc = r.get("llama_cpp", "– (not a GGUF file)")
        if r.get("llama_prefill_speedup"):
            lc += f"; prefill {r['llama_prefill_speedup']:.2f}×, decode {r['llama_decode_speedup']:.2f}× vs dense"
        via = "" if r["transformers"].startswith("yes") else " (optprune's load)"
        sp = [f"{r[k]:.2f}×{via}" if k in r else "– (no Python loader)" for k in ("prefill_speedup", "decode_speedup")]
        tf = r["transformers"]
        if not r["transformers"].startswith("yes") and not str(r["optprune_load"]).startswith("no"):
            tf += f"; optprune's loader: yes ({r['optprune_load']})"
        ppl = f"{r['wikitext2']:.2f} ({r.get('protocol') or '?'})" if r.get("wikitext2") else "–"
        lines.append(f"| {r['output']} | {r['format']} {r['detail']} | {r['bytes'] / 2 ** 20:.1f} MiB | "
                     f"{tf} | {lc} | {sp[0]} | {sp[1]} | {ppl} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="the dense source (built-in name, HF dir or .gguf)")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=DIR", help="an optprune output, repeatable")
    ap.add_argument("--gguf", default="", help="GGUF types to also write from each dense-format run (e.g. f16,q8_0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write rows and metadata here")
    ap.add_argument("--md", default=None, help="write the Markdown table here")
    args = ap.parse_args(argv)
    runs = []
    for item in args.run:
        label, sep, d = item.partition("=")
        if not sep or not Path(d).is_dir():
            ap.error(f"--run takes LABEL=DIR with an existing DIR, got {item!r}")
        runs.append((label, Path(d)))
    gtypes = [t for t in args.gguf.split(",") if t]
    import platform

    import importlib.metadata
    import torch
    import transformers

    import optprune
    from optprune.llm_adapters.loading import load_model
    torch.set_num_threads(args.threads)
    dense, tok, _ = load_model(args.model, model_dir=args.model_dir, dtype=torch.float32)
    dense.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dense.config.vocab_size, (1, args.prefill), generator=g)
    prompt = torch.randint(0, dense.config.vocab_size, (1, 16), generator=g)
    lc = _llama_cpp()
    rows, dense_gguf = [], {}
    with tempfile.TemporaryDirectory(prefix="deploy-table-") as work:
        work = Path(work)
        base = work / "dense"
        optprune.save(dense, base, tok, dtype="float32")
        base_runs = [("dense source (f32)", base)]
        for t in gtypes:
            optprune.save(dense, work / f"dense-{t}", tok, format="gguf", gguf_type=t)
            base_runs.append((f"dense source → gguf {t}", work / f"dense-{t}"))
            if not isinstance(lc, str):
                dense_gguf[t] = _llama_speed(_gguf_file(work / f"dense-{t}"), ids[0].tolist(), args.decode,
                                             args.repeats, args.threads)
        extra = []
        for label, d in runs:
            rec = json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {}
            if (rec.get("saved") or {}).get("save_format", "dense") == "dense" and gtypes:
                m, t2, _ = load_model(str(d), dtype=torch.float32)
                for t in gtypes:
                    out = work / f"{len(extra)}-{t}"
                    try:
                        optprune.save(m, out, t2, format="gguf", gguf_type=t)
                        extra.append((f"{label} → gguf {t}", out))
                    except ValueError as e:
                        print(f"[deploy_table] {label} → gguf {t}: refused: {e}", flush=True)
        for label, d in base_runs + runs + extra:
            measure(label, d, dense, ids, prompt, args, rows, dense_gguf)
    doc = {"meta": {"model": args.model, "machine": f"{platform.machine()}, torch threads: {torch.get_num_threads()}",
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "gguf": importlib.metadata.version("gguf"),
                    "llama_cpp": getattr(lc, "__version__", "not installed") if not isinstance(lc, str)
                    else "not installed", "threads": args.threads, "prefill": args.prefill, "decode": args.decode,
                    "repeats": args.repeats, "argv": sys.argv[1:]}, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    md = render(doc)
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
