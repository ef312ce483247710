"""The cross-check harness: programs from the method registry, reference backends selected by capability,
honest statuses, per-pair statistics.

``optprune verify --quick`` runs once per module (with a toy backend and a toy method registered inside the
test, to prove that both are found without naming them); the other tests exercise the judging directly.
"""
import contextlib
import io
import json

import pytest
import torch

from optprune.cli import main
from optprune.formulations import LayerProblem, NM, Unstructured
from optprune.formulations.patterns import ExpanderNM, pattern_kinds
from optprune.formulations.programs import l0_program, l1_program, mask_program, refit_program
from optprune.solvers import get_backend
from optprune.solvers.base import Backend, Capabilities, LayerResult, SolveResult
from optprune.solvers.registry import (get_method, isolated, list_backends, list_methods, register_backend,
                                       register_method)
from optprune.solvers.verification import (CANONICAL_PATTERNS, Case, InstanceFactory, Producer, Runner, judge,
                                          pair_stats, select_backends, verify_pattern)

TOY_BACKEND = "toy-refit"
TOY_METHOD = "toy-first-n"


class ToyRefitBackend(Backend):
    """A reference backend for refit QPs only (fixed zeros, no other constraints): the normal equations."""
    name = TOY_BACKEND
    capabilities = Capabilities(kinds=frozenset({"QP"}), convex=True, max_variables=10_000)

    def supports(self, program):
        ok, why = super().supports(program)
        if ok and (program.constraints or "W" not in program.variables):
            return False, "toy backend: refit QPs only (no linear rows)"
        return ok, why

    def solve(self, program, **_):
        from optprune.solvers.methods.baselines import refit_weights
        fz = program.variables["W"].fixed_zero
        mask = ~fz if fz is not None else torch.ones(program.problem.shape, dtype=torch.bool)
        W = refit_weights(program.problem.to(torch.float64), mask) * mask
        vals = {"W": W}
        return SolveResult(self.name, "optimal", program.evaluate(vals), time=0.0, values=vals, proven_optimal=True)


def toy_first_n(problem, pattern):
    """Keeps the first N of every group of M (a deliberately poor heuristic)."""
    m, n = problem.shape
    mask = torch.zeros(m, n, dtype=torch.bool)
    for c0 in range(0, n, pattern.M):
        mask[:, c0:c0 + pattern.N] = True
    return LayerResult(problem.W0 * mask, mask, {})


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "verify.json"
    buf = io.StringIO()
    list_backends()  # load the backends before isolated() saves the registries
    with isolated():  # the toy backend and method are gone after the run
        register_backend(ToyRefitBackend)
        register_method(TOY_METHOD, needs="none", patterns=("nm",))(toy_first_n)
        with contextlib.redirect_stdout(buf):
            rc = main(["verify", "--quick", "--output", str(out)])
    assert TOY_METHOD not in list_methods()
    data = json.loads(out.read_text())
    return rc, buf.getvalue(), data, out


def test_quick_passes_prints_pairs_and_writes_json_and_plot(quick):
    rc, text, data, out = quick
    assert rc == 0, text[-3000:]
    header = next(line for line in text.splitlines() if line.startswith("program "))
    for col in ("production", "reference", "inst", "limit", "max|gap|", "max rel.gap"):
        assert col in header
    assert not [r for r in data["rows"] if str(r["check"]).startswith("FAIL")]
    assert data["quick"] and data["wall_s"] > 0  # its time is recorded; speed is a benchmark, not a test
    assert data["plot"] and (out.parent / (out.stem + "_gaps.png")).stat().st_size > 1000
    for s in data["pairs"]:
        assert {"instances", "max_abs_gap", "max_rel_gap", "production_time_s", "reference_time_s"} <= set(s)


def test_quick_covers_every_registered_program(quick):
    _, _, data, _ = quick
    programs = set(data["programs"]) | set(data["unverified"])  # the latter: no reference backend solves them
    kinds = {k for n in list_methods() for k in get_method(n).patterns} & set(CANONICAL_PATTERNS)
    for kd in kinds:
        assert f"L0 {CANONICAL_PATTERNS[kd]().name}" in programs, kd
    prob = LayerProblem.random(4, 8, seed=0)
    for n in list_methods():
        spec = get_method(n)
        if spec.program is None:
            continue
        kd = sorted(spec.patterns & set(pattern_kinds()))[0]
        try:
            kind = spec.program(prob, verify_pattern(kd)).kind
        except Exception:  # builders that need more (the refit QP takes a mask)
            kind = None
        if kind == "MIQP":  # the method's program is the L0 program of its pattern
            assert f"L0 {verify_pattern(kd).name}" in programs, n
        else:  # a program of its own, named after the method
            assert any(pr.endswith(f"({n})") for pr in programs), n
    for n in list_methods():  # every option set a method declares for the cross-check gets its program
        for vo in get_method(n).verify_options:
            spec = get_method(n)
            pat = verify_pattern(sorted(spec.patterns & set(pattern_kinds()))[0])
            prog, default = spec.program(prob, pat, **vo), spec.program(prob, pat)
            if prog.kind == "MIQP" and not prog.meta.get("fixed_weights"):
                continue  # the L0 program: checked above
            same = (prog.name, prog.kind) == (default.name, default.kind)  # shown once, under the defaults
            want = f"({n})" if same else "(" + n + "".join(f" {k}={v}" for k, v in vo.items()) + ")"
            assert any(pr.endswith(want) for pr in programs), (n, vo, want)
    # the mask-only program of eggs mask=error: proven references and a heuristic that never beats them
    rows = [r for r in data["rows"] if r["program"].endswith("(eggs mask=error)")]
    assert {r["solver"] for r in rows if r["role"] == "reference" and r["proven_optimal"]}
    assert [r for r in rows if r["solver"] == "eggs" and r["role"] == "heuristic" and r["check"] == "ok"]
    assert "allocation QP" in programs
    assert any(p.startswith("mask expander") for p in programs)
    # every registered method appears as a production solver somewhere
    solvers = {r["solver"] for r in data["rows"]}
    for n in list_methods():
        if n != "refit":
            assert n in solvers, n


def test_toy_backend_and_method_are_selected_without_naming_them(quick):
    _, _, data, _ = quick
    toy_ref = [r for r in data["rows"] if r["solver"] == TOY_BACKEND]
    assert toy_ref and {r["program"] for r in toy_ref} == {p for p in data["programs"] if "refit" in p}
    assert all(r["check"] == "ok" for r in toy_ref)
    assert TOY_BACKEND in data["backends"] and data["backends"][TOY_BACKEND]["convex"]
    toy = [r for r in data["rows"] if r["solver"] == TOY_METHOD]
    assert toy and {r["program"] for r in toy} == {"L0 2:4"}
    assert all(r["check"] == "ok" for r in toy)


def test_flow_backend_and_scip_l1_are_selected(quick):
    _, _, data, _ = quick
    flow = [r for r in data["rows"] if r["solver"] == "flow"]
    assert flow and all(r["program"].startswith(("mask", "MILP")) for r in flow)
    assert any("expander" in r["program"] for r in flow)
    if get_backend("scip").available():
        assert any(r["solver"] == "scip" and r["kind"] == "L1" and r["check"] == "ok" for r in data["rows"])


def _claimed_floor(ref):
    """What a proven optimum claims, from the tolerances its backend reported: no feasible point lies below."""
    rel = ref["gap_tol"] + ref["feas_tol"] + ref["roundoff"]
    return ref["objective"] - rel * max(abs(ref["objective"]), 1e-12) - ref["atol"]


def test_proven_references_agree_and_heuristics_never_beat_them(quick):
    _, _, data, _ = quick
    groups = {}
    for r in data["rows"]:
        groups.setdefault((r["program"], r["instance"]), []).append(r)
    n_l0 = 0
    for (prog, inst), rows in groups.items():
        proofs = [r for r in rows if r["role"] == "reference" and r["proven_optimal"]]
        assert proofs, (prog, inst)
        for r in proofs:  # every backend says what its proof holds to
            assert r["gap_tol"] >= 0 and r["feas_tol"] >= 0 and r["atol"] >= 0 and r["roundoff"] > 0, r
        if prog.startswith(("L0", "mask", "MILP")):  # exact programs: every proven optimum is the same
            for a in proofs:  # ... within each other's claims
                for b in proofs:
                    assert a["objective"] >= _claimed_floor(b), (prog, inst, a["solver"], b["solver"])
        if prog.startswith("L0"):
            n_l0 += 1
            for r in rows:
                if r["role"] == "heuristic" and r["status"] == "solved":
                    assert r["feasible"], (prog, inst, r["solver"])
                    for ref in proofs:  # a feasible point below a proof's claim would refute that proof
                        assert r["objective"] >= _claimed_floor(ref), (prog, inst, r["solver"], ref["solver"])
    assert n_l0 >= 4 * 4


def test_proofs_report_the_tolerances_they_hold_to():
    """Each exact backend reports the gap and feasibility tolerances it ran with, not a fixed number."""
    prog = l0_program(LayerProblem.random(2, 8, kind="correlated", seed=0), NM(2, 4))
    assert get_backend("enumerate").solve(prog).gap_tol == 0.0
    if get_backend("scip").available():
        r = get_backend("scip").solve(prog, gap=1e-4)
        assert r.proven_optimal and r.gap_tol == 1e-4 and 0 < r.feas_tol <= 1e-5
    if get_backend("gurobi").available():
        r = get_backend("gurobi").solve(prog, mip_gap=1e-5)
        assert r.proven_optimal and r.gap_tol == 1e-5 and 0 < r.feas_tol <= 1e-5 and r.abs_tol >= 0
    S = torch.rand(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = get_backend("flow").solve(mask_program(S, NM(2, 4)))
    assert r.proven_optimal and 0 < r.abs_tol < 1e-12  # the cost-rounding bound of its integer scaling


def test_real_slices_or_a_note(quick):
    _, _, data, _ = quick
    fams = {r["family"] for r in data["rows"]}
    assert set(fams) == {"random", "ill-conditioned", "low-rank", "real-slice"}
    inputs = {r["inputs"] for r in data["rows"] if r["family"] == "real-slice"}
    assert any("stories260K" in i for i in inputs) or any("stories260K not available" in n for n in data["notes"])


# ------------------------------------------------------------------------------------------- judging
def _case(program, key="L0 test", kind="exact", producers=()):
    return Case(key, kind, "tiny", "random", "synthetic", program, list(producers))


def test_limit_stopped_reference_is_not_ok():
    sc = get_backend("scip")
    if not sc.available():
        pytest.skip("pyscipopt not installed")
    p = LayerProblem.random(4, 8, kind="correlated", seed=0)
    prog = l0_program(p, Unstructured(0.5))
    R = Runner(time_limit=0.05, quick=True, include=["scip", "enumerate"])
    rows = R.run_case(_case(prog))
    scip = next(r for r in rows if r["solver"] == "scip")
    assert scip["status"] == "time_limit" and not scip["proven_optimal"]
    assert scip["check"] == "time_limit" and scip["bound"] is not None
    assert next(r for r in rows if r["solver"] == "enumerate")["check"] == "ok"
    s = next(s for s in pair_stats(rows + [dict(rows[0], solver="h", role="heuristic", proven_optimal=False,
                                                 status="solved", check="ok")]) if s["reference"] == "scip")
    assert s["reference_limit"] == 1 and s["instances"] == 0 and s["ok"] == 0


def test_judge_flags_wrong_and_invalid_results():
    base = {"program": "p", "kind": "MIQP", "instance": "i", "family": "random", "inputs": "", "bound": None,
            "solver_gap": None, "time_s": 0.0, "gap": float("nan"), "abs_gap": float("nan"), "check": "", "note": ""}
    rows = [dict(base, solver="ref", role="reference", status="optimal", proven_optimal=True, objective=10.0,
                 feasible=True),
            dict(base, solver="other", role="reference", status="optimal", proven_optimal=True, objective=10.5,
                 feasible=True),
            dict(base, solver="lim", role="reference", status="time_limit", proven_optimal=False, objective=11.0,
                 feasible=True, bound=10.4),
            dict(base, solver="lim-ok", role="reference", status="time_limit", proven_optimal=False,
                 objective=10.2, feasible=True, bound=9.0),
            dict(base, solver="cheat", role="heuristic", status="solved", proven_optimal=False, objective=9.0,
                 feasible=True),
            dict(base, solver="infeasible", role="heuristic", status="solved", proven_optimal=False,
                 objective=12.0, feasible=False),
            dict(base, solver="fine", role="heuristic", status="solved", proven_optimal=False, objective=12.0,
                 feasible=True),
            dict(base, solver="claims-exact", role="exact", status="solved", proven_optimal=False,
                 objective=10.1, feasible=True)]
    assert judge(rows, "exact") == 10.0
    v = {r["solver"]: r["check"] for r in rows}
    assert v["ref"] == "ok" and v["fine"] == "ok" and v["lim-ok"] == "time_limit"
    for bad in ("other", "lim", "cheat", "infeasible", "claims-exact"):
        assert v[bad].startswith("FAIL"), (bad, v[bad])


@pytest.mark.parametrize("gap_tol,feas_tol,beat,ok", [
    (0.0, 0.0, 5e-7, False),      # an exact proof (enumeration): 5e-7 below it refutes it
    (1e-6, 0.0, 5e-7, True),      # a proof within a 1e-6 relative gap: 5e-7 below is within its claim
    (1e-6, 0.0, 5e-6, False),     # ... 5e-6 below is not
    (1e-6, 1e-6, 1.5e-6, True),   # the feasibility tolerance widens the claim
    (0.0, 0.0, 2e-10, True),      # round-off (1e-9 relative) is never a refutation
])
def test_heuristics_are_held_to_the_reference_s_reported_tolerance(gap_tol, feas_tol, beat, ok):
    base = {"program": "p", "kind": "MIQP", "instance": "i", "family": "random", "inputs": "", "bound": None,
            "solver_gap": None, "time_s": 0.0, "gap": float("nan"), "abs_gap": float("nan"), "check": "", "note": "",
            "atol": 0.0}
    rows = [dict(base, solver="ref", role="reference", status="optimal", proven_optimal=True, objective=10.0,
                 feasible=True, gap_tol=gap_tol, feas_tol=feas_tol),
            dict(base, solver="h", role="heuristic", status="solved", proven_optimal=False,
                 objective=10.0 * (1 - beat), feasible=True)]
    judge(rows, "exact")
    assert (rows[1]["check"] == "ok") == ok, rows[1]["check"]
    if not ok:
        assert "proven optimum of ref" in rows[1]["check"]


def test_exact_production_solver_is_held_to_the_optimum():
    p = LayerProblem.random(3, 8, seed=1)
    lam = 0.05 * float(p.target(torch.float64).abs().max())
    prog = l1_program(p, lam)
    good = Producer("good", lambda: {"W": get_backend("cvxpy").solve(prog).W}, True)
    bad = Producer("bad", lambda: {"W": p.W0.clone()}, True)
    R = Runner(time_limit=5, quick=True, include=["cvxpy"])
    rows = R.run_case(_case(prog, "l1", "convex", [good, bad]))
    v = {r["solver"]: r["check"] for r in rows}
    assert v["good"] == "ok" and v["bad"].startswith("FAIL")


def test_backends_are_selected_by_capability():
    S = torch.rand(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    names = lambda prog: {lab for lab, _, _ in select_backends(prog, quick=True)[0]}
    mask = names(mask_program(S, ExpanderNM(2, 4, 1)))
    assert "flow" in mask and "enumerate" in mask
    miqp = names(l0_program(LayerProblem.random(2, 8, seed=0), NM(2, 4)))
    assert "flow" not in miqp and "cvxpy" not in miqp and "enumerate" in miqp
    p = LayerProblem.random(2, 8, seed=0)
    l1 = names(l1_program(p, 0.1))
    assert "enumerate" not in l1 and "flow" not in l1 and "cvxpy" in l1
    if get_backend("scip").available():
        assert "scip" in l1
    full = {lab for lab, _, _ in select_backends(refit_program(p, torch.rand(2, 8) < 0.5), quick=False)[0]}
    assert {"cvxpy", "cvxpy-osqp", "cvxpy-scs"} <= full  # the cvxpy backend's declared variants


def test_instance_families_are_distinct_and_seeded():
    f = InstanceFactory(seed=3)
    a = [f.problem(k, 2, 8) for k in range(8)]
    b = [InstanceFactory(seed=3).problem(k, 2, 8) for k in range(8)]
    assert [x[1] for x in a[:4]] == ["random", "ill-conditioned", "low-rank", "real-slice"]
    for (p, _, _), (q, _, _) in zip(a, b):
        assert torch.equal(p.W0, q.W0) and torch.equal(p.H, q.H)
    assert not torch.equal(a[0][0].W0, a[4][0].W0)
    conds = {}
    for p, fam, _ in (f.problem(k, 4, 8) for k in range(12)):
        e = torch.linalg.eigvalsh(p.Hh)
        conds.setdefault(fam, []).append(float(e.max() / e.min().clamp_min(1e-300)))
    assert max(conds["random"]) < min(max(conds["ill-conditioned"]), max(conds["low-rank"]))


def test_bad_arguments_fail_with_the_choices():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["verify", "--quick", "--instances", "0"])
    assert rc == 2 and "instances" in err.getvalue()
    from optprune.solvers.verification import verify
    with pytest.raises(ValueError, match="registered"):
        verify(quick=True, backends=["no-such-backend"])


def test_backend_tutorial_runs():
    """The "Adding a reference backend" section of the docs: its python block registers a backend that a quick
    verification selects by capability."""
    import re
    from pathlib import Path
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = (docs / "extending.md").read_text()
    assert "## Adding a reference backend" in text
    section = text.split("## Adding a reference backend", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    list_backends()  # load the backends before isolated() saves the registries
    before = set(list_backends())
    with isolated():
        for b in blocks:
            exec(compile(b, "docs:adding-a-reference-backend", "exec"), {"__name__": "tutorial"})
        assert set(list_backends()) - before
    assert set(list_backends()) == before


def test_plugin_pattern_kind_is_verified_without_touching_verify():
    """A pattern kind registered from outside (here: every input column keeps half its weights) and a method that
    accepts it are cross-checked on the kind's own L0 program against the exact references; a kind whose class
    cannot produce an instance from its name is named in the notes instead of being skipped silently."""
    from optprune.formulations.patterns import LinearRow, Pattern, register_pattern
    from optprune.solvers.verification import verify

    class HalfColumns(Pattern):
        kinds = ("halfcol",)
        syntax = "halfcol"

        @classmethod
        def parse(cls, text, sparsity=None, **params):
            return cls() if text == "halfcol" else None

        name = "halfcol"

        def _keep(self, m):
            return m - m // 2

        def kept_count(self, shape):
            return shape[1] * self._keep(shape[0])

        def project(self, scores):
            top = torch.topk(scores, self._keep(scores.shape[0]), dim=0).indices
            return torch.zeros(scores.shape, dtype=torch.bool).scatter_(0, top, True)

        def is_feasible(self, mask):
            return bool((mask.sum(0) <= self._keep(mask.shape[0])).all())

        def constraints(self, shape):
            m, n = shape
            return [LinearRow([("z", torch.arange(j, m * n, n), torch.ones(m, dtype=torch.float64))], "<=",
                              self._keep(m)) for j in range(n)]

    class Unnamed(HalfColumns):
        kinds = ("unnamedkind",)

        @classmethod
        def parse(cls, text, sparsity=None, **params):
            return None

    def colmag(problem, pattern):
        mask = pattern.project(problem.W0.abs())
        return LayerResult(problem.W0 * mask, mask, {})

    list_backends()
    with isolated():
        register_pattern(HalfColumns)
        register_pattern(Unnamed)
        register_method("colmag", needs="none", patterns=("halfcol", "unnamedkind"))(colmag)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rows = verify(quick=True, instances=2, programs=["halfcol"], backends=["enumerate"], _cli=True)
    mine = [r for r in rows if r["solver"] == "colmag"]
    assert mine and {r["program"] for r in mine} == {"L0 halfcol"}
    assert all(r["check"] == "ok" and r["gap"] >= -1e-9 for r in mine)   # feasible, never below the optimum
    assert any(r["solver"] == "enumerate" and r["status"] == "optimal" for r in rows if r["program"] == "L0 halfcol")
    assert "pattern kind 'unnamedkind' is not verified" in buf.getvalue()
