"""Cost against model size: the measured rows of ``bench_whole_model.py --out`` (SmolLM2-135M, the random ~0.5B
and ~1.1B Llamas, ...) beside the cost model's prediction for each, a plot of time per block and peak memory
against parameters (measured points, prediction lines), and the prediction for Llama-3-8B and -70B.

    python benchmarks/models/scale_report.py ROWS.json [ROWS.json ...] --json benchmarks/results/scale_cpu.json \\
        --plot benchmarks/results/scale_cpu.png [--gpu-tflops 50]

Per row: the measured median time per block against the FLOP model's limit at the matmul rate measured in the
same process (``cost_model.py``), and the peak resident set against the memory model: the runtime measured in
the process, plus the tensors the walk holds (``bench_whole_model.memory_parts``: with ``--low-memory`` the
largest block and the embeddings, the activation buffer, the Grams of one group, the dense copy of a block),
and the peak less the largest block (what ``--low-memory`` holds beside the block; flat as models grow if the
walk holds nothing per block). The prediction lines use the rows' median measured/limit ratio; the 8B/70B
figures are predictions at the FLOP limit, not measurements (GPU rate assumed, ``--gpu-tflops``). ``--json`` writes the document that
``paper_repro/make_readme_results.py`` renders (:func:`render_markdown`) into docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost_model  # noqa: E402

def n_params(dims: dict) -> int:
    """Parameters of a Llama-shaped model (linear sub-layers, untied embeddings and head; norms ignored)."""
    blk = sum(m * n for g in cost_model.block_layers(dims) for _, m, n in g)
    return blk * dims["blocks"] + 2 * dims["vocab"] * dims["d"]


def memory_model(dims: dict, nsamples: int, seqlen: int, *, low_memory: bool, error_correction: bool,
                 runtime_mb: float) -> float:
    """Predicted peak resident set, MiB: the runtime plus what the walk holds (module doc)."""
    from bench_whole_model import memory_parts
    parts = memory_parts(dims, nsamples, seqlen, low_memory=low_memory, error_correction=error_correction)
    return runtime_mb + sum(parts.values()) / 2 ** 20


def row_summary(r: dict) -> dict:
    """One measured row: sizes, times, the limit and the ratio, memory against its model."""
    dims, c = r["dims"], r["cost"]
    ec = bool(r.get("error_correction", True))
    pred_mem = memory_model(dims, r["nsamples"], r["seqlen"], low_memory=r["low_memory"], error_correction=ec,
                            runtime_mb=r["runtime_mb"])
    after = r.get("peak_after_block_mb") or []
    # the limit from the FLOP model as it is now, at the rate measured in the row's process (a one-block walk is
    # its last block: no propagating forward)
    limit = cost_model.block_flops(dims, r["nsamples"], r["seqlen"], error_correction=ec, method=r["method"],
                                   last=r["blocks"] == 1)["total"] / c["rate_flops"]
    parts = c["memory_parts"]
    held_block = (parts["weights"] + parts["dense_copy"]) / 2 ** 20
    blk_mb = sum(m * n for g in cost_model.block_layers(dims) for _, m, n in g) * 4 / 2 ** 20  # float32
    return {"model": r["model"], "method": r["method"], "params": n_params(dims), "dims": dims, "blocks": dims["blocks"],
            "walked": r["blocks"], "low_memory": r["low_memory"], "error_correction": ec,
            "nsamples": r["nsamples"], "seqlen": r["seqlen"], "threads": r.get("threads"),
            "rate_gflops": c["rate_flops"] / 1e9, "limit_block_s": limit,
            "median_block_s": c["median_block_s"], "ratio": c["median_block_s"] / limit,
            "peak_rss_mb": r["peak_rss_mb"], "runtime_mb": r["runtime_mb"], "predicted_rss_mb": pred_mem,
            "activations_mb": parts["activations"] / 2 ** 20, "weights_held_mb": held_block,
            "rest_mb": r["peak_rss_mb"] - pred_mem, "largest_block_mb": blk_mb,
            "over_block_mb": r["peak_rss_mb"] - blk_mb,
            "peak_after_block_mb": after, "command": r.get("command")}


def predictions(rows: list, gpu_tflops: float) -> dict:
    """Per-block and whole-model time of every measured shape and of the PREDICT shapes at this machine's rate
    (the rows' median rate and ratio), and of the PREDICT shapes on GPUs (``gpu_tflops``, the same ratio)."""
    ref = rows[0]
    rate = sorted(r["rate_gflops"] for r in rows)[len(rows) // 2] * 1e9
    ratio = sorted(r["ratio"] for r in rows)[len(rows) // 2]
    ns, sl, ec = ref["nsamples"], ref["seqlen"], ref["error_correction"]
    line = []
    shapes = {r["model"]: r["dims"] for r in rows}
    shapes.update({k: cost_model.llama_dims(v) for k, v in cost_model.PREDICT_MODELS.items()})
    for name, dims in shapes.items():
        blk = cost_model.block_flops(dims, ns, sl, error_correction=ec)["total"]
        line.append({"model": name, "params": n_params(dims), "block_s": blk / rate * ratio,
                     "rss_mb": memory_model(dims, ns, sl, low_memory=True, error_correction=ec,
                                            runtime_mb=ref["runtime_mb"])})
    line.sort(key=lambda x: x["params"])
    gpu = []
    for name, cfg in cost_model.PREDICT_MODELS.items():  # the published calibration, 128 × 2048
        g = cost_model.gpu_prediction(cfg, gpu_tflops * 1e12, 1.0)
        gpu.append({"model": name, "blocks": g["blocks"], "tflop_per_block": g["flops_per_block"] / 1e12,
                    "one_gpu_min": g["one_s"] / 60, "eight_gpus_min": g["many_s"] / 60,
                    "activations_gb": g["activations_bytes"] / 1e9, "largest_block_gb": g["block_bytes"] / 1e9})
    return {"rate_gflops": rate / 1e9, "ratio": ratio, "nsamples": ns, "seqlen": sl, "line": line, "gpu": gpu,
            "gpu_tflops": gpu_tflops}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, pred = doc["rows"], doc["prediction"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [p["params"] / 1e9 for p in pred["line"]]
    ax[0].plot(xs, [p["block_s"] for p in pred["line"]], "-", color="gray", label="cost model (this machine)")
    ax[1].plot(xs, [p["rss_mb"] / 1024 for p in pred["line"]], "-", color="gray",
               label="memory model (--low-memory)")
    for r in rows:
        lab = f"{r['model']} ({'low-memory' if r['low_memory'] else 'in memory'})"
        mk = "o" if r["low_memory"] else "s"
        ax[0].plot([r["params"] / 1e9], [r["median_block_s"]], mk, label=lab)
        ax[1].plot([r["params"] / 1e9], [r["peak_rss_mb"] / 1024], mk, label=lab)
    for a, yl in zip(ax, ("time per block, s", "peak resident set, GiB")):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("parameters, billions")
        a.set_ylabel(yl)
        a.grid(True, which="both", alpha=0.3)
    ax[0].set_title(f"SparseGPT, {pred['nsamples']}×{pred['seqlen']} tokens, measured/limit {pred['ratio']:.2f}",
                    fontsize=8)
    ax[1].set_title("measured peak RSS against runtime + held tensors", fontsize=8)
    ax[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(doc: dict, level: int = 3) -> str:
    """The rows, the checks and the prediction as Markdown (the plot linked from ``doc["plot"]``)."""
    h = "#" * level
    pred = doc["prediction"]
    out = [f"{h} Cost against model size (CPU, measured) and the 8B/70B prediction", "",
           "Rows measured by `benchmarks/models/bench_whole_model.py` (commands below), one fresh process each; "
           "the limit is the FLOP model's time at the float32 matmul rate measured in that process "
           "(`benchmarks/models/cost_model.py`); the memory model is the measured runtime plus the tensors the walk "
           "holds. Rows: " + ", ".join(f"`{p}`" for p in doc.get("sources", [])) + ".", ""]
    out.append("| model | params | walk | blocks walked | calibration | matmul GFLOP/s | per block: measured · limit "
               "(ratio) | peak RSS MB (runtime) | memory model MB (rest) | peak − largest block MB |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in doc["rows"]:
        out.append(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {'--low-memory' if r['low_memory'] else 'in memory'}"
                   f"{', error correction' if r['error_correction'] else ''} | {r['walked']} of {r['blocks']} | "
                   f"{r['nsamples']}×{r['seqlen']} | {r['rate_gflops']:.1f} | {r['median_block_s']:.1f} s · "
                   f"{r['limit_block_s']:.1f} s ({r['ratio']:.2f}×) | {r['peak_rss_mb']:.0f} ({r['runtime_mb']:.0f}) | "
                   f"{r['predicted_rss_mb']:.0f} ({r['rest_mb']:+.0f}) | {r['over_block_mb']:.0f} |")
    out.append("")
    for r in doc["rows"]:
        if r.get("peak_after_block_mb"):
            out.append(f"- {r['model']}: resident-set peak after each block "
                       + ", ".join(f"{v:.0f}" for v in r["peak_after_block_mb"]) + " MB.")
    out.append("")
    if doc.get("plot"):
        out.append(f"![time per block and peak memory against parameters]({doc['plot']})")
        out.append("")
    out.append(f"**Prediction (not measured).** The FLOP model's limit for SparseGPT with error correction on "
               f"128×2048 calibration tokens, float32 matrix products at an assumed {pred['gpu_tflops']:.0f} TFLOP/s "
               f"per GPU; a GPU as far from its limit as these CPU rows ({pred['ratio']:.2f}×, median) would take "
               f"that many times longer:")
    out.append("")
    out.append("| model | blocks | TFLOP per block | 1 H100 | 8 GPUs (`--nproc 8`, dense-input) | activations "
               "(float32) | largest block |")
    out.append("|---|---|---|---|---|---|---|")
    for g in pred["gpu"]:
        out.append(f"| {g['model']} | {g['blocks']} | {g['tflop_per_block']:.0f} | {g['one_gpu_min']:.0f} min | "
                   f"{g['eight_gpus_min']:.0f} min | {g['activations_gb']:.1f} GB | {g['largest_block_gb']:.1f} GB |")
    out.append("")
    out.append("Commands: " + "; ".join(f"`{r['command']}`" for r in doc["rows"] if r.get("command")) + ".")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("rows", nargs="+", help="JSON files written by bench_whole_model.py --out")
    ap.add_argument("--json", default=None, help="write the report document here")
    ap.add_argument("--plot", default=None, help="write the plot here (PNG)")
    ap.add_argument("--gpu-tflops", type=float, default=50.0, help="assumed float32 matmul rate per GPU")
    args = ap.parse_args(argv)
    rows = []
    for f in args.rows:
        try:
            rows += [row_summary(r) for r in json.loads(Path(f).read_text()) if "cost" in r]
        except (OSError, ValueError, KeyError) as e:
            print(f"scale_report: {f}: {e}", file=sys.stderr)
            return 2
    if not rows:
        print("scale_report: no measured rows with a cost model in the files given", file=sys.stderr)
        return 2
    rows.sort(key=lambda r: r["params"])
    doc = {"rows": rows, "prediction": predictions(rows, args.gpu_tflops), "sources": [Path(f).name for f in args.rows]}
    if args.plot:
        plot(doc, Path(args.plot))
        doc["plot"] = Path(args.plot).name
    print(render_markdown(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
