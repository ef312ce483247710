"""Reference backends: cvxpy, Gurobi, SCIP and exhaustive enumeration, against each other and the torch side.

Every test that needs an optional solver package skips with the reason when it is absent.
"""
import itertools
import math

import pytest
import torch

from optprune.formulations import NM, ColumnGroups, ExpanderNM, LayerProblem, Unstructured
from optprune.formulations.programs import l0_program, l1_program, mask_program, refit_program
from optprune.solvers import LicenseLimitError, SolverUnavailable, get_backend, get_method
from optprune.solvers.methods.baselines import refit_weights


def backend(name):
    b = get_backend(name)
    if not b.available():
        pytest.skip(f"{name}: solver package not installed")
    return b


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


L0_PATTERNS = [Unstructured(0.5), Unstructured(0.5, "row"), NM(2, 4), ColumnGroups(2, sparsity=0.5)]
INSTANCES = [("random", False), ("correlated", True), ("outliers", False), ("dead", True)]


# ------------------------------------------------------------------------------------------- cvxpy
@pytest.mark.parametrize("solver", ["CLARABEL", "OSQP", "SCS"])
@pytest.mark.parametrize("kind,corrected", INSTANCES)
def test_cvxpy_refit_qp_matches_torch_refit(solver, kind, corrected):
    cv = backend("cvxpy")
    p = LayerProblem.random(6, 12, kind=kind, corrected=corrected, seed=2)
    mask = get_method("wanda")(p, Unstructured(0.5)).mask
    prog = refit_program(p, mask)
    r = cv.solve(prog, solver=solver)
    if solver == "OSQP":  # first-order: its answer meets tolerances, it is not a proof
        assert r.status == "first-order" and not r.proven_optimal, r.info
    else:
        assert r.status == "optimal" and r.proven_optimal, r.info
    assert prog.check(r.values)["feasible"]
    assert r.objective == pytest.approx(prog.evaluate(r.values), rel=1e-14)  # objective = Program.evaluate
    W = refit_weights(p, mask)
    assert rel(r.objective, p.objective(W)) <= 1e-6
    assert r.time > 0 and r.info["solver_time_s"] is not None


def test_cvxpy_layer_sized_qp_is_quick_and_exact():
    cv = backend("cvxpy")
    p = LayerProblem.random(32, 64, kind="outliers", corrected=True, seed=3)
    mask = get_method("sparsegpt")(p, NM(2, 4)).mask
    r = cv.solve(refit_program(p, mask))
    assert r.proven_optimal and rel(r.objective, p.objective(refit_weights(p, mask))) <= 1e-6


@pytest.mark.parametrize("kind,corrected", INSTANCES)
def test_l1_model_cvxpy_and_gurobi_agree(kind, corrected):
    cv = backend("cvxpy")
    p = LayerProblem.random(4, 8, kind=kind, corrected=corrected, seed=4)
    lam = 0.05 * float(p.target().abs().max())
    prog = l1_program(p, lam)
    r = cv.solve(prog)
    assert r.proven_optimal
    assert prog.kkt_residual(r.values, zero_tol=1e-7) <= 1e-4  # interior point: KKT up to its tolerance
    s = cv.solve(prog, solver="SCS")
    assert rel(s.objective, r.objective) <= 1e-6
    try:
        g = backend("gurobi").solve(prog)
    except LicenseLimitError as e:
        pytest.skip(str(e))
    assert g.proven_optimal and rel(g.objective, r.objective) <= 1e-6


def test_cvxpy_refuses_integer_coupling_and_solves_mask_lp():
    cv = backend("cvxpy")
    p = LayerProblem.random(4, 8, seed=0)
    ok, why = cv.supports(l0_program(p, NM(2, 4)))
    assert not ok and why
    with pytest.raises(SolverUnavailable):
        cv.solve(l0_program(p, NM(2, 4)))
    S = torch.rand(8, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for pat in (NM(2, 4), NM(1, 4)):
        prog = mask_program(S, pat)
        r = cv.solve(prog, solver="HIGHS")
        assert r.proven_optimal and r.info["max_fractionality"] <= 1e-6  # TU: the LP optimum is a mask
        assert torch.equal(r.mask, pat.project(S))
        assert rel(r.objective, -float((S * pat.project(S)).sum())) <= 1e-9


# ------------------------------------------------------------------------------------------- enumeration
def brute_force_l0(p, pat):
    """Independent brute force: every feasible mask of the whole matrix, refit, minimum."""
    m, n = p.shape
    best = math.inf
    for bits in itertools.product([False, True], repeat=m * n):
        mk = torch.tensor(bits).reshape(m, n)
        if not pat.is_feasible(mk):
            continue
        best = min(best, p.objective(refit_weights(p, mk) * mk))
    return best


@pytest.mark.parametrize("pat", [Unstructured(0.5), Unstructured(0.4, "row"), NM(2, 4), NM(1, 2),
                                 ColumnGroups(1, keep=2)], ids=lambda p: repr(p))
def test_enumeration_equals_whole_matrix_brute_force(pat):
    """The row decomposition (and the budget DP for the per-matrix count) is exact."""
    p = LayerProblem.random(2, 4, kind="correlated", corrected=True, seed=5)
    r = get_backend("enumerate").solve(l0_program(p, pat))
    assert r.proven_optimal and r.gap == 0.0
    assert rel(r.objective, brute_force_l0(p, pat)) <= 1e-9
    assert l0_program(p, pat).check(r.values)["feasible"]


class _ColumnBudget:
    """A pattern the enumerator knows only through its linear rows (a plug-in): each column keeps ≤ 1 weight."""

    @staticmethod
    def make():
        from optprune.formulations.patterns import LinearRow, Pattern

        class ColumnBudget(Pattern):
            name = "column-budget"

            def kept_count(self, shape):
                return shape[1]

            def is_feasible(self, mask):
                return bool((mask.sum(0) <= 1).all())

            def project(self, scores):
                top = scores.argmax(0, keepdim=True)
                return torch.zeros(scores.shape, dtype=torch.bool).scatter_(0, top, True)

            def constraints(self, shape):
                m, n = shape
                return [LinearRow([("z", torch.arange(j, m * n, n), torch.ones(m, dtype=torch.float64))], "<=", 1)
                        for j in range(n)]
        return ColumnBudget()


@pytest.mark.parametrize("kind", ["correlated", "random", "dead"])
def test_enumeration_of_a_plugin_pattern_equals_brute_force(kind):
    """Patterns that are not built in are enumerated over whole-matrix masks against their own rows."""
    pat = _ColumnBudget.make()
    p = LayerProblem.random(3, 4, kind=kind, corrected=True, seed=7)
    r = get_backend("enumerate").solve(l0_program(p, pat))
    assert r.proven_optimal
    assert rel(r.objective, brute_force_l0(p, pat)) <= 1e-9
    assert pat.is_feasible(r.values["z"].bool())


def test_enumeration_refuses_large_instances_with_a_message():
    en = get_backend("enumerate")
    p = LayerProblem.random(8, 24, seed=0)
    prog = l0_program(p, Unstructured(0.5))
    ok, why = en.supports(prog)
    assert not ok and "2^20" in why
    with pytest.raises(SolverUnavailable, match="limit"):
        en.solve(prog)


def test_enumeration_of_mask_programs():
    en = get_backend("enumerate")
    S = torch.rand(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = en.solve(mask_program(S, NM(2, 4)))
    assert torch.equal(r.mask, NM(2, 4).project(S))
    e = en.solve(mask_program(S, ExpanderNM(2, 4, 2)))
    assert ExpanderNM(2, 4, 2).is_feasible(e.mask) and e.objective >= r.objective - 1e-12


# ------------------------------------------------------------------------------------------- MIQP solvers
@pytest.mark.parametrize("pat", L0_PATTERNS, ids=lambda p: p.name)
@pytest.mark.parametrize("kind,corrected", INSTANCES)
def test_gurobi_miqp_optimum_equals_enumeration(pat, kind, corrected):
    gb = backend("gurobi")
    p = LayerProblem.random(3, 8, kind=kind, corrected=corrected, seed=6)
    prog = l0_program(p, pat)
    ref = get_backend("enumerate").solve(prog)
    r = gb.solve(prog, time_limit=60, threads=1)
    assert r.status == "optimal" and r.proven_optimal
    assert rel(r.objective, ref.objective) <= 1e-6
    assert prog.check(r.values)["feasible"]
    assert r.bound is not None and r.bound <= r.objective * (1 + 1e-6) + 1e-9 and r.gap <= 1e-6
    if r.info.get("indicator_mode") == "bigm":
        assert r.info["bigm_max_ratio"] < 1.0  # the big-M bound was not active at the solution
    for h in ("magnitude", "wanda", "sparsegpt", "ria"):  # heuristics never beat the proven optimum
        if isinstance(pat, ColumnGroups):
            break
        res = get_method(h)(p, pat)
        assert prog.check({"W": res.W.double(), "z": res.mask.double()})["feasible"]
        assert p.objective(res.W) >= r.objective * (1 - 1e-9)


def test_gurobi_indicator_constraints_agree_with_big_m():
    gb = backend("gurobi")
    p = LayerProblem.random(3, 8, kind="outliers", corrected=True, seed=7)
    prog = l0_program(p, NM(2, 4))
    a = gb.solve(prog, indicator="bigm", threads=1)
    b = gb.solve(prog, indicator="indicator", threads=1)
    assert a.info["indicator_mode"] == "bigm" and b.info["indicator_mode"] == "indicator"
    assert rel(a.objective, b.objective) <= 1e-6


def test_gurobi_time_limit_is_reported_as_not_proven():
    gb = backend("gurobi")
    p = LayerProblem.random(6, 8, kind="correlated", corrected=True, seed=1)  # ~10^5 B&B nodes to prove
    prog = l0_program(p, Unstructured(0.5))
    try:
        r = gb.solve(prog, time_limit=0.3, threads=1)
    except LicenseLimitError as e:
        pytest.skip(str(e))
    if r.proven_optimal:
        pytest.skip("solved to optimality inside the time limit on this machine")
    assert r.status == "time_limit" and r.gap > 0
    assert prog.check(r.values)["feasible"]  # the warm-started incumbent is still a feasible solution


def test_gurobi_licence_limit_is_detected_before_solving():
    gb = backend("gurobi")
    from optprune.solvers.backends.gurobi import gurobi_size_limited
    if not gurobi_size_limited():
        pytest.skip("this Gurobi licence is not size-limited")
    p = LayerProblem.random(20, 20, seed=0)
    prog = l0_program(p, Unstructured(0.5))
    with pytest.raises(LicenseLimitError) as ei:
        gb.solve(prog)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "200 variables" in msg and "800 variables" in msg and "scip" in msg and "enumerate" in msg
    ok, why = gb.supports(prog)
    assert not ok and why == msg
    # a mask MILP over 2000 variables names its own limit and the fallbacks
    S = torch.rand(48, 48, dtype=torch.float64)
    with pytest.raises(LicenseLimitError, match="at most 2000 variables.*2304 variables.*cvxpy"):
        gb.solve(mask_program(S, NM(2, 4)))
    # a refit QP over 200 free weights: the convex fallback
    mask = torch.rand(20, 20, generator=torch.Generator().manual_seed(0)) < 0.6
    with pytest.raises(LicenseLimitError, match="QP model.*'cvxpy'"):
        gb.solve(refit_program(p, mask))


def test_gurobi_errno_10010_is_translated(monkeypatch):
    """If the pre-check were wrong, Gurobi's own errno 10010 becomes the same one-line LicenseLimitError."""
    gb = backend("gurobi")
    from optprune.solvers.backends.gurobi import gurobi_size_limited
    if not gurobi_size_limited():
        pytest.skip("this Gurobi licence is not size-limited")
    monkeypatch.setattr(type(gb), "licence_check", lambda self, program, indicator="auto": None)
    p = LayerProblem.random(20, 20, seed=0)
    with pytest.raises(LicenseLimitError) as ei:
        gb.solve(l0_program(p, NM(2, 4)), warm_start=False)
    assert "\n" not in str(ei.value) and "size-limited" in str(ei.value)


@pytest.mark.parametrize("pat", [Unstructured(0.5), NM(2, 4), ColumnGroups(2, keep=2)], ids=lambda p: p.name)
def test_scip_miqp_optimum_equals_enumeration(pat):
    sc = backend("scip")
    p = LayerProblem.random(2, 8, kind="random", corrected=True, seed=8)
    prog = l0_program(p, pat)
    ref = get_backend("enumerate").solve(prog)
    r = sc.solve(prog, time_limit=120)
    assert r.proven_optimal, r.info
    assert rel(r.objective, ref.objective) <= 1e-6
    assert prog.check(r.values)["feasible"]
    assert r.bound <= r.objective * (1 + 1e-6) + 1e-9


def test_scip_milp_and_qp():
    sc = backend("scip")
    S = torch.rand(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = sc.solve(mask_program(S, NM(2, 4)))
    assert r.proven_optimal and torch.equal(r.mask, NM(2, 4).project(S))
    p = LayerProblem.random(3, 6, corrected=True, seed=9)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(4)) < 0.6
    q = sc.solve(refit_program(p, mask))
    assert q.proven_optimal and rel(q.objective, p.objective(refit_weights(p, mask))) <= 1e-6


def test_backends_declare_capabilities():
    for name in ("cvxpy", "gurobi", "scip", "enumerate"):
        b = get_backend(name)
        c = b.capabilities
        assert c.kinds and isinstance(c.proves_optimality, bool)
    assert "MIQP" in get_backend("gurobi").capabilities.kinds
    assert "MIQP" not in get_backend("cvxpy").capabilities.kinds
    caps = {n: get_backend(n).capabilities for n in ("cvxpy", "gurobi", "scip", "enumerate", "flow")}
    assert caps["flow"].network_flow and caps["flow"].patterns == {"nm", "expander"}
    assert caps["enumerate"].integer and not caps["enumerate"].convex
    assert caps["cvxpy"].convex and not caps["cvxpy"].integer  # integer programs only as an LP relaxation
    assert caps["scip"].integer and "L1" in caps["scip"].kinds


def test_pattern_capability_refuses_other_patterns():
    S = torch.rand(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ok, why = backend("flow").supports(mask_program(S, ColumnGroups(2, sparsity=0.5)))
    assert not ok and "groups" in why


def test_scip_l1_matches_cvxpy():
    sc = backend("scip")
    p = LayerProblem.random(4, 8, kind="correlated", corrected=True, seed=5)
    lam = 0.05 * float(p.target(torch.float64).abs().max())
    r = sc.solve(l1_program(p, lam), time_limit=30)
    ref = backend("cvxpy").solve(l1_program(p, lam))
    assert r.proven_optimal and rel(r.objective, ref.objective) <= 1e-6
