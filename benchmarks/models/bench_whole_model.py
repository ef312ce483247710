"""Whole-model prune time, peak memory and where the time goes, per method.

Each method runs in a fresh process (so that its peak RSS is its own) through the public run function with the
protocol's calibration and no evaluation, then the script prints, per method: the prune time (the block walk),
the whole call's time (load, calibration, prune, save), the peak RSS against the dense model's size, the mean time
per block, and how the block walk splits into statistics (Gram/diagonal accumulation), solves and forward passes
(from the run record's per-block timings).

    python benchmarks/models/bench_whole_model.py --model smollm2-135m --methods sparsegpt,wanda --threads 2 \\
        --data-dir DIR --reference sparsegpt=508,wanda=370

``--reference METHOD=SECONDS`` gives another tool's prune time for the same job measured on the same machine (e.g.
llm-compressor's ``oneshot``); the script then prints our time as a ratio of it. It does not run that tool.
Compare ratios taken in one run on one machine: absolute times move with the machine's load.

Memory: the peak RSS of the whole call, and its parts — the runtime (RSS of the fresh process with torch and
optprune imported, measured before the call), the model's weights in their dtype (whole, or with
``--low-memory`` the largest block and the embeddings), the activation buffer, the Grams held at once and the
block's dense copy (the sizes of those tensors) — and what remains of the peak beyond them (forward
intermediates, solver workspace, allocator slack). The peak of each stage (load, calibration, prune) is
measured by sampling the resident set.

Cost model (``cost_model.py``): per block the FLOPs of the forward passes, the statistics and the solves, the
machine's measured float32 matmul rate, the time that gives (the limit) and the measured time over it.

``--model random-llama-0.5b`` / ``random-llama-1.1b``: a Llama-shaped model with random weights, built from a
config below (no download; SmolLM2's tokenizer) and written once under ``--work-dir``; quality is not the
point. ``--predict`` prints the model's prediction for Llama-3-8B and -70B on GPUs at a given rate.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost_model  # noqa: E402


#: random-initialised Llama-shaped models (SmolLM2's vocabulary; TinyLlama's 1.1B shape)
RANDOM_MODELS = {
    "random-llama-0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=14, num_attention_heads=12,
                              num_key_value_heads=4),
    "random-llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                              num_key_value_heads=4),
}
def _build_random(name: str, dest: Path) -> None:
    """Write the random model ``name`` (float32 safetensors, SmolLM2's tokenizer) to ``dest`` (own process)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from optprune.llm_adapters.loading import builtin_path
    d, gguf = builtin_path("smollm2-135m", None)
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                      **RANDOM_MODELS[name])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    tmp = dest.with_name(dest.name + ".part")
    model.save_pretrained(str(tmp), max_shard_size="1GB")
    tok.save_pretrained(str(tmp))
    tmp.rename(dest)


def random_model(name: str, work_dir: Path) -> Path:
    dest = Path(work_dir) / name
    if not (dest / "config.json").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        p = mp.get_context("spawn").Process(target=_build_random, args=(name, dest))
        p.start()
        p.join()
        if p.exitcode:
            raise SystemExit(f"bench_whole_model: building {name} failed")
    return dest


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class _Sampler:
    """The resident set every ``dt`` seconds, with the time it was read (stage peaks)."""

    def __init__(self, dt=0.05):
        self.dt, self.samples, self._stop = dt, [], threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _rss_mb()))
            self._stop.wait(self.dt)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.t.join()

    def peak(self, t0, t1) -> float:
        return max((r for t, r in self.samples if t0 <= t <= t1), default=0.0)


def _dims_of(model: str):
    from optprune.llm_adapters.loading import _config_of, locate_model
    kind, where, gguf, _ = locate_model(model, None)
    return cost_model.llama_dims(_config_of(kind, where, gguf))


def _start(threads: int):
    """A worker's set-up: its threads, then the runtime's resident set, the matmul rate and the start time."""
    import torch
    torch.set_num_threads(threads)
    import optprune.llm_adapters.run  # noqa: F401 - the runtime measured includes optprune
    return _rss_mb(), cost_model.matmul_rate(), time.perf_counter()


def _worker(kw: dict, threads: int, q) -> None:
    runtime, rate0, t0 = _start(threads)
    from optprune.llm_adapters.run import prune
    try:
        with _Sampler() as smp:
            rec = prune(**kw)
    except Exception as e:  # noqa: BLE001 - reported as the row
        q.put({"error": f"{type(e).__name__}: {e}"})
        return
    t_end = time.perf_counter()
    rate1 = cost_model.matmul_rate()
    tm = rec.get("timings") or {}
    stages, t = {}, t0
    for k in ("load_s", "calibration_s", "prune_s"):
        if tm.get(k) is not None:
            stages[k[:-2]] = smp.peak(t, t + tm[k])
            t += tm[k]
    stages["rest"] = smp.peak(t, t_end)
    blocks = rec.get("blocks") or []
    split = {k: sum(float(b.get(k) or 0.0) for b in blocks) for k in ("stats_time_s", "solve_time_s", "forward_time_s",
                                                                          "next_inputs_time_s")}
    q.put({"call_s": t_end - t0, "timings": tm, "blocks": len(blocks),
           "block_s": [float(b.get("total_time_s") or b.get("time_s") or 0.0) for b in blocks], "split": split,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "runtime_mb": runtime,
           "stage_peak_mb": stages, "matmul_gflops": [rate0 / 1e9, rate1 / 1e9],
           "low_memory": (rec.get("pipeline") or {}).get("low_memory"),
           "n_params": (rec.get("model") or {}).get("n_params"), "calibration": rec.get("calibration", {}).get("source")
           if isinstance(rec.get("calibration"), dict) else None,
           "nsamples": (rec.get("pipeline") or {}).get("nsamples"), "seqlen": (rec.get("pipeline") or {}).get("seqlen")})


def _worker_blocks(model_dir: str, method: str, kw: dict, nblocks: int, threads: int, out_dir: str, q) -> None:
    """The low-memory block walk over the first ``nblocks`` blocks of a checkpoint, on random token ids (a
    random model's cost does not depend on the text), with the resident set after each block."""
    import torch
    runtime, rate0, t0 = _start(threads)
    from optprune.llm_adapters.engine import prune_offloaded
    from optprune.llm_adapters.offload import OffloadedModel
    from optprune.llm_adapters.pipeline import PruneConfig
    try:
        with _Sampler() as smp:
            om = OffloadedModel(model_dir)
            ids = torch.randint(0, om.config.vocab_size, (kw["nsamples"], kw["seqlen"]),
                                generator=torch.Generator().manual_seed(0))
            cfg = PruneConfig(method=method, sparsity=kw["sparsity"], error_correction=kw["error_correction"],
                              method_options=kw.get("method_options") or {}, device="cpu")
            t1 = time.perf_counter()
            rec = prune_offloaded(om, ids, cfg, out_dir, blocks=list(range(nblocks)), progress=False,
                                  write_rest=False)
    except Exception as e:  # noqa: BLE001 - reported as the row
        q.put({"error": f"{type(e).__name__}: {e}"})
        return
    t_end = time.perf_counter()
    rate1 = cost_model.matmul_rate()
    blocks = rec["blocks"]
    ends, t = [], t1 + float(rec["low_memory"]["capture_time_s"])
    for b in blocks:
        t += float(b.get("total_time_s") or 0.0)
        ends.append(smp.peak(t1, t))
    split = {k: sum(float(b.get(k) or 0.0) for b in blocks) for k in ("stats_time_s", "solve_time_s", "forward_time_s",
                                                                          "next_inputs_time_s")}
    n_params = sum(math.prod(om.ckpt.meta[k][0]) for k in om.ckpt.meta)
    q.put({"call_s": t_end - t0, "timings": {"load_s": t1 - t0, "prune_s": rec["time_s"]}, "blocks": len(blocks),
           "block_s": [float(b.get("total_time_s") or 0.0) for b in blocks], "split": split,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "runtime_mb": runtime,
           "stage_peak_mb": {"load": smp.peak(t0, t1), "prune": smp.peak(t1, t_end)},
           "peak_after_block_mb": ends, "matmul_gflops": [rate0 / 1e9, rate1 / 1e9], "low_memory": rec["low_memory"],
           "n_params": n_params, "nsamples": kw["nsamples"], "seqlen": kw["seqlen"]})


def memory_parts(dims: dict, nsamples: int, seqlen: int, *, low_memory: bool, error_correction: bool,
                 act_bytes: int = 4, w_bytes: int = 4) -> dict:
    """Bytes of the tensors the prune holds at its peak (module doc): weights (whole model, or the largest
    block and the embeddings with ``low_memory``), the activation buffer, the Grams held at once (uncorrected:
    every group's H of a block; corrected: H, Ĥ, C of the widest group) and the dense copy of a block."""
    groups = cost_model.block_layers(dims)
    blk = sum(m * n for g in groups for _, m, n in g) * w_bytes
    emb = dims["vocab"] * dims["d"] * w_bytes
    weights = (blk + emb) if low_memory else (blk * dims["blocks"] + 2 * emb)
    grams = 4 * (3 * max(g[0][2] for g in groups) ** 2 if error_correction else sum(g[0][2] ** 2 for g in groups))
    return {"weights": weights, "activations": nsamples * seqlen * dims["d"] * act_bytes, "grams": grams,
            "dense_copy": blk if error_correction else 0}


def _print_row(m: str, res: dict, args, ref: dict, dims: dict) -> None:
    t = res["timings"] or {}
    nb = max(1, res["blocks"])
    sp = res["split"]
    dense_mb = 4 * (res["n_params"] or 0) / 2 ** 20
    line = (f"{m:>10}: prune {t.get('prune_s', 0):7.1f} s (calibration {t.get('calibration_s', 0):6.1f} s, load "
            f"{t.get('load_s', 0):5.1f} s, whole call {res['call_s']:7.1f} s) · peak RSS {res['peak_rss_mb']:6.0f} MB"
            f" = {res['peak_rss_mb'] / dense_mb:4.2f}× the float32 model · per block {sum(res['block_s']) / nb:5.2f} s"
            f" (statistics {sp['stats_time_s'] / nb:5.2f}, solves {sp['solve_time_s'] / nb:5.2f}, forward "
            f"{(sp['forward_time_s'] + sp['next_inputs_time_s']) / nb:5.2f})")
    if m in ref:
        line += f" · {t.get('prune_s', 0) / ref[m]:4.2f}× the reference's {ref[m]:.0f} s"
    print(line, flush=True)
    ns, sl = res["nsamples"], res["seqlen"]
    low = bool(args.low_memory)
    ec = args.error_correction == "on"
    parts = memory_parts(dims, ns, sl, low_memory=low, error_correction=ec)
    held = sum(parts.values()) / 2 ** 20 + res["runtime_mb"]
    print(f"{'':>10}  memory: peak {res['peak_rss_mb']:.0f} MB = runtime {res['runtime_mb']:.0f} + "
          + " + ".join(f"{k} {v / 2 ** 20:.0f}" for k, v in parts.items())
          + f" + rest {res['peak_rss_mb'] - held:.0f} MB; stage peaks "
          + ", ".join(f"{k} {v:.0f}" for k, v in res["stage_peak_mb"].items()) + " MB", flush=True)
    if res.get("peak_after_block_mb"):
        print(f"{'':>10}  resident-set peak after each block: "
              + ", ".join(f"{v:.0f}" for v in res["peak_after_block_mb"]) + " MB", flush=True)
    rate = sum(res["matmul_gflops"]) / 2 * 1e9
    # a one-block walk (--blocks 1) is its last block: no propagating forward
    one = cost_model.block_flops(dims, ns, sl, error_correction=ec, method=m, last=res["blocks"] == 1)
    if one["total"] is None:
        return
    tot = cost_model.model_flops(dims, ns, sl, error_correction=ec, method=m)["total"]
    if res["blocks"] < dims["blocks"]:  # a partial walk (--blocks): its own blocks, the last one propagating
        tot = one["total"] * (res["blocks"] - 1) + \
            cost_model.block_flops(dims, ns, sl, error_correction=ec, method=m, last=True)["total"]
    limit_blk = one["total"] / rate
    meas_blk = sorted(res["block_s"])[len(res["block_s"]) // 2]
    print(f"{'':>10}  cost model per block: forward {one['forward'] / 1e9:.1f} + statistics "
          f"{one['statistics'] / 1e9:.1f} + solve {one['solve'] / 1e9:.1f} GFLOP at the measured matmul rate "
          f"{rate / 1e9:.1f} GFLOP/s ({res['matmul_gflops'][0]:.1f} before, {res['matmul_gflops'][1]:.1f} after) → "
          f"limit {limit_blk:.2f} s; median measured {meas_blk:.2f} s = {meas_blk / limit_blk:.2f}× the limit · "
          f"whole prune: limit {tot / rate:.0f} s, measured {t.get('prune_s', 0):.0f} s = "
          f"{t.get('prune_s', 0) / (tot / rate):.2f}×", flush=True)
    res["cost"] = {"block_flops": one, "model_flops": tot, "rate_flops": rate, "limit_block_s": limit_blk,
                   "median_block_s": meas_blk, "memory_parts": parts}


def predict(rate_flops: float, ratio: float, nsamples: int = 128, seqlen: int = 2048) -> None:
    """Prune time of SparseGPT (error-corrected) on Llama-3-8B/-70B at ``rate_flops`` per GPU × ``ratio``."""
    print(f"prediction: SparseGPT, error correction, {nsamples}×{seqlen} calibration, {rate_flops / 1e12:.0f} "
          f"TFLOP/s per GPU (float32 matmul; assumed, not measured), measured/limit ratio {ratio:.2f}")
    for name, cfg in cost_model.PREDICT_MODELS.items():
        g = cost_model.gpu_prediction(cfg, rate_flops, ratio, nsamples, seqlen)
        print(f"  {name}: {g['blocks']} blocks, {g['flops_per_block'] / 1e12:.1f} TFLOP per block → one GPU "
              f"{g['one_s'] / 60:.0f} min, 8 GPUs (--nproc 8) {g['many_s'] / 60:.0f} min", flush=True)


def _parse_reference(items) -> dict:
    out = {}
    for it in items or []:
        for part in str(it).split(","):
            if not part.strip():
                continue
            k, sep, v = part.partition("=")
            if not sep:
                raise SystemExit(f"bench_whole_model: --reference {part!r} is not METHOD=SECONDS")
            out[k.strip()] = float(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help=f"a model, or one of {', '.join(RANDOM_MODELS)}")
    ap.add_argument("--methods", default="sparsegpt,wanda", help="comma list")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--protocol", default="cpu", help="calibration settings (cpu: C4 128×512, seed 0)")
    ap.add_argument("--calibration", default=None, help="calibration source (default: the protocol's)")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--error-correction", default="off", choices=["on", "off"],
                    help="off: the published SparseGPT/Wanda propagation; on: optprune's error-corrected statistics")
    ap.add_argument("--low-memory", action="store_true", help="prune from the safetensors shards, block by block")
    ap.add_argument("--method-options", default=None, help="JSON dict of method options (e.g. ADMM's max_iter)")
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "optprune" / "bench"),
                    help="where random models and low-memory outputs are written")
    ap.add_argument("--blocks", type=int, default=None, metavar="K",
                    help="with --low-memory: walk only the first K blocks, on random token ids (no calibration "
                         "data; for random models, whose cost does not depend on the text)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--reference", action="append", metavar="METHOD=SECONDS",
                    help="another tool's prune time for the same job on this machine (printed as a ratio)")
    ap.add_argument("--predict", type=float, default=None, metavar="TFLOPS",
                    help="also print the prediction for Llama-3-8B/70B at this per-GPU float32 rate")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    ref = _parse_reference(args.reference)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        print("bench_whole_model: --methods is empty", file=sys.stderr)
        return 2
    try:
        mopts = json.loads(args.method_options) if args.method_options else None
    except json.JSONDecodeError as e:
        print(f"bench_whole_model: --method-options is not JSON ({e})", file=sys.stderr)
        return 2
    model = str(random_model(args.model, Path(args.work_dir))) if args.model in RANDOM_MODELS else args.model
    dims = _dims_of(model)
    ctx = mp.get_context("spawn")
    rows = []
    for m in methods:
        kw = dict(model=model, method=m, sparsity=args.sparsity, protocol=args.protocol,
                  calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                  error_correction=args.error_correction == "on", evaluate=False, kl=False, data_dir=args.data_dir,
                  progress=False, method_options=mopts)
        if args.low_memory:
            kw.update(low_memory=True, output=str(Path(args.work_dir) / "out" / f"{args.model}-{m}"), overwrite=True)
        q = ctx.Queue()
        if args.blocks:
            if not (args.low_memory and args.nsamples and args.seqlen):
                print("bench_whole_model: --blocks needs --low-memory, --nsamples and --seqlen", file=sys.stderr)
                return 2
            p = ctx.Process(target=_worker_blocks, args=(model, m, kw, args.blocks, args.threads, kw["output"], q))
        else:
            p = ctx.Process(target=_worker, args=(kw, args.threads, q))
        t0 = time.perf_counter()
        p.start()
        res = q.get()
        p.join()
        if isinstance(res.get("low_memory"), dict):  # the walk's own record: largest block, activations
            res["walk"] = res["low_memory"]
        res.update(method=m, model=args.model, low_memory=bool(args.low_memory), wall_s=time.perf_counter() - t0,
                   threads=args.threads, dims=dims, error_correction=args.error_correction == "on",
                   command="python benchmarks/models/bench_whole_model.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv))
        rows.append(res)
        if "error" in res:
            print(f"{m}: error: {res['error']}", file=sys.stderr)
            continue
        _print_row(m, res, args, ref, dims)
    if args.predict:
        predict(args.predict * 1e12, 1.0)
        done = [r["cost"] for r in rows if "cost" in r]
        if done:  # the measured/limit ratio of this run, as if a GPU kept as close to its limit as this machine
            predict(args.predict * 1e12, max(c["median_block_s"] / c["limit_block_s"] for c in done))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
