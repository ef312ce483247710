"""The cross-check harness (docs/methods.md §6): every program, every production solver, every reference backend.

``verify()`` / ``optprune verify`` draws many small instances and, on each, solves every **program** with every
**reference backend** that can take it and with every **production solver** of it, then judges them all by the
program's own ``evaluate``/``check``:

* **Programs come from the registry.** Each pattern kind some registered method accepts gives an L0
  mask-and-weights MIQP (``l0_program``; every method accepting the kind is a production heuristic of it);
  each method's declared ``program`` builder gives its own program (FISTA's ℓ1 model, EGGS' expander mask
  program, the refit QP, ...), for its default options and for every option set it lists in
  ``verify_options`` (EGGS ``mask=error``: the mask-only MIQP, kept weights fixed at W0, of which the method
  is a heuristic, held to "never below the optimum"); the pattern's torch projection is the production solver of the plain N:M and
  expander mask programs; the allocation QPs (alpha/OWL/uniform) are solved by water-filling. A method
  registered tomorrow is verified without touching this file.
* **Backends are selected by capability, never by name.** Every registered, available backend whose
  ``supports(program)`` accepts the program (kinds, exact integer / convex / network-flow abilities, pattern
  kinds, size limits — :class:`~.base.Capabilities`) solves it; a full run adds each backend's declared
  ``variants`` (e.g. other convex solvers behind cvxpy). A new backend module is verified as soon as it is
  registered.
* **Statuses are honest.** A reference result keeps its status: ``optimal`` (proven), ``time_limit`` /
  ``node_limit`` (with the solver's bound and gap), ``infeasible``, ``fractional`` (an LP relaxation that was not
  integral: a bound only), ``error``. Only proven optima are references; a limit-stopped result is never
  "ok" — it is checked for validity (its value never below the optimum, its bound never above) and counted
  apart.

Checks per (instance, program), against the best proven optimum ``opt``:

* proven references: ``|obj − opt| ≤ 1e-6·|opt|`` (or the reference's own tolerance, if looser);
* **a proof holds to the tolerances its backend ran with**: each backend reports in its result the relative
  gap ``gap_tol`` it stops at (Gurobi's ``MIPGap``, SCIP's ``limits/gap``, 0 for enumeration), an absolute
  tolerance ``abs_tol`` and its feasibility tolerance ``feas_tol``; a proven optimum ``f_r`` claims that no
  feasible point lies below ``f_r − (gap_tol + feas_tol + ρ)·|f_r| − abs_tol``, where ``ρ`` is the float64
  round-off of evaluating the program (1e-9 relative, or 1e-15·κ(Ĥ) on ill-conditioned layers). A feasible
  point below that line contradicts the proof and fails; one above it is no evidence against it;
* production solvers that claim to solve their program (convex solvers, exact mask solvers, allocation):
  the same tolerance; heuristics (every method on the L0 program, each also followed by the exact
  least-squares refit on its mask, ``<method>+refit``): feasible and never below any proven optimum's claim,
  and the refit never above the method's own weights;
* limit-stopped or relaxed results: value ≥ opt and bound ≤ opt (validity), status reported, never "ok".

Instance families (cycled): random well-conditioned Gaussian inputs (half with error-corrected X̂),
ill-conditioned (correlated inputs, outlier features, a log-spaced spectrum with κ = 1e4), low-rank inputs
(rank n/4 plus 1e-3 noise, some dead inputs), and slices (random rows × columns) of real layers —
stories260K's q/k/v projections with their block-0 inputs when ``$OPTPRUNE_MODEL_DIR`` (or ``model_dir``) holds
``stories260K``, otherwise a synthetic LLM-like layer (heavy-tailed weights, outlier features) and a note says
so. The full run draws 100 instances per program, and further ones (up to 150) for a program whose reference
solves were stopped by a limit, until every (program, production solver, reference) pair has 100 proven ones;
``quick=True`` draws 4 (one per family) and stays under a minute.

Output: a table per pair (instances, limit-stopped, failures, max |gap|, max relative gap, mean times), the
rows and pairs as JSON (``output``), and next to it ``<stem>_gaps.png``: the relative-gap distributions of
the heuristics per program.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ...formulations.patterns import pattern_kinds
from ...formulations.programs import Program
from ..base import LicenseLimitError, SolverUnavailable
from ..registry import get_backend, list_backends, method_specs
from .cases import Case, build_cases, verify_pattern
from .instances import FAMILIES, InstanceFactory
from .judging import format_pairs, judge, pair_stats, plot_gaps, program_feasible, roundoff_slack

__all__ = ["verify", "VerificationError", "Runner", "select_backends", "FULL_INSTANCES", "QUICK_INSTANCES"]

FULL_INSTANCES = 100
QUICK_INSTANCES = len(FAMILIES)


class VerificationError(RuntimeError):
    """Some cross-check failed (``optprune verify`` exits non-zero)."""


# ------------------------------------------------------------------------------------------------ backends
def select_backends(program: Program, *, quick: bool = False, include=None, exclude=()) -> tuple[list, list]:
    """The reference solves a program gets, by capability: ``([(label, backend, options)], [(name, reason)])``
    over every registered backend (``include``/``exclude``: optional name filters from the caller)."""
    chosen, refused = [], []
    for name in list_backends():
        if name in exclude or (include is not None and name not in include):
            continue
        b = get_backend(name)
        if not b.available():
            refused.append((name, "package not installed"))
            continue
        ok, why = b.supports(program)
        if not ok:
            refused.append((name, why))
            continue
        chosen.append((name, b, {}))
        if not quick:
            for label, opts, kinds in getattr(b.capabilities, "variants", ()) or ():
                if program.kind in kinds:
                    chosen.append((f"{name}-{label}", b, dict(opts)))
    return chosen, refused


class Runner:
    """Solves the cases with the reference backends and the production solvers; collects and judges the rows."""

    def __init__(self, time_limit, quick, threads=None, include=None, exclude=()):
        self.rows: list[dict] = []
        self.time_limit = time_limit
        self.quick = quick
        self.threads = threads
        self.include, self.exclude = include, exclude
        self.refused: dict = {}
        self.unreferenced: dict = {}  # program key -> why no reference backend took it (not verified)

    def row(self, case: Case, solver: str, role: str, **kw) -> dict:
        r = {"program": case.key, "kind": case.program.kind, "instance": case.instance, "family": case.family,
             "inputs": case.inputs, "solver": solver, "role": role, "status": "", "proven_optimal": False,
             "objective": float("nan"), "bound": None, "solver_gap": None, "feasible": None, "time_s": None,
             "gap": float("nan"), "abs_gap": float("nan"), "check": "", "note": ""}
        r.update(kw)
        self.rows.append(r)
        return r

    def run_case(self, case: Case) -> list[dict]:
        start = len(self.rows)
        prog = case.program
        refs, refused = select_backends(prog, quick=self.quick, include=self.include, exclude=self.exclude)
        for name, why in refused:
            self.refused.setdefault((case.key, name), why)
        if not refs and not any(pr.exact for pr in case.producers):
            # nothing can prove an optimum here: a heuristic row would be judged against nothing
            self.unreferenced.setdefault(case.key, sorted({why for _, why in refused}))
            return []
        for label, b, opts in refs:
            o = dict(opts)
            if self.time_limit is not None:
                o.setdefault("time_limit", self.time_limit)
            if self.threads:
                o.setdefault("threads", self.threads)
            t0 = time.perf_counter()
            try:
                r = b.solve(prog, **o)
            except (LicenseLimitError, SolverUnavailable) as e:
                self.refused.setdefault((case.key, label), str(e))
                continue
            except Exception as e:  # a backend crash is a failed row, not a crashed harness
                self.row(case, label, "reference", status="error", time_s=time.perf_counter() - t0,
                         note=f"{type(e).__name__}: {str(e)[:120]}", check="FAIL: backend error")
                continue
            status = r.status
            if r.proven_optimal:
                status = "optimal"
            elif status == "optimal":  # 'optimal' from a solver that does not claim proof (e.g. inaccurate)
                status = "unproven"
            feas = program_feasible(prog, r.values) if r.values else None
            note = "; ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in r.info.items() if k in ("bigm_max_ratio", "max_fractionality"))
            rows_ = prog.problem.m if prog.problem is not None else 1
            self.row(case, label if label != "cvxpy" else r.solver, "reference", status=status,
                     atol=float(getattr(b.capabilities, "objective_atol", 0.0) or 0.0) * rows_ + float(r.abs_tol),
                     gap_tol=float(r.gap_tol), feas_tol=float(r.feas_tol),
                     proven_optimal=bool(r.proven_optimal), objective=r.objective if r.values else float("nan"),
                     bound=r.bound, solver_gap=r.gap, feasible=feas, time_s=r.time, note=note)
        for pr in case.producers:
            t0 = time.perf_counter()
            try:
                vals = pr.run()
            except ValueError as e:  # the method refuses this shape/pattern (PatternError): not a failure
                self.row(case, pr.name, "exact" if pr.exact else "heuristic", status="skipped",
                         time_s=time.perf_counter() - t0, note=f"{type(e).__name__}: {str(e)[:100]}", check="skipped")
                continue
            except Exception as e:
                self.row(case, pr.name, "exact" if pr.exact else "heuristic", status="error",
                         time_s=time.perf_counter() - t0, note=f"{type(e).__name__}: {str(e)[:100]}",
                         check="FAIL: solver error")
                continue
            dt = time.perf_counter() - t0
            mask = vals.pop("_mask", None)
            obj = prog.evaluate(vals)
            self.row(case, pr.name, "exact" if pr.exact else "heuristic", status="solved",
                     objective=obj, feasible=program_feasible(prog, vals), time_s=dt)
            if not pr.exact and mask is not None and "W" in vals and prog.problem is not None \
                    and not prog.meta.get("fixed_weights") and prog.meta.get("quantizer") is None:
                # the exact least-squares refit on the heuristic's mask: never worse than the heuristic's weights
                from ..methods.baselines import refit_weights
                t0 = time.perf_counter()
                rv = dict(vals, W=refit_weights(prog.problem.to(torch.float64), mask) * mask)
                self.row(case, f"{pr.name}+refit", "heuristic", status="solved", objective=prog.evaluate(rv),
                         feasible=program_feasible(prog, rv), time_s=time.perf_counter() - t0, refit_before=obj)
        rows = self.rows[start:]
        judge(rows, case.kind, prog.problem.constant() if prog.problem is not None else None,
              roundoff_slack(prog))
        return rows


# ------------------------------------------------------------------------------------------------ API
def verify(quick: bool = False, gurobi: Optional[bool] = None, output: Optional[str] = None, seed: int = 0,
           data_dir=None, model_dir=None, _cli: bool = False, time_limit: Optional[float] = None,
           threads: Optional[int] = 1, instances: Optional[int] = None, backends=None, programs=None,
           progress: bool = False, **_) -> list[dict]:
    """Run the cross-check; print the pair table (CLI) and return the rows (one per (instance, program, solver)).

    ``instances``: instances per program (default 100 full, 4 quick). ``backends``: only these registered
    backends (names; default all — selected per program by capability). ``programs``: only programs whose
    label contains one of these strings. ``gurobi``: None = use it where installed and licensed; True = require
    gurobipy (error if absent); False = leave it out. ``time_limit``: per reference solve (default 10 s; quick 3 s).
    ``threads``: torch and solver threads while verifying (default 1: the instances are tiny, and on a shared
    2-core machine intra-op threading made enumeration 8× slower); ``None`` keeps the current settings.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _verify(quick, gurobi, output, seed, data_dir, model_dir, _cli, time_limit, threads, instances,
                       backends, programs, progress)
    finally:
        torch.set_num_threads(old_threads)


def _check_output_file(output) -> None:
    """``--output``: a file name whose folder exists or can be made, and is writable — before the run, not after."""
    import tempfile
    if not str(output).strip():
        raise ValueError("--output is empty; name the JSON file to write (e.g. --output verify.json)")
    out = Path(str(output)).expanduser()
    if out.is_dir():
        raise ValueError(f"--output {out} is a directory; name the JSON file to write inside it")
    anc = out.resolve().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"--output {out}: {anc} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".optprune-probe-", dir=anc))
    except OSError as e:
        raise ValueError(f"--output {out}: {anc} is not writable ({e.strerror or e})") from None


def _verify(quick, gurobi, output, seed, data_dir, model_dir, _cli, time_limit, threads, instances, backends,
            programs, progress) -> list[dict]:
    t_start = time.perf_counter()
    include, exclude, n_inst, programs = _check_arguments(quick, gurobi, output, time_limit, instances, backends,
                                                          programs)
    # SCIP needs 0.4–2 s on most 2×8 L0 instances but up to ~10 s on correlated ones: the quick set caps it at
    # 3 s (a capped solve is reported as time_limit, never as ok), the full run at 10 s
    tl = time_limit if time_limit is not None else (3.0 if quick else 10.0)
    R = Runner(tl, quick, threads, include, exclude)
    factory = InstanceFactory(seed, model_dir, data_dir)
    specs = method_specs()  # imports every method module
    for kd in sorted({kd for spec in specs for kd in spec.patterns} & set(pattern_kinds())):
        if verify_pattern(kd) is None:
            factory.notes.append(f"pattern kind {kd!r} is not verified: its class parses no pattern from the text "
                                 f"{kd!r} (make parse({kd!r}, 0.5) return an instance)")
    for k in range(n_inst):
        for case in build_cases(k, factory, quick):
            if programs and not any(s in case.key for s in programs):
                continue
            R.run_case(case)
        if progress:
            print(f"[verify] instance {k + 1}/{n_inst}: {len(R.rows)} rows, {time.perf_counter() - t_start:.0f} s",
                  file=sys.stderr, flush=True)
    _top_up(R, factory, n_inst, quick, progress)
    for key, whys in R.unreferenced.items():
        factory.notes.append(f"{key} is not verified: no reference backend solves it ({'; '.join(whys)})")
    return _report(R, factory, quick, n_inst, output, _cli, time.perf_counter() - t_start)


def _check_arguments(quick, gurobi, output, time_limit, instances, backends, programs):
    """``(include, exclude, instances per program, program filters)`` from the arguments, each checked before
    anything is solved."""
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and math.isfinite(time_limit)
                                       and time_limit > 0):
        raise ValueError(f"--time-limit must be a positive number of seconds per reference solve, got {time_limit}")
    if output is not None:
        _check_output_file(output)
    names = list_backends()
    include = None
    if backends is not None:
        include = [b.strip() for b in (backends.split(",") if isinstance(backends, str) else backends) if b.strip()]
        bad = [b for b in include if b not in names]
        if bad:
            raise ValueError(f"unknown backend(s) {bad}; registered: {', '.join(names)}")
    exclude = ()
    if gurobi:
        if not get_backend("gurobi").available():
            raise SolverUnavailable("--gurobi given but gurobipy is not installed (pip install gurobipy)")
    elif gurobi is False:
        exclude = ("gurobi", "bqp-gurobi")
    if instances is not None and int(instances) < 1:
        raise ValueError(f"instances must be ≥ 1, got {instances}")
    n_inst = int(instances) if instances is not None else (QUICK_INSTANCES if quick else FULL_INSTANCES)
    if isinstance(programs, str):
        programs = [s for s in programs.split(",") if s]
    return include, exclude, n_inst, programs


def _top_up(R: Runner, factory: InstanceFactory, n_inst: int, quick: bool, progress: bool) -> None:
    """A program whose references were stopped by a limit (or returned an unproven answer, e.g. Gurobi's
    SUBOPTIMAL, where they prove optima elsewhere) on some instances draws further instances (up to half as many
    again) until every such (program, production, reference) pair has ``n_inst`` proven instances."""
    k = n_inst
    while k < n_inst + n_inst // 2:
        short = {s["program"] for s in pair_stats(R.rows)
                 if s["instances"] < n_inst and (s["reference_limit"] > 0 or (s["reference_other"] and s["instances"]))}
        if not short:
            break
        for case in build_cases(k, factory, quick):
            if case.key in short:
                R.run_case(case)
        k += 1
        if progress:
            print(f"[verify] top-up instance {k}: {', '.join(sorted(short))}", file=sys.stderr, flush=True)


def _summary(rows: list[dict], pairs: list[dict], quick: bool, n_inst: int, wall: float) -> str:
    fails = [r for r in rows if str(r["check"]).startswith("FAIL")]
    limited = [r for r in rows if r["role"] == "reference" and r["status"] in ("time_limit", "node_limit")]
    progs = sorted({r["program"] for r in rows})
    # not counted: pairs whose production solver refused every instance (EGGS on a 2-row L0 instance: its
    # expander tiles need 4 rows) and pairs whose reference never proves (OSQP, first-order): both listed
    refused_all = [s for s in pairs if s["production_skipped"] and not (s["instances"] + s["reference_limit"]
                                                                       + s["reference_other"] + s["production_fail"])]
    unproving = [s for s in pairs if s not in refused_all and s["instances"] == 0 and s["reference_limit"] == 0]
    counted = [s for s in pairs if s not in refused_all and s not in unproving]
    min_pair = min((s["instances"] for s in counted), default=0)
    return (f"{len(progs)} programs, {len(pairs)} (program, production, reference) pairs, {len(rows)} rows; "
            f"{len(fails)} failed checks, {len(limited)} limit-stopped reference solves; fewest proven instances "
            f"in a pair {min_pair} ({len(refused_all)} pairs refused by their production solver, {len(unproving)} "
            f"with a reference that does not prove optimality, not counted); wall {wall:.1f} s ({'quick' if quick else 'full'}, {n_inst} instances per "
            f"program, torch threads {torch.get_num_threads()})")


def _report(R: Runner, factory: InstanceFactory, quick: bool, n_inst: int, output, _cli: bool, wall: float):
    """Write the JSON (``output``) and the gap plot, print the table (CLI); raise when a check failed (CLI)."""
    rows = R.rows
    pairs = pair_stats(rows)
    fails = [r for r in rows if str(r["check"]).startswith("FAIL")]
    summary = _summary(rows, pairs, quick, n_inst, wall)
    plot = None
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot = plot_gaps(rows, out.with_name(out.stem + "_gaps.png"))
        refused = [{"program": k[0], "backend": k[1], "reason": v} for k, v in sorted(R.refused.items())]
        backends_info = {n_: dict(get_backend(n_).capabilities.describe(), available=get_backend(n_).available())
                         for n_ in list_backends()}
        with open(out, "w") as f:
            json.dump({"summary": summary, "quick": quick, "wall_s": wall, "instances_per_program": n_inst,
                       "programs": sorted({r["program"] for r in rows}), "pairs": pairs, "backends": backends_info,
                       "unverified": {k: v for k, v in sorted(R.unreferenced.items())},
                       "refused": refused, "notes": factory.notes, "plot": plot, "rows": rows}, f, indent=1,
                      default=str)
    if _cli:
        for n_ in factory.notes:
            print(f"note: {n_}")
        print(format_pairs(pairs))
        for r in fails[:40]:
            print(f"FAIL  {r['program']}  {r['instance']}  {r['solver']}: {r['check']} ({r['note']})")
        print(summary)
        if plot:
            print(f"gap distributions: {plot}")
    if _cli and fails:
        raise VerificationError(f"{len(fails)} cross-check(s) failed (listed above)")
    return rows
