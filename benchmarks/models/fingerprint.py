"""Fingerprints of whole prune runs: did a change of the code change any result?

Runs a fixed list of ``optprune prune`` configurations (each in a fresh process, one thread) and records, per
configuration, a SHA-256 of every saved tensor and of the per-layer records of run.json (name, error, sparsity,
kept widths). ``--compare OLD.json`` reports every configuration whose fingerprint differs, and exits 1 if any
does. A refactoring that claims "results unchanged" runs this before and after::

    python benchmarks/models/fingerprint.py --model stories260k --out /tmp/before.json
    ...change the code...
    python benchmarks/models/fingerprint.py --model stories260k --out /tmp/after.json --compare /tmp/before.json

The list covers the main code paths: four methods at 50%, 2:4, two structured methods, the shard-by-shard
(``--low-memory``) engine in both modes, two-process block parallelism in memory and shard by shard, three
per-layer allocations, self-calibration, and an interrupted run resumed. ``--only`` picks some by name.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["--nsamples", "8", "--seqlen", "64", "--no-eval", "--no-kl", "--seed", "0"]

#: name -> extra CLI arguments (the model and output are added). A value of the form ("resume", args) runs the
#: configuration interrupted after block 1 and then resumed.
CONFIGS = {
    "wanda-50": ["--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt-50": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "fista-50": ["--method", "fista", "--sparsity", "0.5"],
    "admm-50": ["--method", "admm", "--sparsity", "0.5"],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "magnitude-50": ["--method", "magnitude", "--sparsity", "0.5"],
    "ria-50": ["--method", "ria", "--sparsity", "0.5"],
    "spap-mlp": ["--method", "spap", "--structure", "mlp", "--sparsity", "0.3"],
    "flap-heads": ["--method", "flap", "--structure", "heads", "--sparsity", "0.25"],
    "lowmem-sparsegpt-seq": ["--method", "sparsegpt", "--sparsity", "0.5", "--low-memory"],
    "lowmem-sparsegpt-dense": ["--method", "sparsegpt", "--sparsity", "0.5", "--low-memory",
                               "--mode", "dense-input"],
    "nproc2-wanda": ["--method", "wanda", "--sparsity", "0.5", "--mode", "dense-input", "--nproc", "2",
                     "--force-nproc"],
    "nproc2-wanda-lowmem": ["--method", "wanda", "--sparsity", "0.5", "--mode", "dense-input", "--nproc", "2",
                            "--force-nproc", "--low-memory"],
    "alpha-wanda-70": ["--method", "wanda", "--sparsity", "0.7", "--allocation", "alpha"],
    "owl-wanda-70": ["--method", "wanda", "--sparsity", "0.7", "--allocation", "owl"],
    "auto-wanda-70": ["--method", "wanda", "--sparsity", "0.7", "--allocation", "auto"],
    "self-calibration": ["--method", "sparsegpt", "--sparsity", "0.5", "--dataset", "self"],
    "gptq-w4": ["--method", "gptq", "--quant", "w4"],
    "resume-sparsegpt": ("resume", ["--method", "sparsegpt", "--sparsity", "0.5"]),
}


def _digest_dir(out: Path) -> dict:
    import torch
    from safetensors import safe_open

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k).contiguous()
                raw = t.view(-1).view(torch.uint8).numpy().tobytes()
                tensors[k] = hashlib.sha256(raw + str(tuple(t.shape)).encode() + str(t.dtype).encode()).hexdigest()
    rec = json.loads((out / "run.json").read_text())
    layers = [{k: lay.get(k) for k in ("name", "error", "sparsity", "kept", "widths") if k in lay}
              for lay in rec.get("layers", [])]
    all_t = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()
    all_l = hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()
    return {"tensors": all_t, "layers": all_l, "n_tensors": len(tensors), "n_layers": len(layers),
            "per_tensor": tensors}


def _run(cmd: list[str], env: dict) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-2000:]}")


def run_config(name: str, spec, model: str, work: Path, env: dict) -> dict:
    out = work / name.replace(":", "_")
    base = [sys.executable, "-m", "optprune", "prune", "--model", model, "--output", str(out), *COMMON]
    t0 = time.perf_counter()
    if isinstance(spec, tuple):
        args = spec[1]
        e = dict(env, OPTPRUNE_TEST_INTERRUPT="block:1")
        p = subprocess.run(base + args, env=e, capture_output=True, text=True)
        if p.returncode == 0:
            raise RuntimeError(f"{name}: the interrupted run exited 0")
        _run(base + args + ["--resume"], env)
    else:
        _run(base + list(spec), env)
    d = _digest_dir(out)
    d["time_s"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(out, ignore_errors=True)
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--out", required=True, help="JSON file of fingerprints")
    ap.add_argument("--compare", help="an earlier --out file: report differences, exit 1 if any")
    ap.add_argument("--only", help="comma list of configuration names (default: all)")
    ap.add_argument("--extra", default="", help="arguments added to every configuration, e.g. '--protocol cpu'")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="optprune-fp-") as tmp:
        for n in names:
            spec = CONFIGS[n]
            if args.extra:
                extra = args.extra.split()
                spec = (spec[0], spec[1] + extra) if isinstance(spec, tuple) else list(spec) + extra
            results[n] = run_config(n, spec, args.model, Path(tmp), env)
            print(f"{n:24s} tensors {results[n]['tensors'][:12]} layers {results[n]['layers'][:12]} "
                  f"({results[n]['n_tensors']} tensors, {results[n]['n_layers']} layers, {results[n]['time_s']} s)",
                  flush=True)
            Path(args.out).write_text(json.dumps({"model": args.model, "configs": results}, indent=1))
    if not args.compare:
        return 0
    old = json.loads(Path(args.compare).read_text())["configs"]
    bad = 0
    for n, d in results.items():
        if n not in old:
            print(f"{n}: not in {args.compare}")
            continue
        o = old[n]
        diff = [k for k in ("tensors", "layers") if o[k] != d[k]]
        if diff:
            bad += 1
            changed = [k for k, h in d["per_tensor"].items() if o["per_tensor"].get(k) != h]
            print(f"{n}: DIFFERENT {diff}; {len(changed)} tensors differ, e.g. {changed[:3]}")
    print(f"{len(results) - bad}/{len(results)} configurations identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
