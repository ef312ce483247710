"""Judging the rows of one (instance, program) group against its best proven optimum, and the summaries: the
pair statistics per (program, production solver, reference backend), the tables and the gap plot
(the rules are in :mod:`.harness`'s docstring and docs/methods.md §6)."""
from __future__ import annotations

import math
import statistics
from typing import Optional

import torch

from ...formulations.programs import Program

__all__ = ["AT_OPTIMUM", "CONVEX_RTOL", "EXACT_RTOL", "NEVER_BEAT", "judge", "pair_stats", "format_pairs", "format_table",
           "plot_gaps", "program_feasible", "roundoff_slack"]

CONVEX_RTOL = 1e-6   # convex models: relative objective agreement
EXACT_RTOL = 1e-6    # exact combinatorial models: same optimum (relative)
AT_OPTIMUM = 1e-6   # a production solver "reached the optimum" on an instance: relative gap at most this
NEVER_BEAT = 1e-9    # float64 round-off of evaluating a program (relative), the least of the slack ρ below


def program_feasible(prog: Program, vals: dict) -> bool:
    return bool(prog.check(vals)["feasible"])


def roundoff_slack(program: Program) -> float:
    """How far two float64 evaluations of one program may differ by round-off (ρ): ``NEVER_BEAT``, or ``1e-15·κ(Ĥ)``
    on live inputs for ill-conditioned layers (two exact refits of one support differ by ~ε·κ; measured on
    low-rank 2×8 instances: 2e-9)."""
    p = program.problem
    if p is None or program.kind not in ("MIQP", "QP"):
        return NEVER_BEAT
    d = p.Hh.to(torch.float64).diagonal()
    live = d > 0
    if not bool(live.any()):
        return NEVER_BEAT
    e = torch.linalg.eigvalsh(p.Hh.to(torch.float64)[live][:, live])
    kappa = float(e.max() / e.min()) if float(e.min()) > 0 else math.inf
    return max(NEVER_BEAT, min(1e-15 * kappa, 1e-6))


def _claim_tol(ref) -> float:
    """The relative tolerance of a proof, beside its absolute one (``atol``)."""
    return float(ref.get("gap_tol") or 0.0) + float(ref.get("feas_tol") or 0.0)


class _Proofs:
    """The proven optima of one group and what they claim: ``opt`` the best, ``tol`` the agreement asked of
    them, ``floor`` the scale below which relative gaps are not asked, ``slack`` the round-off ρ."""

    def __init__(self, proofs: list, opt, tol: float, floor: float, slack: float):
        self.proofs, self.opt, self.tol, self.floor, self.slack = proofs, opt, tol, floor, slack

    def disagrees(self, ref) -> bool:
        """A proof off the optimum by more than its tolerance (judged FAIL)."""
        return abs(ref["objective"] - self.opt) > max(self.tol, _claim_tol(ref)) * \
            max(abs(self.opt), self.floor, 1e-12) + (ref.get("atol") or 0.0)

    def contradicted(self, r) -> Optional[str]:
        """The proof a feasible value contradicts: the value lies below what a proven optimum (one that agrees
        with the others) claims."""
        own = r.get("atol") or 0.0  # a limit-stopped reference's own objective accuracy
        for ref in self.proofs:
            if self.disagrees(ref) or ref is r:
                continue
            s = max(abs(ref["objective"]), self.floor, 1e-12)
            line = ref["objective"] - (_claim_tol(ref) + self.slack) * s - (ref.get("atol") or 0.0)
            if r["objective"] + own < line:
                return (f"beats the proven optimum of {ref['solver']} by {(ref['objective'] - r['objective']) / s:.1e}"
                        f" (its tolerance {_claim_tol(ref) + self.slack:.0e})")
        return None


def judge(rows: list[dict], kind: str, f0: Optional[float] = None, slack: float = NEVER_BEAT) -> Optional[float]:
    """Gaps to the best proven optimum and the verdicts of one (instance, program) group; returns the optimum.
    ``slack``: the round-off ρ of evaluating the program (relative). Each proven reference row's ``gap_tol``,
    ``feas_tol`` and ``atol`` (its backend's reported tolerances) bound what its proof claims (module doc)."""
    tol = CONVEX_RTOL if kind == "convex" else EXACT_RTOL
    proofs = [r for r in rows if r["role"] == "reference" and r["proven_optimal"]
              and r["feasible"] is not False and math.isfinite(r["objective"])]
    proven = [r["objective"] for r in proofs]
    cands = list(proven)
    if kind == "convex":  # a production convex solver may be more accurate than an interior-point reference
        cands += [r["objective"] for r in rows if r["role"] == "exact" and r["feasible"]
                  and math.isfinite(r["objective"])]
    opt = min(cands) if proven else None
    # convex programs: relative to max(|opt|, 1e-3·f(0)) — an optimum far below the scale of the objective's
    # constant part (a nearly-feasible target) is only as accurate as that constant allows
    floor = 1e-3 * float(f0) if (kind == "convex" and f0) else 0.0

    proof = _Proofs(proofs, opt, tol, floor, slack)

    for r in rows:
        r["roundoff"] = slack  # recorded: a reader can re-check every verdict from the rows alone
        if r["check"]:  # error / skipped already judged
            continue
        if opt is None:
            r["check"] = "no reference"
            continue
        if not math.isfinite(r["objective"]):
            r["check"] = f"{r['status']} (no solution)" if r["role"] == "reference" else "FAIL: no solution"
            if r["role"] == "reference" and r["status"] in ("optimal",):
                r["check"] = "FAIL: optimal without a solution"
            continue
        r["abs_gap"] = r["objective"] - opt
        r["gap"] = r["abs_gap"] / max(abs(opt), 1e-12)
        scale = max(abs(opt), floor, 1e-12)
        fails = []
        if r["feasible"] is False:
            fails.append("infeasible")
        if r["role"] == "reference" and not r["proven_optimal"]:
            # limit-stopped or relaxed: never "ok"; its value and bound must still be valid
            why = proof.contradicted(r) if r["feasible"] else None
            if why:
                fails.append(f"feasible value {why}")
            if r["bound"] is not None and math.isfinite(r["bound"]) and \
                    (r["bound"] - opt) / scale > max(tol, 1e-9):
                fails.append(f"bound {r['bound']:.6g} above the optimum {opt:.6g}")
            r["check"] = ("FAIL: " + ", ".join(fails)) if fails else r["status"] or "unproven"
            continue
        if r["role"] == "reference" and proof.disagrees(r) or r["role"] == "exact" and \
                abs(r["abs_gap"]) > tol * scale + (r.get("atol") or 0.0):
            t = max(tol, _claim_tol(r)) if r["role"] == "reference" else tol
            fails.append(f"|gap| {abs(r['gap']):.1e} > {t:g}" + (f" (+ atol {r['atol']:.0e})" if r.get("atol") else ""))
        elif r["feasible"] is not False:
            why = proof.contradicted(r)
            if why:
                fails.append(why)
        rb = r.get("refit_before")
        if rb is not None and r["objective"] > rb * (1 + 1e-9) + 1e-12 * max(abs(opt), 1.0):
            fails.append(f"the refit increased the error ({rb:.6g} → {r['objective']:.6g})")
        r["check"] = ("FAIL: " + ", ".join(fails)) if fails else "ok"
    return opt


def pair_stats(rows: list[dict]) -> list[dict]:
    """Per (program, production solver, reference backend): instances where the reference proved its optimum
    and the production solver returned a solution, the limit-stopped / failed reference solves, failures of the
    production solver, max |gap| and the relative gaps (production − reference) / |reference|: max, mean,
    median, and how many instances the production solver reached the optimum on (relative gap ≤ 1e-6), mean
    times."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["program"], r["instance"]), []).append(r)
    pairs: dict = {}
    for (prog, inst), rs in groups.items():
        refs = [r for r in rs if r["role"] == "reference"]
        prods = [r for r in rs if r["role"] in ("exact", "heuristic")]
        for pr in prods:
            for rf in refs:
                key = (prog, pr["solver"], rf["solver"])
                s = pairs.setdefault(key, {"program": prog, "production": pr["solver"], "reference": rf["solver"],
                                           "role": pr["role"], "instances": 0, "ok": 0, "reference_limit": 0,
                                           "reference_other": 0, "production_fail": 0, "production_skipped": 0,
                                           "max_abs_gap": 0.0,
                                           "max_rel_gap": 0.0, "mean_rel_gap": None, "median_rel_gap": None,
                                           "at_optimum": 0, "production_time_s": 0.0, "reference_time_s": 0.0,
                                           "families": {}, "_gaps": []})
                if pr["check"] == "skipped":
                    s["production_skipped"] += 1
                    continue
                if not rf["proven_optimal"]:
                    if rf["status"] in ("time_limit", "node_limit"):
                        s["reference_limit"] += 1
                    else:
                        s["reference_other"] += 1
                    continue
                if not math.isfinite(pr["objective"]) or not math.isfinite(rf["objective"]):
                    s["production_fail"] += 1
                    continue
                s["instances"] += 1
                s["families"][pr["family"]] = s["families"].get(pr["family"], 0) + 1
                a = pr["objective"] - rf["objective"]
                rel = a / max(abs(rf["objective"]), 1e-12)
                s["max_abs_gap"] = max(s["max_abs_gap"], abs(a))
                s["max_rel_gap"] = max(s["max_rel_gap"], abs(rel))
                s["_gaps"].append(rel)
                s["production_time_s"] += pr["time_s"] or 0.0
                s["reference_time_s"] += rf["time_s"] or 0.0
                if str(pr["check"]).startswith("FAIL") or str(rf["check"]).startswith("FAIL"):
                    s["production_fail"] += 1
                else:
                    s["ok"] += 1
    out = []
    for s in pairs.values():
        n = max(s["instances"], 1)
        s["production_time_s"] /= n
        s["reference_time_s"] /= n
        gaps = sorted(s.pop("_gaps"))
        if gaps:
            s["mean_rel_gap"] = sum(gaps) / len(gaps)
            s["median_rel_gap"] = statistics.median(gaps)
            s["at_optimum"] = sum(1 for g in gaps if g <= AT_OPTIMUM)
        out.append(s)
    return sorted(out, key=lambda s: (s["program"], s["role"], s["production"], s["reference"]))


def format_pairs(pairs: list[dict]) -> str:
    head = ["program", "production", "reference", "inst", "ok", "limit", "fail", "skip", "max|gap|", "max rel.gap",
            "mean rel.gap", "at opt", "prod s", "ref s"]
    table = [head]
    for s in pairs:
        table.append([s["program"], s["production"] + ("" if s["role"] == "exact" else " (h)"), s["reference"],
                      str(s["instances"]), str(s["ok"]), str(s["reference_limit"]),
                      str(s["production_fail"]), str(s["production_skipped"]), f"{s['max_abs_gap']:.2e}", f"{s['max_rel_gap']:.2e}",
                      "–" if s["mean_rel_gap"] is None else f"{s['mean_rel_gap']:.2e}", str(s["at_optimum"]),
                      f"{s['production_time_s']:.4f}", f"{s['reference_time_s']:.4f}"])
    w = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(t)) for t in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """The row-level table (one line per (instance, program, solver)); ``format_pairs`` is the summary."""
    cols = ["instance", "program", "solver", "role", "status", "objective", "gap", "feasible", "time_s", "check",
            "note"]
    table = [cols]
    for r in rows:
        table.append([f"{r[c]:.6g}" if isinstance(r[c], float) and c == "objective" else
                      f"{r[c]:+.1e}" if c == "gap" and isinstance(r[c], float) and math.isfinite(r[c]) else
                      f"{r[c]:.3f}" if c == "time_s" and r[c] is not None else str(r[c]) for c in cols])
    w = [max(len(t[i]) for t in table) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(t)) for t in table)


def plot_gaps(rows: list[dict], path) -> Optional[str]:
    """Box plots of the heuristics' relative gaps to the proven optimum, one panel per program."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    data: dict = {}
    for r in rows:
        if r["role"] == "heuristic" and math.isfinite(r["gap"]):
            data.setdefault(r["program"], {}).setdefault(r["solver"], []).append(max(r["gap"], 0.0) + 1e-12)
    if not data:
        return None
    progs = sorted(data)
    fig, axes = plt.subplots(1, len(progs), figsize=(3.2 * len(progs) + 1, 4), squeeze=False)
    for ax, prog in zip(axes[0], progs):
        names = sorted(data[prog])
        ax.boxplot([data[prog][n] for n in names], showfliers=True)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(prog, fontsize=9)
    axes[0][0].set_ylabel("relative gap to the proven optimum (+1e-12)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
