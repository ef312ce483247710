"""Slicing the hidden dimension: perplexity and parameter count of each variant, on one set of statistics.

The model is loaded once and the residual statistics are collected once (``llm_adapters/hidden.py``); each
variant is a copy of the dense model sliced by its maps and evaluated on the same WikiText-2 windows as the
dense model. Variants (``--variants``):

* ``rotation`` — the global rotation (``slicegpt``), stock config (tied head: the diagonal approximation);
* ``rotation-untied`` — the same rotation with an exact, untied head (``V·k`` more parameters; not what
  ``--structure hidden`` saves — it measures what the tied head's approximation costs);
* ``selection:METHOD`` — hidden-channel selection by a structured method (``group_obs``, ``spap``, ...).

One JSON line per (variant, sparsity); lines already in ``--out`` are skipped (an interrupted run resumes).

    python benchmarks/structured/hidden_slicing.py --model smollm2-135m --sparsities 0.25,0.5 \\
        --variants rotation,rotation-untied,selection:group_obs --nsamples 32 --eval-windows 8 \\
        --out benchmarks/results/hidden_smollm2.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--sparsities", default="0.25,0.5", help="fractions of the hidden width removed")
    ap.add_argument("--variants", default="rotation,rotation-untied,selection:group_obs")
    ap.add_argument("--calibration", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/hidden_smollm2.jsonl")
    a = ap.parse_args(argv)

    import torch
    from optprune.llm_adapters import data as D
    from optprune.llm_adapters.evaluation import perplexity
    from optprune.llm_adapters.hidden import (_maps, count_parameters, hidden_plan, hidden_width,
                                              residual_statistics, slice_hidden, stream_problem)
    from optprune.llm_adapters.loading import load_model
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["variant"], r["sparsity"]))
    model, tok, _ = load_model(a.model, model_dir=a.model_dir)
    ev = D.eval_tokens(tok, "wikitext2", seqlen=a.eval_seqlen, data_dir=a.data_dir)

    def ppl(m):
        return perplexity(m, ev, a.eval_seqlen, max_windows=a.eval_windows, progress=False)["ppl"]

    common = {"model": a.model, "calibration": f"{a.calibration} {a.nsamples}x{a.seqlen} seed 0",
              "eval": f"wikitext2 first {a.eval_windows} windows of {a.eval_seqlen}"}

    def write(rec):
        with open(out, "a") as fh:
            fh.write(json.dumps({**common, **rec}) + "\n")
        print(json.dumps(rec), flush=True)

    if ("dense", 0.0) not in done:
        t0 = time.perf_counter()
        write({"variant": "dense", "sparsity": 0.0, "hidden": model.config.hidden_size,
               "params": count_parameters(model), "ppl": ppl(model), "time_s": time.perf_counter() - t0})
    calib = D.calibration_tokens(tok, a.calibration, nsamples=a.nsamples, seqlen=a.seqlen, seed=0,
                                 data_dir=a.data_dir)
    t0 = time.perf_counter()
    stats = residual_statistics(model, calib)
    t_stats = time.perf_counter() - t0
    plan = hidden_plan(model)
    problem = stream_problem(stats)
    for s in [float(x) for x in a.sparsities.split(",")]:
        k = hidden_width(plan["d"], s, plan["heads"])
        for v in a.variants.split(","):
            if (v, s) in done:
                continue
            method = "slicegpt" if v.startswith("rotation") else v.split(":", 1)[1]
            t0 = time.perf_counter()
            U, T, res, form = _maps(model, method, problem, k, {})
            W = T @ U.T
            m = copy.deepcopy(model)
            info = slice_hidden(m, stats, U, T, untie=v == "rotation-untied")
            write({"variant": v, "sparsity": s, "hidden": k, "form": form, "params": count_parameters(m),
                   "lost_energy": 2 * problem.objective(W) / float(torch.trace(problem.H)),
                   "tied_head_rel_misfit": info["tied_head_rel_misfit"], "ppl": ppl(m),
                   "statistics_s": t_stats, "time_s": time.perf_counter() - t0})
            del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
