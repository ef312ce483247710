"""Every production solver against its reference on a ladder of layer sizes, and the
per-layer time of every method on SmolLM2-135M's layer shapes.

Ladders (each climbs until no reference can take the next size — refused by its size limit, or its previous
solve took more than ``--max-ref-s`` or did not prove optimality in ``--time-limit``):

* **refit QP** (``refit_program``, least-squares refit on the Wanda mask): torch ``refit_weights`` vs cvxpy
  (Clarabel) and Gurobi (≤ 200 variables with the pip licence);
* **ℓ1 model** (``l1_program``, FISTAPruner's convex model, λ = 0.05·max|W0 C|): torch ``fista_l1`` (float64,
  converged) vs cvxpy (Clarabel) and Gurobi;
* **L0 MIQP** (``l0_program``) per row 50%, 2:4 and column groups (neurons, 50%): the heuristics
  (magnitude, Wanda, RIA, SparseGPT, FISTA — and their least-squares refit — for masks; group magnitude, FLAP,
  group-OBS and SPAP for groups) vs exhaustive enumeration, Gurobi and SCIP with a time limit;
* **EGGS mask LP** (``mask_program`` over expander 2:4 with B = 1 and 4:8 with B = 2, RIA scores): torch
  ``expander_nm_mask`` vs networkx min-cost flow, cvxpy/HiGHS (the LP is totally unimodular), Gurobi and
  enumeration.

Each row: size, reference time, torch time, speed-up (reference / torch), and the objective gap — convex models
``(f_torch − f_ref)/|f_ref|`` (must be ≤ 1e-6 in size); L0 ``(f_heur − f_ref)/f_ref`` against the proven optimum,
or against the best incumbent when no reference proved one (then also the gap to the best lower bound, an upper
bound on the true gap); masks ``(S_ref − S_torch)/S_ref``. References come from
:func:`optprune.solvers.get_backend`, programs from :mod:`optprune.formulations.programs`.

Instances: ``LayerProblem.random(m, n, kind="outliers")`` in float64 (synthetic Grams; a few input features
20× larger, as in LLM activations; ``--kind`` for the others). The per-layer part uses
SmolLM2-135M's shapes (q/o 576×576, k/v 192×576, up/gate 1536×576, down 576×1536) with **random** weights and
Grams of N = 2048 Gaussian tokens with a few outlier features (timings depend on shapes, not values), or with
``--real-grams`` the Grams of SmolLM2's block 0 from a short C4 calibration (``benchmarks/solvers/fista_layers.py``).

    python benchmarks/solvers/bench_solvers.py                       # ladders + per-layer (random Grams)
    python benchmarks/solvers/bench_solvers.py --sections ladders --quick
    python benchmarks/solvers/bench_solvers.py --sections layers --real-grams --nsamples 8

Writes ``benchmarks/results/bench_solvers.json`` and ``.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from optprune.formulations import ColumnGroups, ExpanderNM, LayerProblem, NM, Unstructured
from optprune.formulations.programs import l0_program, l1_program, mask_program, refit_program
from optprune.solvers import get_backend, get_method, list_methods
from optprune.solvers.base import LayerResult, LicenseLimitError, SolverUnavailable

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
CVXPY_MAX_NNZ = 2e7  # largest m·n² handed to cvxpy for the QP/ℓ1 models (memory of its canonicalisation)

REFIT_SIZES = [(8, 16), (16, 32), (32, 64), (64, 128), (128, 256), (256, 512)]
L1_SIZES = [(4, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, 256)]
L0_SIZES = [(2, 8), (4, 8), (4, 12), (4, 16), (8, 16), (8, 24)]
MASK_SIZES = [(8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (576, 576)]
MASK_METHODS = ("magnitude", "wanda", "ria", "sparsegpt", "fista")
GROUP_METHODS = ("group_magnitude", "flap", "group_obs", "spap")
SMOLLM2_SHAPES = [("q_proj/o_proj", 576, 576), ("k_proj/v_proj", 192, 576), ("up_proj/gate_proj", 1536, 576),
                  ("down_proj", 576, 1536)]


def _t(fn, repeats=1):
    """(result of the last call, min wall time)."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


class Refs:
    """Reference backends with a per-ladder 'exhausted' state."""

    def __init__(self, names, *, time_limit, max_ref_s, threads=1, convex_time_limit=300.0):
        self.names = list(names)
        self.convex_time_limit = convex_time_limit
        self.time_limit = time_limit
        self.max_ref_s = max_ref_s
        self.threads = threads
        self.exhausted = {}
        self.backends = {}
        for n in self.names:
            try:
                b = get_backend(n)
                self.backends[n] = b if b.available() else None
                if not b.available():
                    self.exhausted[n] = "not installed"
            except Exception as e:  # unknown backend
                self.backends[n] = None
                self.exhausted[n] = str(e)

    def active(self):
        return [n for n in self.names if n not in self.exhausted]

    def solve(self, name, prog, **opts) -> dict:
        b = self.backends.get(name)
        label = name + (f"-{opts['solver'].lower()}" if opts.get("solver") else "")
        row = {"reference": label}
        if b is None:
            return {**row, "status": "skipped", "note": self.exhausted.get(name, "unavailable")}
        ok, why = b.supports(prog)
        if ok and name == "cvxpy" and prog.kind in ("QP", "L1") and prog.problem is not None:
            m, n = prog.problem.shape
            if m * n * n > CVXPY_MAX_NNZ:  # cvxpy's factor form holds one n×|S| block per row
                ok, why = False, (f"cvxpy would build a {m}·{n}² ≈ {m * n * n / 1e6:.0f}M-nonzero model (> "
                                  f"{CVXPY_MAX_NNZ / 1e6:.0f}M: at 256×512 it passed 6.8 GB of memory in 5 min without finishing)")
        if not ok:
            self.exhausted[name] = why
            return {**row, "status": "skipped", "note": why}
        if name in ("gurobi", "scip"):
            opts.setdefault("time_limit", self.time_limit)
        elif name == "cvxpy" and prog.kind in ("QP", "L1"):
            opts.setdefault("time_limit", self.convex_time_limit)
        if name == "gurobi":
            opts.setdefault("threads", self.threads)
        try:
            t0 = time.perf_counter()
            r = b.solve(prog, **opts)
            wall = time.perf_counter() - t0
        except (LicenseLimitError, SolverUnavailable) as e:
            self.exhausted[name] = str(e).splitlines()[0]
            return {**row, "status": "skipped", "note": self.exhausted[name]}
        row.update(status=r.status, objective=r.objective, bound=r.bound, proven=bool(r.proven_optimal),
                   time_s=wall, values=r.values, solver=r.solver)
        if not r.proven_optimal and r.status not in ("infeasible",):
            lim = self.convex_time_limit if name == "cvxpy" and prog.kind in ("QP", "L1") else self.time_limit
            self.exhausted[name] = f"no proven optimum ({r.status}) within {lim:g} s at the previous size"
        elif wall > self.max_ref_s:
            self.exhausted[name] = f"previous size took {wall:.0f} s > --max-ref-s {self.max_ref_s:g}"
        return row


KIND = "outliers"  # LayerProblem.random kind of the ladder instances (--kind)


def _problem(m, n, seed):
    return LayerProblem.random(m, n, kind=KIND, seed=seed)


def _strip(r):
    return {k: v for k, v in r.items() if k != "values"}


def _gap(a, ref):
    return (a - ref) / max(abs(ref), 1e-300)


# ------------------------------------------------------------------------------------------------ convex ladders
def ladder_refit(sizes, refs: Refs, repeats, log):
    from optprune.solvers.methods.baselines import refit_weights, wanda
    out = []
    for (m, n) in sizes:
        if not refs.active():
            break
        p = _problem(m, n, seed=m * 1000 + n)
        mask = wanda(p, Unstructured(0.5)).mask
        prog = refit_program(p, mask)
        W, tt = _t(lambda: refit_weights(p, mask), repeats)
        f_torch = p.objective(W * mask)
        for name, opts in (("cvxpy", {"solver": "CLARABEL"}), ("gurobi", {})):
            if name in refs.exhausted:
                continue
            r = refs.solve(name, prog, **opts)
            row = {"ladder": "refit QP", "m": m, "n": n, "variables": prog.n_variables, "torch": "refit_weights",
                   "torch_s": tt, "torch_objective": f_torch, **_strip(r)}
            if r.get("objective") is not None and r["status"] != "skipped" and math.isfinite(r["objective"]):
                row["gap"] = _gap(f_torch, r["objective"])
                row["speedup"] = r["time_s"] / tt
            out.append(row)
            log(row)
    return out


def ladder_l1(sizes, refs: Refs, log):
    from optprune.solvers.methods.fista import fista_l1
    from optprune.solvers.verification import l1_lambda
    out = []
    for (m, n) in sizes:
        if not refs.active():
            break
        p = _problem(m, n, seed=m * 1000 + n + 1)
        lam = l1_lambda(p)
        prog = l1_program(p, lam)
        sol, tt = _t(lambda: fista_l1(p, lam, iters=20000, tol=1e-13))
        f_torch = prog.evaluate({"W": sol.W.to(torch.float64)})
        for name, opts in (("cvxpy", {"solver": "CLARABEL"}), ("gurobi", {})):
            if name in refs.exhausted:
                continue
            r = refs.solve(name, prog, **opts)
            row = {"ladder": "l1 model", "m": m, "n": n, "variables": prog.n_variables, "torch": "fista_l1 (float64)",
                   "torch_s": tt, "torch_objective": f_torch, "torch_iterations": sol.iterations,
                   "torch_converged": sol.converged, "torch_kkt": sol.kkt, "lam": lam, **_strip(r)}
            if r.get("objective") is not None and r["status"] != "skipped" and math.isfinite(r["objective"]):
                row["gap"] = _gap(f_torch, r["objective"])
                row["speedup"] = r["time_s"] / tt
            out.append(row)
            log(row)
    return out


# ------------------------------------------------------------------------------------------------ L0 ladder
def _l0_heuristics(pattern):
    from optprune.solvers.methods.baselines import refit_result
    avail = set(list_methods())
    if isinstance(pattern, ColumnGroups):
        for name in GROUP_METHODS:
            if name in avail:
                yield name, (lambda p, pat, name=name: get_method(name)(p, pat))
        return
    for name in MASK_METHODS:
        if name not in avail:
            continue
        yield name, (lambda p, pat, name=name: get_method(name)(p, pat))
        yield name + "+refit", (lambda p, pat, name=name: refit_result(p, get_method(name)(p, pat)))


def ladder_l0(sizes, patterns, ref_names, *, time_limit, max_ref_s, threads, repeats, log):
    out = []
    for pat_name, make in patterns:
        refs = Refs(ref_names, time_limit=time_limit, max_ref_s=max_ref_s, threads=threads)
        for (m, n) in sizes:
            if not refs.active():
                break
            pat = make(n)
            p = _problem(m, n, seed=m * 1000 + n + 2)
            try:
                prog = l0_program(p, pat)
            except ValueError as e:
                log({"ladder": f"L0 {pat_name}", "m": m, "n": n, "status": "skipped", "note": str(e)})
                continue
            rr = []
            for name in list(refs.active()):
                rr.append(refs.solve(name, prog))
            solved = [r for r in rr if r.get("objective") is not None and r["status"] != "skipped"
                      and math.isfinite(r["objective"]) and prog.check(r["values"])["feasible"]]
            proven = [r for r in solved if r["proven"]]
            pool = proven or solved
            best = None
            if pool:  # the lowest objective; among equal ones (1e-9 relative) the first reference (enumeration)
                lo = min(r["objective"] for r in pool)
                best = next(r for r in pool if r["objective"] <= lo + 1e-9 * max(abs(lo), 1e-300))
            bounds = [r["bound"] for r in rr if r.get("bound") is not None and math.isfinite(r["bound"])]
            lb = max(bounds) if bounds else None
            if proven:
                lb = best["objective"]
            refrow = {"ladder": f"L0 {pat_name}", "m": m, "n": n, "variables": prog.n_variables,
                      "references": [_strip(r) for r in rr],
                      "ref_objective": best["objective"] if best else None, "ref_proven": bool(proven),
                      "ref_solver": best["reference"] if best else None, "ref_time_s": best["time_s"] if best else None,
                      "lower_bound": lb, "heuristics": []}
            for hname, fn in _l0_heuristics(pat):
                try:
                    res, tt = _t(lambda: fn(p, pat), repeats)
                except ValueError as e:
                    refrow["heuristics"].append({"method": hname, "status": "skipped", "note": str(e)[:100]})
                    continue
                f = p.objective(res.W.to(torch.float64) * res.mask)
                feas = bool(pat.is_feasible(res.mask.to(torch.bool)))
                h = {"method": hname, "time_s": tt, "objective": f, "feasible": feas}
                if best is not None:
                    h["gap"] = _gap(f, best["objective"])
                    h["speedup"] = best["time_s"] / tt
                    h["beats_proven_optimum"] = bool(proven and f < best["objective"] * (1 - 1e-9))
                if lb is not None and lb > 0:
                    h["gap_to_bound"] = _gap(f, lb)
                refrow["heuristics"].append(h)
            out.append(refrow)
            log(refrow)
    return out


# ------------------------------------------------------------------------------------------------ EGGS ladder
def ladder_mask(sizes, patterns, ref_names, *, time_limit, max_ref_s, threads, repeats, log):
    from optprune.solvers.methods.baselines import ria_scores
    from optprune.solvers.methods.eggs import expander_nm_mask
    out = []
    for (N, M, B) in patterns:
        refs = Refs(ref_names, time_limit=time_limit, max_ref_s=max_ref_s, threads=threads)
        for (m, n) in sizes:
            if m % M or n % M:
                continue
            if not refs.active():
                break
            p = _problem(m, n, seed=m * 1000 + n + 3)
            S = ria_scores(p).to(torch.float64)
            pat = ExpanderNM(N, M, B)
            prog = mask_program(S, pat)
            mask, tt = _t(lambda: expander_nm_mask(S, N, M, B), repeats)
            s_torch = float((S * mask).sum())
            feas = bool(pat.is_feasible(mask.to(torch.bool)))
            for name in list(refs.active()):
                opts = {"solver": "HIGHS"} if name == "cvxpy" else {}
                r = refs.solve(name, prog, **opts)
                row = {"ladder": f"EGGS mask {N}:{M} B={B}", "m": m, "n": n, "variables": prog.n_variables,
                       "torch": "expander_nm_mask", "torch_s": tt, "torch_score": s_torch, "torch_feasible": feas,
                       **_strip(r)}
                if r.get("values") and "z" in r["values"]:
                    s_ref = float((S * r["values"]["z"].to(torch.float64)).sum())
                    row["ref_score"] = s_ref
                    row["gap"] = (s_ref - s_torch) / max(abs(s_ref), 1e-300)
                    row["speedup"] = r["time_s"] / tt
                out.append(row)
                log(row)
    return out


# ------------------------------------------------------------------------------------------------ per layer
def random_layer(m, n, seed=0, N=2048):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g)
    X[:, torch.randperm(n, generator=g)[: max(1, n // 32)]] *= 10.0  # LLM-like outlier features
    W0 = torch.randn(m, n, generator=g) * n ** -0.5
    return LayerProblem.from_activations(W0, X, dtype=torch.float32, name=f"random-{m}x{n}")


def per_layer(methods, repeats, real_grams, nsamples, seqlen, log):
    """Time of every method on SmolLM2-135M's layer shapes."""
    rows = []
    probs = {}
    if real_grams:
        sys.path.insert(0, str(REPO / "benchmarks" / "solvers"))
        from fista_layers import collect
        real = collect("smollm2-135m", [0], nsamples, seqlen)
        pick = {"q_proj/o_proj": "self_attn.q_proj", "k_proj/v_proj": "self_attn.k_proj",
                "up_proj/gate_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
        for label, m, n in SMOLLM2_SHAPES:
            key = next(k for k in real if k.endswith(pick[label]))
            probs[label] = (real[key], f"real: SmolLM2 block-0 {pick[label]} Gram, {nsamples}×{seqlen} C4 tokens")
        o = next(k for k in real if k.endswith("self_attn.o_proj"))
        probs["o_proj (heads)"] = (real[o], "real: SmolLM2 block-0 o_proj")
    else:
        for label, m, n in SMOLLM2_SHAPES:
            probs[label] = (random_layer(m, n), "random weights, Gram of 2048 Gaussian tokens with outlier features")
        probs["o_proj (heads)"] = (random_layer(576, 576, seed=1), probs["q_proj/o_proj"][1])
    for label, (p, how) in probs.items():
        m, n = p.shape
        for meth in methods:
            spec = get_method(meth)
            if spec.structured:
                if label == "down_proj":
                    pat, pl = ColumnGroups(1, sparsity=0.3), "30% neurons (1536 groups)"
                elif label == "o_proj (heads)":
                    pat, pl = ColumnGroups(64, sparsity=1 / 3), "3 of 9 heads (groups of 64)"
                else:
                    continue
            else:
                if label == "o_proj (heads)":
                    continue
                if meth == "eggs":
                    pat, pl = NM(2, 4), "2:4 (B=1)"
                else:
                    pat, pl = Unstructured(0.5), "50% unstructured"
            try:
                res, tt = _t(lambda: spec(p, pat), repeats)
                f = p.objective(res.W * res.mask)
                row = {"shape": label, "m": m, "n": n, "method": meth, "pattern": pl, "time_s": tt,
                       "rel_error": f / max(p.constant(), 1e-300), "inputs": how}
            except Exception as e:  # report, keep going
                row = {"shape": label, "m": m, "n": n, "method": meth, "pattern": pl, "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            log(row)
    return rows


# ------------------------------------------------------------------------------------------------ output
def _f(v, spec):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def render_markdown(doc, level=2) -> str:
    h = "#" * level
    meta = doc["meta"]
    out = [f"{h} Solvers against their references", ""]
    out.append(f"Hardware: {meta['hardware']}; torch {meta['torch']}, {meta['threads']} torch thread(s); MIQP time "
               f"limit {meta['time_limit']} s, ladders stop when a reference's solve exceeds {meta['max_ref_s']} s. "
               f"Instances: `LayerProblem.random(m, n, kind='{meta.get('kind', 'outliers')}')`, float64. Command: `{meta['command']}`.")
    out.append("")
    conv = [r for r in doc.get("ladders", []) if r["ladder"] in ("refit QP", "l1 model")]
    if conv:
        out.append(f"{h}# Convex models (refit QP, FISTAPruner's ℓ1 model): torch vs reference")
        out.append("")
        out.append("| model | m×n | variables | reference | ref status | ref s | torch | torch s | speed-up | "
                   "rel. objective gap |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in conv:
            if r.get("status") == "skipped":
                out.append(f"| {r['ladder']} | {r['m']}×{r['n']} | {r['variables']} | {r['reference']} | skipped: "
                           f"{r.get('note', '')[:90]} | | | | | |")
                continue
            out.append(f"| {r['ladder']} | {r['m']}×{r['n']} | {r['variables']} | {r.get('solver', r['reference'])} | "
                       f"{r['status']} | {_f(r.get('time_s'), '.3f')} | {r['torch']} | {_f(r['torch_s'], '.4f')} | "
                       f"{_f(r.get('speedup'), '.0f')}× | {_f(r.get('gap'), '+.1e')} |")
        out.append("")
    l0 = [r for r in doc.get("ladders", []) if r["ladder"].startswith("L0")]
    if l0:
        out.append(f"{h}# L0 / group MIQP: heuristics vs the exact optimum")
        out.append("")
        out.append("Gap = (f_heuristic − f_ref)/f_ref; f_ref is the proven optimum (enumeration or Gurobi) where "
                   "'proven' says yes, else the best incumbent of a time-limited solve (gap to the best lower bound "
                   "in brackets, an upper bound on the true gap). Speed-up = reference time / heuristic time.")
        out.append("")
        for r in l0:
            if r["ref_objective"] is None:
                why = "; ".join(f"{x['reference']}: {x.get('note') or x['status']}" for x in r["references"])
                out.append(f"**{r['ladder']}, {r['m']}×{r['n']}** ({r['variables']} variables) — no reference solves "
                           f"this size ({why or 'all exhausted at smaller sizes'}); the ladder ends here.")
                out.append("")
                continue
            refs = ", ".join(f"{x['reference']} {x['status']}"
                             + (f" {x['time_s']:.2f} s" if x.get("time_s") is not None else "")
                             + (f" ({x['note'][:60]})" if x.get("note") else "") for x in r["references"])
            out.append(f"**{r['ladder']}, {r['m']}×{r['n']}** ({r['variables']} variables) — f_ref "
                       f"{_f(r['ref_objective'], '.6g')} by {r['ref_solver']} in {_f(r['ref_time_s'], '.2f')} s, "
                       f"proven: {'yes' if r['ref_proven'] else 'no'}; references: {refs}")
            out.append("")
            out.append("| heuristic | time s | speed-up | gap | feasible |")
            out.append("|---|---|---|---|---|")
            for hh in r["heuristics"]:
                if hh.get("status") == "skipped":
                    out.append(f"| {hh['method']} | skipped: {hh['note']} | | | |")
                    continue
                gap = _f(hh.get("gap"), "+.2e")
                if not r["ref_proven"] and hh.get("gap_to_bound") is not None:
                    gap += f" (≤ {_f(hh['gap_to_bound'], '.2e')} to bound)"
                out.append(f"| {hh['method']} | {_f(hh['time_s'], '.4f')} | {_f(hh.get('speedup'), '.0f')}× | {gap} | "
                           f"{'yes' if hh['feasible'] else 'NO'} |")
            out.append("")
    mk = [r for r in doc.get("ladders", []) if r["ladder"].startswith("EGGS")]
    if mk:
        out.append(f"{h}# EGGS expander N:M mask: torch vs flow / LP")
        out.append("")
        out.append("| pattern | m×n | variables | reference | status | ref s | torch s | speed-up | score gap | torch feasible |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in mk:
            if r.get("status") == "skipped":
                out.append(f"| {r['ladder'][10:]} | {r['m']}×{r['n']} | {r['variables']} | {r['reference']} | "
                           f"skipped: {r.get('note', '')[:80]} | | | | | |")
                continue
            out.append(f"| {r['ladder'][10:]} | {r['m']}×{r['n']} | {r['variables']} | {r.get('solver', r['reference'])} "
                       f"| {r['status']} | {_f(r.get('time_s'), '.3f')} | {_f(r['torch_s'], '.4f')} | "
                       f"{_f(r.get('speedup'), '.0f')}× | {_f(r.get('gap'), '+.1e')} | "
                       f"{'yes' if r['torch_feasible'] else 'NO'} |")
        out.append("")
    lay = doc.get("layers") or []
    if lay:
        how = sorted({r.get("inputs", "") for r in lay if r.get("inputs")})
        out.append(f"{h}# Per-layer time on SmolLM2-135M's layer shapes")
        out.append("")
        out.append(f"Inputs: {'; '.join(how)}. float32, {meta['threads']} torch thread(s), best of "
                   f"{meta['layer_repeats']}.")
        out.append("")
        shapes = []
        for r in lay:
            if r["shape"] not in shapes:
                shapes.append(r["shape"])
        methods = []
        for r in lay:
            if r["method"] not in methods:
                methods.append(r["method"])
        out.append("| method | pattern | " + " | ".join(f"{s} s" for s in shapes) + " |")
        out.append("|---|---|" + "---|" * len(shapes))
        for meth in methods:
            rs = {r["shape"]: r for r in lay if r["method"] == meth}
            pl = next(iter(rs.values()))["pattern"]
            cells = []
            for s in shapes:
                r = rs.get(s)
                cells.append("" if r is None else ("error" if r.get("error") else _f(r["time_s"], ".3f")))
            out.append(f"| {meth} | {pl} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="ladders,layers", help="ladders, layers (comma list)")
    ap.add_argument("--ladders", default="refit,l1,l0,mask")
    ap.add_argument("--quick", action="store_true", help="the first sizes of each ladder only")
    ap.add_argument("--time-limit", type=float, default=20.0, help="per MIQP solve (Gurobi/SCIP)")
    ap.add_argument("--max-ref-s", type=float, default=60.0, help="stop a reference's ladder after a slower solve")
    ap.add_argument("--convex-time-limit", type=float, default=300.0, help="per cvxpy QP/ℓ1 solve")
    ap.add_argument("--repeats", type=int, default=3, help="torch solvers: best of R (references run once)")
    ap.add_argument("--layer-repeats", type=int, default=1)
    ap.add_argument("--methods", default=None, help="per-layer: comma list (default every registered method)")
    ap.add_argument("--real-grams", action="store_true", help="per-layer: SmolLM2 block-0 Grams (loads the model)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kind", default="outliers", choices=["random", "correlated", "outliers", "dead"],
                    help="ladder instances: LayerProblem.random kind (outliers: a few inputs 20× larger, LLM-like)")
    ap.add_argument("--out", default=str(RESULTS / "bench_solvers.json"))
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON at --out")
    args = ap.parse_args(argv)
    if args.render:
        out = Path(args.out)
        out.with_suffix(".md").write_text(render_markdown(json.loads(out.read_text())) + "\n")
        print(f"wrote {out.with_suffix('.md')}")
        return 0
    torch.set_num_threads(args.threads)
    global KIND
    KIND = args.kind
    secs = set(args.sections.split(","))
    lad = set(args.ladders.split(","))
    cut = (lambda s: s[:2]) if args.quick else (lambda s: s)
    t_start = time.perf_counter()

    def log(r):
        if "heuristics" in r:
            hs = ", ".join(f"{h['method']} {_f(h.get('gap'), '+.1e')}" for h in r["heuristics"] if "gap" in h)
            print(f"{r['ladder']:18s} {r['m']}×{r['n']}: ref {_f(r['ref_objective'], '.6g')} ({r['ref_solver']}, "
                  f"proven {r['ref_proven']}, {_f(r['ref_time_s'], '.2f')} s) | {hs}", flush=True)
        elif "ladder" in r:
            print(f"{r['ladder']:18s} {r['m']}×{r['n']}: {r.get('reference')} {r.get('status')} "
                  f"{_f(r.get('time_s'), '.3f')} s vs torch {_f(r.get('torch_s'), '.4f')} s, gap {_f(r.get('gap'), '+.1e')}"
                  + (f" ({r.get('note')})" if r.get("note") else ""), flush=True)
        else:
            print(f"layer {r['shape']:18s} {r['method']:16s} {r['pattern']:28s} "
                  f"{_f(r.get('time_s'), '.3f')} s" + (f" {r['error']}" if r.get("error") else ""), flush=True)

    doc = {"ladders": [], "layers": []}
    if "ladders" in secs:
        if "refit" in lad:
            doc["ladders"] += ladder_refit(cut(REFIT_SIZES), Refs(["cvxpy", "gurobi"], time_limit=args.time_limit,
                                                                  max_ref_s=args.max_ref_s,
                                                                  convex_time_limit=args.convex_time_limit), args.repeats, log)
        if "l1" in lad:
            doc["ladders"] += ladder_l1(cut(L1_SIZES), Refs(["cvxpy", "gurobi"], time_limit=args.time_limit,
                                                            max_ref_s=args.max_ref_s,
                                                            convex_time_limit=args.convex_time_limit), log)
        if "l0" in lad:
            pats = [("per-row 50%", lambda n: Unstructured(0.5, "row")), ("2:4", lambda n: NM(2, 4)),
                    ("groups 50%", lambda n: ColumnGroups(1, sparsity=0.5))]
            doc["ladders"] += ladder_l0(cut(L0_SIZES), pats, ["enumerate", "gurobi", "scip"],
                                        time_limit=args.time_limit, max_ref_s=args.max_ref_s, threads=args.threads,
                                        repeats=args.repeats, log=log)
        if "mask" in lad:
            doc["ladders"] += ladder_mask(cut(MASK_SIZES), [(2, 4, 1), (4, 8, 2)],
                                          ["flow", "cvxpy", "gurobi", "enumerate"], time_limit=args.time_limit,
                                          max_ref_s=args.max_ref_s, threads=args.threads, repeats=args.repeats,
                                          log=log)
    if "layers" in secs:
        methods = args.methods.split(",") if args.methods else [m for m in list_methods() if m != "refit"] + ["refit"]
        doc["layers"] = per_layer(methods, args.layer_repeats, args.real_grams, args.nsamples, args.seqlen, log)
    hw = f"{platform.machine()} {platform.processor() or ''}".strip()
    try:
        import os
        hw += f", {os.cpu_count()} CPU cores"
    except Exception:
        pass
    if torch.cuda.is_available():
        hw += f", {torch.cuda.get_device_name(0)} (unused: CPU solvers)"
    cmd = "python benchmarks/solvers/bench_solvers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc["meta"] = {"kind": args.kind, "hardware": hw, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "time_limit": args.time_limit, "max_ref_s": args.max_ref_s, "repeats": args.repeats,
                   "layer_repeats": args.layer_repeats, "quick": args.quick, "command": cmd.strip(),
                   "wall_s": time.perf_counter() - t_start, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    md = render_markdown(doc)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md)
    print(f"wrote {out} and {out.with_suffix('.md')} ({doc['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
