"""Quantized (and sparse + quantized) SmolLM2 runs: perplexity, layer error, time and checkpoint size.

Each configuration is one ``optprune prune`` run through the API, saved in the pack-quantized format (and the
dense model once in bfloat16, for the size ratio); one JSON line per configuration in ``--out`` (resumable: a
configuration already there is skipped). ``--table`` renders the Markdown table from those lines.

    python benchmarks/quant/quant_sweep.py --model smollm2-135m --protocol cpu --data-dir DIR \
        --configs rtn:w4g64,gptq:w4g64,quant-refit:w4g64,sparsegpt:w4g64:0.5 --out benchmarks/results/quant_smollm2.jsonl
    python benchmarks/quant/quant_sweep.py --table benchmarks/results/quant_smollm2.jsonl

A configuration is ``method:quant[:setting][@allocation]`` with setting a sparsity (``0.5``) or an N:M pattern
(``2:4``); ``@allocation`` gives mixed precision — per-block bit widths averaging the grid's bits
(``gptq:w3g64@alpha``, ``gptq:w3@auto``; ``--allocation`` with ``--quant``)::

    python benchmarks/quant/quant_sweep.py --model stories260k --protocol smoke --dtype float32 \
        --configs gptq:w3@alpha,gptq:w3,gptq:w4 --out benchmarks/results/quant_stories.jsonl

Against another tool on the same calibration and evaluator (benchmarks/quant/llmc_gptq.py writes both the token
ids and the other tool's checkpoint): ``--calibration-ids W/calibration_ids.pt`` calibrates every configuration on
exactly those ids, and ``--external LABEL=DIR`` evaluates a checkpoint written elsewhere with optprune's evaluator
(same protocol) and adds it as a row::

    python benchmarks/quant/quant_sweep.py --calibration-ids W/calibration_ids.pt --configs gptq:w4g64 \
        --external llm-compressor-gptq:w4g64=W/llmc-w4a16-g64 --out results.jsonl
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from sweep import portable  # noqa: E402


def parse_config(text: str) -> dict:
    text, _, allocation = text.strip().partition("@")
    parts = text.split(":")
    if len(parts) < 2:
        raise SystemExit(f"configuration {text!r}: use method:quant[:setting][@allocation]")
    cfg = {"method": parts[0], "quant": parts[1], "pattern": "unstructured", "sparsity": None}
    if allocation:
        cfg["allocation"] = allocation
    rest = ":".join(parts[2:])
    if rest:
        if ":" in rest:
            cfg["pattern"] = rest
        else:
            cfg["sparsity"] = float(rest)
    return cfg


def key_of(d: dict) -> str:
    return json.dumps({k: d.get(k) for k in ("model", "protocol", "method", "quant", "pattern", "sparsity",
                                                  "calibration", "allocation")
                       if d.get(k) is not None or k not in ("calibration", "allocation")},
                      sort_keys=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def external_row(label: str, directory: str, args) -> dict:
    """A checkpoint written by another tool, evaluated by optprune's evaluator under the same protocol."""
    from optprune.llm_adapters.run import evaluate
    method, _, quant = label.partition(":")
    t0 = time.perf_counter()
    rec = evaluate(directory, protocol=args.protocol, data_dir=args.data_dir, progress=False, verbose=False)
    meta_path = Path(directory + ".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    structure = meta.get("mask_structure") or "0:0"
    pattern = structure if meta.get("sparsity") and structure != "0:0" else "unstructured"
    sparsity = meta.get("sparsity") if pattern == "unstructured" else None
    key = {"external": label, "protocol": args.protocol}
    if pattern != "unstructured" or sparsity:
        key.update(pattern=pattern, sparsity=sparsity)
    return {"key": json.dumps(key), "method": method, "quant": quant or None,
            "pattern": pattern, "sparsity": sparsity, "external": True,
            "perplexity": {k: (v.get("ppl") if isinstance(v, dict) else v)
                           for k, v in (rec.get("perplexity") or {}).items()},
            "mean_rel_error": None, "prune_s": meta.get("oneshot_s"),
            "eval_wall_s": time.perf_counter() - t0, "pack_quantized_bytes": dir_bytes(Path(directory)),
            "versions": rec.get("versions"), "machine": rec.get("machine")}


def run(args) -> int:
    from optprune.llm_adapters.run import prune
    calibration = None
    if args.calibration_ids:
        import torch
        calibration = torch.load(args.calibration_ids)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(l)["key"] for l in out.read_text().splitlines() if l.strip()} if out.exists() else set()
    for item in args.external or []:
        label, _, directory = item.partition("=")
        row = external_row(label, directory, args)
        if row["key"] in done:
            continue
        with out.open("a") as f:
            f.write(json.dumps(portable(row)) + "\n")
        print(json.dumps({k: row[k] for k in ("method", "quant", "perplexity", "prune_s")}), flush=True)
    for text in [t for t in args.configs.split(",") if t]:
        cfg = dict(parse_config(text), model=args.model, protocol=args.protocol,
                   calibration=("ids " + Path(args.calibration_ids).name) if args.calibration_ids else None)
        key = key_of(cfg)
        if key in done:
            print(f"skip (done): {text}", file=sys.stderr)
            continue
        tmp = Path(tempfile.mkdtemp(prefix="quant-sweep-"))
        try:
            t0 = time.perf_counter()
            rec = prune(args.model, cfg["method"], sparsity=cfg["sparsity"], pattern=cfg["pattern"], quant=cfg["quant"],
                        allocation=cfg.get("allocation", "uniform"),
                        protocol=args.protocol, data_dir=args.data_dir, output=str(tmp / "pq"), calibration=calibration,
                        save_format="pack-quantized", dtype=args.dtype, progress=False, verbose=False, kl=False)
            wall = time.perf_counter() - t0
            row = {"key": key, **cfg, "perplexity": {k: (v.get("ppl") if isinstance(v, dict) else v)
                                                      for k, v in (rec.get("perplexity") or {}).items()},
                   "mean_rel_error": (rec.get("summary") or {}).get("mean_rel_error"),
                   "sparsity_achieved": (rec.get("summary") or {}).get("sparsity"),
                   "prune_s": (rec.get("timings") or {}).get("prune_s"), "wall_s": wall,
                   "pack_quantized_bytes": dir_bytes(tmp / "pq"), "dtype": args.dtype,
                   "all_on_grid": all(l.get("on_grid", False) for l in rec.get("layers", [])),
                   "versions": rec.get("versions"), "machine": rec.get("machine"), "timings": rec.get("timings")}
            if cfg.get("allocation"):  # mixed precision: the widths chosen
                a = rec.get("allocation") or {}
                row["bits"] = {k: a.get(k) for k in ("mean_bits", "min_bits", "max_bits", "block_bits", "chosen",
                                                      "candidates", "sensitivity")}
            if args.dense_size:  # the dense model in bfloat16, for the size ratio
                from optprune.llm_adapters.export import save_model
                from optprune.llm_adapters.loading import load_model
                import torch
                loaded = load_model(args.model)
                dense = loaded[0] if isinstance(loaded, tuple) else loaded
                save_model(dense, tmp / "dense", format="dense", dtype=torch.bfloat16)
                row["dense_bf16_bytes"] = dir_bytes(tmp / "dense")
                del dense, loaded
            with out.open("a") as f:
                f.write(json.dumps(portable(row)) + "\n")
            print(json.dumps({k: row[k] for k in ("method", "quant", "sparsity", "perplexity", "prune_s",
                                                  "pack_quantized_bytes")}), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def table(path: str) -> str:
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    lines = ["| tool | method | grid | bits per block | pruned | WikiText-2 ppl | mean rel. layer error | prune s | "
             "checkpoint MB |", "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731  (RTN collects no Grams: no error)
    for r in rows:
        ppl = next(iter((r.get("perplexity") or {}).values()), None)
        setting = r["pattern"] if r["pattern"] != "unstructured" else (f"{r['sparsity']:.0%}" if r.get("sparsity") else "–")
        b = r.get("bits")
        bits = "uniform" if not b else (f"{r['allocation']}" + (f" → {b['chosen']}" if b.get("chosen") else "") +
                                        f": {'/'.join(map(str, b.get('block_bits') or b.get('unit_bits') or []))} (mean {b['mean_bits']:.2f})")
        lines.append(f"| {'other' if r.get('external') else 'optprune'} | {r['method']} | {r['quant']} | {bits} | {setting} | {f(ppl, '.2f')} | {f(r['mean_rel_error'], '.4f')} | "
                     f"{f(r['prune_s'], '.0f')} | {r['pack_quantized_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--protocol", default="cpu")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--configs", default="rtn:w4g64,gptq:w4g64,quant-refit:w4g64,sparsegpt:w4g64:0.5")
    ap.add_argument("--calibration-ids", default=None, help="a torch file of calibration token ids (nsamples, seqlen) "
                    "used by every configuration (default: the protocol's calibration)")
    ap.add_argument("--external", action="append", default=None, metavar="LABEL=DIR",
                    help="also evaluate a checkpoint written by another tool (LABEL: method:grid), repeatable")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the saved scales and unquantized tensors")
    ap.add_argument("--dense-size", action="store_true", help="also save the dense model in bfloat16 for the size")
    ap.add_argument("--out", default=None, help="JSONL results file (appended; resumable)")
    ap.add_argument("--table", default=None, help="print the Markdown table of this JSONL file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not args.out:
        ap.error("--out is required (or --table)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
