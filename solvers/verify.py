"""The cross-check harness (docs/methods.md §6): every applicable (model, backend) pair on small layers.

``verify()`` / ``optprune verify`` builds small instances — ``LayerProblem.random`` kinds random, correlated,
outliers and dead (with and without error correction) and slices of a real layer of stories260K — and solves
on each:

* **refit QP** (least-squares refit on the Wanda mask): cvxpy (Clarabel; OSQP, SCS in the full run), Gurobi
  (when the licence takes it) vs the production torch refit (``baselines.refit_weights``);
* **ℓ1 model** (FISTAPruner's ``min f + λ‖W‖₁``): cvxpy, Gurobi, SCIP (full run) and every torch ℓ1 solver
  registered through :func:`register_l1_solver` (or exposed as ``<method fn>.l1_solver``) — the extension point
  for the FISTA method;
* **L0 MIQP** for unstructured / per-row / 2:4 / column groups: exhaustive enumeration (the reference optimum),
  Gurobi, SCIP vs every registered production method that accepts the pattern (magnitude, Wanda, RIA,
  SparseGPT, … and later methods), each also followed by the exact refit;
* **mask programs** (``max Σ S z`` over 2:4 and expander 2:4 masks, Wanda scores): LP relaxation (cvxpy/HiGHS),
  Gurobi, SCIP, enumeration vs the pattern's torch projection.

Each row: instance, inputs, model, backend, objective, relative gap to the reference optimum, feasibility
(``Program.check``), proven optimality, time and a ``check`` verdict:

* convex models: every proven solve and the torch solver agree with the best value to ≤ 1e-6 (relative);
* exact combinatorial models: proven optima equal the enumeration optimum to ≤ 1e-6 (relative);
* heuristics and non-proven solves: feasible and never below the proven optimum (−1e-9 slack);
* refits: the refit never increases the error of the mask it refits.

A backend that is absent or cannot take a model (Gurobi's size-limited licence) gives a ``skipped`` row with
the reason. ``quick=True`` is the < 1 minute set.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..formulations.patterns import NM, ColumnGroups, ExpanderNM, Pattern, Unstructured
from ..formulations.problem import LayerProblem
from ..formulations.programs import Program, l0_program, l1_program, mask_program, refit_program
from .base import LicenseLimitError, SolverUnavailable
from .registry import get_backend, get_method, list_backends, list_methods, _METHODS

__all__ = ["verify", "register_l1_solver", "L1_SOLVERS", "VerificationError", "build_instances", "Instance",
           "CONVEX_RTOL", "EXACT_RTOL"]

CONVEX_RTOL = 1e-6   # convex models: relative objective agreement
EXACT_RTOL = 1e-6    # exact combinatorial models: same optimum (relative)
NEVER_BEAT = 1e-9    # a feasible point may not beat the proven optimum by more than this (relative)

#: torch solvers of the ℓ1 model: name -> fn(problem, lam) -> W (the ℓ1 minimiser, not rounded)
L1_SOLVERS: dict[str, Callable] = {}


def register_l1_solver(name: str):
    """Register a torch solver of FISTAPruner's convex ℓ1 model for the cross-check (decorator)."""
    def deco(fn):
        L1_SOLVERS[name] = fn
        return fn
    return deco


class VerificationError(RuntimeError):
    """Some cross-check failed (``optprune verify`` exits non-zero)."""


# ------------------------------------------------------------------------------------------------ instances
@dataclass
class Instance:
    name: str
    problem: LayerProblem
    inputs: str  # how X (and X̂) were obtained
    models: tuple = ("refit", "l1", "l0", "mask")
    l0_backends: tuple = ("enumerate", "gurobi", "scip")
    patterns: Optional[list] = None
    meta: dict = field(default_factory=dict)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _model_dir(model_dir=None) -> Path:
    return Path(model_dir or os.environ.get("OPTPRUNE_MODEL_DIR") or _home() / "models")


def _data_dir(data_dir=None) -> Path:
    return Path(data_dir or os.environ.get("OPTPRUNE_DATA_DIR") or _home() / "data")


def _home() -> Path:  # the llm_adapters' default folder (solvers do not import llm_adapters)
    d = os.environ.get("OPTPRUNE_CACHE_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "optprune"


def _stories_inputs(model_dir: Path, data_dir: Path, seed: int, ntok: int = 512):
    """Block-0 inputs of stories260K: RMSNorm(embed(tokens)) · input_layernorm — exact inputs of q/k/v.

    Tokens: the TinyStories sample through the model's tokenizer (``tokenizers`` package) when both exist,
    otherwise seeded random token ids. Returns ``(tensors, X, how)``; never imports transformers.
    """
    from safetensors.torch import load_file
    d = model_dir / "stories260K"
    st = load_file(str(d / "model.safetensors"))
    emb = st["model.embed_tokens.weight"].to(torch.float64)
    how = None
    ids = None
    tok_file, text_file = d / "tokenizer.json", data_dir / "tinystories" / "tinystories_sample.txt"
    if tok_file.exists() and text_file.exists():
        try:
            from tokenizers import Tokenizer
            ids = Tokenizer.from_file(str(tok_file)).encode(text_file.read_text()).ids[:ntok]
            how = f"real: block-0 q/k/v inputs of {len(ids)} TinyStories tokens"
        except ImportError:
            ids = None
    if ids is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, emb.shape[0], (ntok,), generator=g).tolist()
        how = f"block-0 inputs of {ntok} random token ids"
    x = emb[torch.tensor(ids)]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * st["model.layers.0.input_layernorm.weight"].double()
    return st, x, how


def build_instances(quick: bool = False, seed: int = 0, model_dir=None, data_dir=None) -> tuple[list, list]:
    """The instance list and notes (e.g. why the real-layer slices are missing)."""
    notes = []
    inst = []
    m, n = (4, 8)
    for kind, corr in (("random", False), ("correlated", True), ("outliers", False), ("dead", True)):
        p = LayerProblem.random(m, n, kind=kind, corrected=corr, seed=seed)
        inst.append(Instance(f"{kind}{'+ec' if corr else ''} {m}x{n}", p,
                             f"synthetic {kind}{', error-corrected X̂' if corr else ''}"))
    # SCIP is slow on the 4×8 MIQPs (big-M relaxations; 2–30 s each): the quick run gives it only the tiny
    # 2×8 instance, the full run also two of the 4×8 ones and one real slice
    for it in inst:
        if quick or it.name.startswith(("correlated", "outliers")):
            it.l0_backends = ("enumerate", "gurobi")
    p = LayerProblem.random(2, 8, kind="random", seed=seed + 1)
    inst.append(Instance("random 2x8", p, "synthetic random", models=("l0",),
                         l0_backends=("enumerate", "gurobi", "scip")))
    if not quick:
        for kind, corr in (("random", True), ("correlated", False), ("outliers", True), ("dead", False)):
            p = LayerProblem.random(6, 8, kind=kind, corrected=corr, seed=seed + 1)
            inst.append(Instance(f"{kind}{'+ec' if corr else ''} 6x8", p,
                                 f"synthetic {kind}{', error-corrected X̂' if corr else ''}",
                                 l0_backends=("enumerate", "gurobi")))
        p = LayerProblem.random(8, 12, kind="random", corrected=True, seed=seed + 2)
        inst.append(Instance("random+ec 8x12", p, "synthetic random, error-corrected X̂",
                             l0_backends=("enumerate", "gurobi")))
        p = LayerProblem.random(12, 16, kind="outliers", seed=seed + 3)
        inst.append(Instance("outliers 12x16", p, "synthetic outliers", models=("l0",), patterns=[NM(2, 4)]))
        p = LayerProblem.random(64, 128, kind="correlated", corrected=True, seed=seed + 4)
        inst.append(Instance("correlated+ec 64x128", p, "synthetic correlated, error-corrected X̂",
                             models=("refit",)))
    try:
        st, X, how = _stories_inputs(_model_dir(model_dir), _data_dir(data_dir), seed)
        Wq = st["model.layers.0.self_attn.q_proj.weight"].to(torch.float64)
        full = LayerProblem.from_activations(Wq, X, name="stories260K.layers.0.q_proj")
        inst.append(Instance("stories q_proj[0:4,0:8]", full.slice(slice(0, 4), torch.arange(8)), how))
        inst.append(Instance("stories q_proj 64x64", full, how, models=("refit",)))
        Wd = st["model.layers.0.mlp.down_proj.weight"].to(torch.float64)
        g = torch.Generator().manual_seed(seed)
        Xr = torch.randn(256, Wd.shape[1], generator=g, dtype=torch.float64)
        dn = LayerProblem.from_activations(Wd, Xr, name="stories260K.layers.0.down_proj")
        inst.append(Instance("stories down_proj[0:4,0:8]", dn.slice(slice(0, 4), torch.arange(8)),
                             "real weights, random-input Gram (256 Gaussian tokens)"))
        for it in inst[-3:]:
            if quick or it.name.startswith("stories down"):
                it.l0_backends = ("enumerate", "gurobi")
        if not quick:
            inst.append(Instance("stories q_proj[0:8,0:12]", full.slice(slice(0, 8), torch.arange(12)), how,
                                 models=("refit", "l1", "l0"), l0_backends=("enumerate", "gurobi")))
    except (ImportError, FileNotFoundError, OSError, KeyError) as e:
        notes.append(f"stories260K slices skipped: {type(e).__name__}: {e}")
    return inst, notes


def _l0_patterns(n: int) -> list[Pattern]:
    return [Unstructured(0.5), Unstructured(0.5, "row"), NM(2, 4), ColumnGroups(2, sparsity=0.5)]


def _pattern_kind(p: Pattern) -> str:
    if isinstance(p, ExpanderNM):
        return "expander"
    if isinstance(p, NM):
        return "nm"
    if isinstance(p, ColumnGroups):
        return "groups"
    return "row" if p.scope == "row" else "unstructured"


# ------------------------------------------------------------------------------------------------ running
class _Runner:
    def __init__(self, gurobi, time_limit, quick, threads=None):
        self.threads = threads
        self.rows: list[dict] = []
        self.gurobi = gurobi
        self.time_limit = time_limit
        self.quick = quick
        self._avail = {}

    def backend(self, name):
        if name not in self._avail:
            if name not in list_backends():
                self._avail[name] = (None, f"backend {name!r} not registered")
            else:
                b = get_backend(name)
                self._avail[name] = (b, "" if b.available() else f"{name}: package not installed")
        return self._avail[name]

    def add(self, inst, model, backend, *, objective=float("nan"), feasible=None, proven=None, time_s=None,
            status="", note="", role="solver", extra=None):
        row = {"instance": inst.name, "inputs": inst.inputs, "model": model, "backend": backend,
               "objective": objective, "gap": float("nan"), "feasible": feasible, "proven_optimal": proven,
               "time_s": time_s, "status": status, "note": note, "role": role, "check": ""}
        if extra:
            row.update(extra)
        self.rows.append(row)
        return row

    def solve(self, inst, model, name, program, role="exact", **opts):
        if name == "gurobi" and self.gurobi is False:
            return self.add(inst, model, name, status="skipped", note="Gurobi disabled (gurobi=False)", role=role)
        b, why = self.backend(name)
        if b is None or why:
            return self.add(inst, model, name, status="skipped", note=why, role=role)
        ok, why = b.supports(program)
        if not ok:
            return self.add(inst, model, name, status="skipped", note=why, role=role)
        if name == "gurobi" and self.threads:
            opts.setdefault("threads", self.threads)
        try:
            r = b.solve(program, **opts)
        except (LicenseLimitError, SolverUnavailable) as e:
            return self.add(inst, model, name, status="skipped", note=str(e), role=role)
        except Exception as e:  # a backend crash is a failed row, not a crashed harness
            return self.add(inst, model, name, status="error", note=f"{type(e).__name__}: {str(e)[:90]}",
                            role=role, proven=False)
        label = r.solver if name == "cvxpy" else name
        if not r.values:
            return self.add(inst, model, label, status=r.status, time_s=r.time, note=str(r.info.get("error", "")),
                            role=role, proven=False)
        chk = program.check(r.values)
        note = ""
        if r.gap is not None and not r.proven_optimal:
            note = f"gap {r.gap:.2e}"
        if "bigm_max_ratio" in r.info:
            note = (note + "; " if note else "") + f"big-M use {r.info['bigm_max_ratio']:.2f}"
        return self.add(inst, model, label, objective=r.objective, feasible=chk["feasible"], proven=r.proven_optimal,
                        time_s=r.time, status=r.status, note=note, role=role)


def _finish_group(rows: list[dict], kind: str) -> None:
    """Relative gaps to the reference optimum and the check verdicts for one (instance, model) group."""
    proven = [r["objective"] for r in rows if r["proven_optimal"] and r["status"] != "skipped"
              and math.isfinite(r["objective"])]
    refs = [r for r in rows if r["role"] == "reference" and r["proven_optimal"]]
    if kind == "convex":
        cands = proven + [r["objective"] for r in rows if r["role"] == "torch" and math.isfinite(r["objective"])]
        ref = min(cands) if cands and proven else None
    else:
        ref = refs[0]["objective"] if refs else (min(proven) if proven else None)
    for r in rows:
        if r["status"] == "skipped":
            r["check"] = "skipped"
            continue
        if ref is None or not math.isfinite(r["objective"]):
            r["check"] = "no reference" if ref is None else "FAIL: no solution"
            continue
        gap = (r["objective"] - ref) / max(abs(ref), 1e-12)
        r["gap"] = gap
        fails = []
        if r["feasible"] is False:
            fails.append("infeasible")
        if kind == "convex":
            if (r["proven_optimal"] or r["role"] == "torch") and abs(gap) > CONVEX_RTOL:
                fails.append(f"|gap| {abs(gap):.1e} > {CONVEX_RTOL:g}")
        else:
            if r["proven_optimal"] and abs(gap) > EXACT_RTOL:
                fails.append(f"proven optimum differs by {gap:.1e}")
            if gap < -NEVER_BEAT:
                fails.append(f"beats the proven optimum by {-gap:.1e}")
        if r.get("refit_before") is not None and r["objective"] > r["refit_before"] * (1 + 1e-12) + 1e-12:
            fails.append("refit increased the error")
        r["check"] = ("FAIL: " + ", ".join(fails)) if fails else ("ref" if r["role"] == "reference" else "ok")


def _run_refit(R: _Runner, inst: Instance):
    from .baselines import refit_weights, wanda
    p = inst.problem
    mask = wanda(p, Unstructured(0.5)).mask
    prog = refit_program(p, mask)
    start = len(R.rows)
    t0 = time.perf_counter()
    W = refit_weights(p, mask)
    R.add(inst, "refit QP", "torch refit", objective=prog.evaluate({"W": W * mask}),
          feasible=prog.check({"W": W * mask})["feasible"], proven=False, time_s=time.perf_counter() - t0,
          status="solved", role="torch")
    R.solve(inst, "refit QP", "cvxpy", prog, solver="CLARABEL")
    if not R.quick:
        R.solve(inst, "refit QP", "cvxpy", prog, solver="OSQP")
        R.solve(inst, "refit QP", "cvxpy", prog, solver="SCS")
    R.solve(inst, "refit QP", "gurobi", prog, time_limit=R.time_limit)
    _finish_group(R.rows[start:], "convex")


def _l1_lambda(p: LayerProblem) -> float:
    return 0.05 * float(p.target(torch.float64).abs().max())


def _l1_torch_solvers(problem: LayerProblem, lam: float) -> dict:
    """Registered ℓ1 solvers, plus every registered method whose ``program`` builder returns an ℓ1 program and
    which exposes its pure convex solver as ``<fn>.l1_solver`` or as ``<name>_l1`` in its module (FISTA's
    ``fista_l1``). Each maps ``(problem, lam)`` to the minimiser (a tensor, or an object with ``.W``)."""
    import sys
    out = dict(L1_SOLVERS)
    for name in list_methods():
        spec = _METHODS[name]
        if spec.program is None:
            continue
        try:
            prog = spec.program(problem, Unstructured(0.5), lam=lam)
        except Exception:
            continue
        if getattr(prog, "kind", None) != "L1":
            continue
        fn = getattr(spec.fn, "l1_solver", None) or getattr(sys.modules.get(spec.fn.__module__), f"{name}_l1", None)
        if callable(fn):
            out.setdefault(name, fn)
    return out


def _run_l1(R: _Runner, inst: Instance):
    p = inst.problem
    lam = _l1_lambda(p)
    prog = l1_program(p, lam)
    start = len(R.rows)
    R.solve(inst, "l1 model", "cvxpy", prog, solver="CLARABEL")
    if not R.quick:
        R.solve(inst, "l1 model", "cvxpy", prog, solver="SCS")
    R.solve(inst, "l1 model", "gurobi", prog, time_limit=R.time_limit)
    solvers = _l1_torch_solvers(p, lam)
    for name, fn in solvers.items():
        t0 = time.perf_counter()
        try:
            W = fn(p, lam)
            W = getattr(W, "W", W)
        except Exception as e:  # a solver bug is a failed row, not a crashed harness
            R.add(inst, "l1 model", f"{name} (torch)", status="error", note=f"{type(e).__name__}: {e}",
                  role="torch", time_s=time.perf_counter() - t0)
            continue
        W = torch.as_tensor(W).to(torch.float64)
        R.add(inst, "l1 model", f"{name} (torch)", objective=prog.evaluate({"W": W}),
              feasible=prog.check({"W": W})["feasible"], proven=False, time_s=time.perf_counter() - t0,
              status="solved", role="torch")
    if not solvers:
        R.add(inst, "l1 model", "torch ℓ1 solver", status="skipped", role="torch",
              note="none registered (solvers.verify.register_l1_solver / <method>.l1_solver)")
    _finish_group(R.rows[start:], "convex")


def _heuristic_values(prog: Program, pattern: Pattern, W: torch.Tensor, mask: torch.Tensor) -> dict:
    vals = {"W": W.to(torch.float64) * mask}
    if "z" in prog.variables:
        vals["z"] = mask.to(torch.float64)
    if "g" in prog.variables:  # the groups the mask uses, padded with unused ones up to the kept count
        g = pattern.kept_groups_of(mask)
        k = pattern.keep_groups(mask.shape[1])
        g[torch.nonzero(~g).reshape(-1)[: max(0, k - int(g.sum()))]] = True
        vals["g"] = g.to(torch.float64)
    return vals


def _run_l0(R: _Runner, inst: Instance):
    from .baselines import refit_result, wanda_scores, score_prune
    from ..solvers.base import LayerResult
    p = inst.problem
    for pat in inst.patterns or _l0_patterns(p.n):
        prog = l0_program(p, pat)
        model = f"L0 MIQP {pat.name}"
        start = len(R.rows)
        for b in inst.l0_backends:
            tl = min(R.time_limit, 20.0) if b == "scip" else R.time_limit
            R.solve(inst, model, b, prog, role="reference" if b == "enumerate" else "exact",
                    **({} if b == "enumerate" else {"time_limit": tl}))
        kind = _pattern_kind(pat)
        heur = []
        for name in list_methods():
            spec = _METHODS[name]
            if name == "refit" or kind not in spec.patterns:
                continue
            heur.append((name, lambda spec=spec: spec(p, pat)))
        if kind == "groups":  # structured: the harness's own group-score baseline (Wanda scores summed per group)
            heur.append(("group-wanda", lambda: score_prune(p, pat, wanda_scores(p), "group-wanda")))
        for name, run in heur:
            t0 = time.perf_counter()
            try:
                res = run()
            except ValueError as e:  # the method refuses this shape/pattern (PatternError): not a failure
                R.add(inst, model, name, status="skipped", note=f"{type(e).__name__}: {str(e)[:90]}",
                      role="heuristic", time_s=time.perf_counter() - t0)
                continue
            except Exception as e:
                R.add(inst, model, name, status="error", note=f"{type(e).__name__}: {str(e)[:80]}", role="heuristic",
                      time_s=time.perf_counter() - t0)
                continue
            dt = time.perf_counter() - t0
            vals = _heuristic_values(prog, pat, res.W, res.mask)
            e0 = prog.evaluate(vals)
            R.add(inst, model, name, objective=e0, feasible=prog.check(vals)["feasible"], proven=False,
                  time_s=dt, status="heuristic", role="heuristic")
            t0 = time.perf_counter()
            rr = refit_result(p, LayerResult(res.W, res.mask, dict(res.info, error=e0)))
            vals = _heuristic_values(prog, pat, rr.W, rr.mask)
            R.add(inst, model, f"{name}+refit", objective=prog.evaluate(vals), feasible=prog.check(vals)["feasible"],
                  proven=False, time_s=time.perf_counter() - t0, status="heuristic", role="heuristic",
                  extra={"refit_before": e0})
        _finish_group(R.rows[start:], "exact")


def _run_mask(R: _Runner, inst: Instance):
    from .baselines import wanda_scores
    p = inst.problem
    S = wanda_scores(p).to(torch.float64)
    pats = [NM(2, 4)]
    if p.m % 4 == 0:
        pats.append(ExpanderNM(2, 4, 1))
    for pat in pats:
        try:
            prog = mask_program(S, pat)
        except ValueError as e:
            R.add(inst, f"mask {pat.name}", "-", status="skipped", note=str(e))
            continue
        model = f"mask LP {pat.name}"
        start = len(R.rows)
        R.solve(inst, model, "enumerate", prog, role="reference")
        R.solve(inst, model, "cvxpy", prog, solver="HIGHS")
        R.solve(inst, model, "gurobi", prog, time_limit=R.time_limit)
        if not R.quick:
            R.solve(inst, model, "scip", prog, time_limit=R.time_limit)
        t0 = time.perf_counter()
        try:
            mask = pat.project(S)
        except NotImplementedError as e:
            R.add(inst, model, "torch projection", status="skipped", note=str(e), role="torch")
        else:
            vals = {"z": mask.to(torch.float64)}
            R.add(inst, model, "torch projection", objective=prog.evaluate(vals), feasible=prog.check(vals)["feasible"],
                  proven=False, time_s=time.perf_counter() - t0, status="solved", role="torch")
        _finish_group(R.rows[start:], "exact")
        for r in R.rows[start:]:  # the projection is exact for these sets: hold it to the optimum
            if r["role"] == "torch" and r["check"] == "ok" and abs(r["gap"]) > EXACT_RTOL:
                r["check"] = f"FAIL: projection not optimal (gap {r['gap']:.1e})"


# ------------------------------------------------------------------------------------------------ table
def _fmt(v, kind):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if kind == "obj":
        return f"{v:.6g}"
    if kind == "gap":
        return f"{v:+.1e}" if v != 0 else "0"
    if kind == "bool":
        return "yes" if v else "no"
    if kind == "time":
        return f"{v:.3f}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    cols = [("instance", "instance", None), ("model", "model", None), ("backend", "backend", None),
            ("objective", "objective", "obj"), ("rel.gap", "gap", "gap"), ("feas", "feasible", "bool"),
            ("proven", "proven_optimal", "bool"), ("time_s", "time_s", "time"), ("check", "check", None),
            ("note", "note", None)]
    table = [[h for h, _, _ in cols]]
    for r in rows:
        table.append([_fmt(r.get(k), f) for _, k, f in cols])
    widths = [max(len(t[i]) for t in table) for i in range(len(cols) - 1)]
    lines = []
    for k, t in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(t[:-1], widths)) + "  " + t[-1])
        if k == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 4))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ API
def verify(quick: bool = False, gurobi: Optional[bool] = None, output: Optional[str] = None, seed: int = 0,
           data_dir=None, model_dir=None, _cli: bool = False, time_limit: Optional[float] = None,
           threads: Optional[int] = 1, **_) -> list[dict]:
    """Run the cross-check; print the table (CLI) and return its rows (one dict per (instance, model, backend)).

    ``gurobi``: None = use it where installed and licensed; True = require gurobipy (error if absent);
    False = skip its rows. ``time_limit``: per MIQP solve (default 10 s quick, 30 s full). ``threads``: torch
    and Gurobi threads while verifying (default 1: the instances are tiny, and on a shared 2-core machine
    intra-op threading made the enumeration 8× slower); ``None`` keeps the current settings.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _verify(quick, gurobi, output, seed, data_dir, model_dir, _cli, time_limit, threads)
    finally:
        torch.set_num_threads(old_threads)


def _verify(quick, gurobi, output, seed, data_dir, model_dir, _cli, time_limit, threads) -> list[dict]:
    t_start = time.perf_counter()
    if gurobi:
        b = get_backend("gurobi")
        if not b.available():
            raise SolverUnavailable("--gurobi given but gurobipy is not installed (pip install gurobipy)")
    tl = time_limit if time_limit is not None else (10.0 if quick else 30.0)
    R = _Runner(gurobi, tl, quick, threads)
    instances, notes = build_instances(quick=quick, seed=seed, model_dir=model_dir, data_dir=data_dir)
    list_methods()  # import every method module (they may register ℓ1 solvers)
    for inst in instances:
        if "refit" in inst.models:
            _run_refit(R, inst)
        if "l1" in inst.models:
            _run_l1(R, inst)
        if "l0" in inst.models:
            _run_l0(R, inst)
        if "mask" in inst.models:
            _run_mask(R, inst)
    wall = time.perf_counter() - t_start
    rows = R.rows
    fails = [r for r in rows if str(r["check"]).startswith("FAIL")]
    skipped = [r for r in rows if r["check"] == "skipped"]
    summary = (f"{len(rows)} rows, {len(rows) - len(skipped)} solved, {len(skipped)} skipped, {len(fails)} failed "
               f"checks; wall {wall:.1f} s ({'quick' if quick else 'full'}, torch threads {torch.get_num_threads()})")
    if _cli:
        insts = {}
        for r in rows:
            insts.setdefault(r["instance"], r["inputs"])
        print("instances:")
        for k, v in insts.items():
            print(f"  {k}: {v}")
        for n_ in notes:
            print(f"  note: {n_}")
        print(format_table(rows))
        print(summary)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w") as f:
            json.dump({"rows": rows, "notes": notes, "wall_s": wall, "quick": quick, "summary": summary}, f,
                      indent=1, default=str)
    if _cli and fails:
        raise VerificationError(f"{len(fails)} cross-check(s) failed (rows marked FAIL above)")
    return rows
