"""Certificates: the ℓ1 model's certified duality gap (FISTA) and lower bounds on the L0 programs' optima.

Every certified gap must be ≥ the true gap (true optimum from cvxpy/Clarabel at tight tolerance); every lower
bound must be ≤ the exact optimum (enumeration; Gurobi or SCIP for expander N:M, whose rows are coupled).
"""
import json

import pytest
import torch

from optprune.formulations import LayerProblem, NM, Unstructured
from optprune.formulations.patterns import ColumnGroups, ExpanderNM
from optprune.formulations.programs import l0_program, l1_program
from optprune.solvers import get_backend, get_method
from optprune.solvers.verification.certificates import certify_layer, l0_lower_bound, summarize_certificates
from optprune.solvers.methods.fista import fista_l1, ill_conditioned_problem, l1_certificate

KINDS = [("random", False), ("correlated", True), ("outliers", False), ("dead", True)]


def _lam(p):
    return 0.05 * float(p.target(torch.float64).abs().max())


@pytest.mark.parametrize("kind,corr", KINDS)
def test_certified_l1_gap_bounds_the_true_gap(kind, corr):
    cv = get_backend("cvxpy")
    if not cv.available():
        pytest.skip("cvxpy not installed")
    for seed in range(2):
        p = LayerProblem.random(4, 8, kind=kind, corrected=corr, seed=seed)
        lam = _lam(p)
        ref = cv.solve(l1_program(p, lam))
        assert ref.proven_optimal
        Fst = ref.objective
        gaps = []
        for iters in (1, 3, 10, 30, 3000):
            c = fista_l1(p, lam, iters=iters, tol=0.0).certificate
            true_gap = c.primal - Fst
            slack = 1e-9 * abs(Fst)  # Clarabel's own accuracy
            assert c.gap >= true_gap - slack, (kind, seed, iters, c.gap, true_gap)
            assert c.dual <= Fst + slack, (kind, seed, iters)
            gaps.append(c.rel_gap)
        assert gaps[0] > 1e-6  # early iterates are certified as far from optimal ...
        assert gaps[-1] <= 1e-8  # ... and the converged one as optimal: the certificate is not vacuous


def test_l1_certificate_of_arbitrary_points_and_float32():
    p = LayerProblem.random(5, 12, kind="correlated", corrected=True, seed=4)
    lam = _lam(p)
    Fst = get_backend("cvxpy").solve(l1_program(p, lam)).objective
    g = torch.Generator().manual_seed(0)
    for W in (torch.zeros(5, 12, dtype=torch.float64), p.W0.clone(), torch.randn(5, 12, generator=g, dtype=torch.float64)):
        c = l1_certificate(p, lam, W)
        assert c.primal == pytest.approx(p.objective(W) + lam * float(W.abs().sum()), rel=1e-10)
        assert c.dual <= Fst * (1 + 1e-9) and c.gap >= c.primal - Fst - 1e-9 * Fst
    p32 = p.to(torch.float32)
    c32 = l1_certificate(p32, lam, fista_l1(p32, lam, iters=50, tol=0.0).W)
    assert c32.dual <= Fst * (1 + 1e-6)


def test_fista_l1_stops_on_the_certified_gap():
    p = ill_conditioned_problem(8, 32, 1e4, seed=1)
    lam = _lam(p)
    capped = fista_l1(p, lam, iters=5000, tol=0.0)
    stopped = fista_l1(p, lam, iters=5000, tol=0.0, gap_tol=1e-6)
    assert stopped.iterations < capped.iterations == 5000
    assert stopped.certificate.rel_gap <= 1e-6 * 1.01
    few = fista_l1(p, lam, iters=20, tol=0.0, gap_tol=1e-12)  # the count stays the cap
    assert few.iterations == 20


def test_fista_pruner_records_its_certificate_and_keeps_quality():
    for seed, pat in ((0, NM(2, 4)), (1, Unstructured(0.5)), (2, Unstructured(0.5, "row"))):
        p = LayerProblem.random(16, 32, kind="correlated", corrected=True, seed=seed, dtype=torch.float32)
        fista = get_method("fista")
        res = fista(p, pat)
        cert = res.info["l1_certificate"]
        assert cert["gap"] >= 0 and cert["dual"] <= cert["primal"] and 0 <= cert["rel_gap"] <= 1
        assert cert["iterations"] <= res.info["iters"]
        uncapped = fista(p, pat, gap_tol=0.0)  # the previous rule: iteration count only
        assert res.info["error"] <= uncapped.info["error"] * (1 + 1e-6)


PATTERNS = [Unstructured(0.5), Unstructured(0.5, "row"), NM(2, 4), ColumnGroups(2, sparsity=0.5)]


@pytest.mark.parametrize("kind,corr", KINDS)
def test_l0_bounds_are_below_the_exact_optimum(kind, corr):
    en = get_backend("enumerate")
    tight = 0
    for seed in range(3):
        p = LayerProblem.random(4, 8, kind=kind, corrected=corr, seed=seed)
        for pat in PATTERNS:
            opt = en.solve(l0_program(p, pat)).objective
            b = l0_lower_bound(p, pat)
            assert b.bound <= opt * (1 + 1e-9) + 1e-12, (kind, seed, pat.name, b.bound, opt)
            assert b.bound >= b.f_unconstrained - 1e-9 * abs(b.f_unconstrained)
            tight += b.bound > b.f_unconstrained * (1 + 1e-6) + 1e-9
    assert tight > 0  # the bound adds something to f* (not vacuous)


def test_l0_bound_expander_against_a_mip_solver():
    for name in ("gurobi", "scip"):
        b = get_backend(name)
        if b.available():
            break
    else:
        pytest.skip("neither gurobi nor scip installed")
    for seed in range(3):
        p = LayerProblem.random(4, 4, kind="outliers", seed=seed)
        pat = ExpanderNM(2, 4, 1)
        r = b.solve(l0_program(p, pat), time_limit=20)
        assert r.proven_optimal
        assert l0_lower_bound(p, pat).bound <= r.objective * (1 + 1e-9)


def test_l0_bound_is_exact_for_a_diagonal_gram():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(3, 8, generator=g, dtype=torch.float64)
    H = torch.diag(torch.rand(8, generator=g, dtype=torch.float64) + 0.1)
    p = LayerProblem(W0=W0, H=H, name="diag")
    en = get_backend("enumerate")
    for pat in PATTERNS:
        opt = en.solve(l0_program(p, pat)).objective
        assert l0_lower_bound(p, pat).bound == pytest.approx(opt, rel=1e-9), pat.name


def test_certify_layer_record_and_summary():
    p = LayerProblem.random(8, 16, kind="correlated", corrected=True, seed=3)
    res = get_method("sparsegpt")(p, NM(2, 4))
    rec = certify_layer(p, NM(2, 4), res)
    assert rec["objective"] == pytest.approx(p.objective(res.W), rel=1e-9)
    assert rec["lower_bound"] <= rec["objective"] and 0 <= rec["rel_gap"] <= 1
    assert "l1" not in rec
    rec2 = certify_layer(p, NM(2, 4), get_method("fista")(p, NM(2, 4)))
    assert rec2["l1"]["gap"] >= 0
    s = summarize_certificates([{"name": "a", "certificate": rec}, {"name": "b", "certificate": rec2}, {"name": "c"}])
    assert s["l0_rel_gap"]["n"] == 2 and s["l1_rel_gap"]["n"] == 1 and s["weakest"][0]["name"] in ("a", "b")
    json.dumps(s)
    assert summarize_certificates([{"name": "c"}]) is None


@pytest.mark.slow
def test_prune_certify_on_stories(stories_dir, tmp_path):
    from optprune.cli import main
    rc = main(["prune", "--model", "stories260k", "--model-dir", str(stories_dir.parent), "--method", "fista",
               "--certify", "--no-eval", "--no-kl", "--output", str(tmp_path / "out")])
    assert rc == 0
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    layers = rec["layers"]
    assert layers and all("certificate" in r for r in layers)
    for r in layers:
        c = r["certificate"]
        assert c["lower_bound"] <= c["objective"] * (1 + 1e-9)
        assert c["objective"] == pytest.approx(r["error"], rel=1e-4)
        assert c["l1"]["gap"] >= 0
    assert rec["summary"]["certificates"]["l0_rel_gap"]["n"] == len(layers)
    import optprune  # the API takes the same option
    _, rec2 = optprune.prune("stories260k", method="magnitude", certify=True, model_dir=str(stories_dir.parent),
                             progress=False)
    assert all(r["certificate"]["lower_bound"] <= r["certificate"]["objective"] for r in rec2["layers"])


def test_certify_refused_with_low_memory(tmp_path):
    from optprune.cli import main
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["prune", "--model", "stories260k", "--method", "wanda", "--certify", "--low-memory",
                   "--output", str(tmp_path / "o")])
    assert rc == 2 and "--certify" in err.getvalue()
    assert not (tmp_path / "o").exists()


def test_bounds_of_layers_sharing_a_gram_match_fresh_ones():
    """Sub-layers fed by the same inputs share Ĥ: its spectral data is reused, never stale."""
    p = LayerProblem.random(4, 8, kind="outliers", seed=7)
    g = torch.Generator().manual_seed(1)
    q = LayerProblem(W0=torch.randn(4, 8, generator=g, dtype=torch.float64), H=p.H, name="same H")
    b_p, b_q = l0_lower_bound(p, NM(2, 4)).bound, l0_lower_bound(q, NM(2, 4)).bound
    fresh = lambda x: LayerProblem(W0=x.W0.clone(), H=x.H.clone(), name="fresh")
    assert b_p == pytest.approx(l0_lower_bound(fresh(p), NM(2, 4)).bound, rel=1e-12)
    assert b_q == pytest.approx(l0_lower_bound(fresh(q), NM(2, 4)).bound, rel=1e-12)
    l0_lower_bound(q, NM(2, 4))
    q.H.mul_(2.0)  # modified in place: the cached decomposition must not be used
    assert l0_lower_bound(q, NM(2, 4)).bound == pytest.approx(l0_lower_bound(fresh(q), NM(2, 4)).bound, rel=1e-12)


def test_optimal_diagonal_raises_the_bound_on_correlated_grams():
    """The SDP-in-the-diagonal search stays ≤ the exact optimum and lifts the best fixed combination on
    correlated, error-corrected instances."""
    en = get_backend("enumerate")
    lifted = total = 0
    for seed in range(4):
        p = LayerProblem.random(4, 8, kind="correlated", corrected=True, seed=seed)
        for pat in PATTERNS:
            opt = en.solve(l0_program(p, pat)).objective
            new, old = l0_lower_bound(p, pat, lagrangian=False), l0_lower_bound(p, pat, sdp_rounds=0, lagrangian=False)
            assert old.method != new.method or new.bound == old.bound
            assert new.info["mixtures_bound"] == pytest.approx(old.bound, rel=1e-12)
            assert old.bound <= new.bound <= opt * (1 + 1e-9) + 1e-12, (seed, pat.name, new.bound, opt)
            lifted += new.bound > old.bound * (1 + 1e-6)
            total += 1
    assert lifted >= total // 2, (lifted, total)


def test_certificate_names_the_bound_that_produced_it():
    p = LayerProblem.random(8, 16, kind="correlated", corrected=True, seed=3)
    rec = certify_layer(p, NM(2, 4), get_method("sparsegpt")(p, NM(2, 4)))
    # N:M rows are independent: the bound takes, row by row, the better of the two diagonals
    assert rec["lower_bound"] >= max(rec["bound_mixtures"], rec["bound_sdp"]) * (1 - 1e-12)
    assert rec["bound_method"].startswith("diagonal-shift bound")
    if "branch-and-bound" in rec["bound_method"]:
        assert rec["lower_bound"] == rec["bound_bnb"]["bound"] > max(rec["bound_mixtures"], rec["bound_sdp"])
    else:
        assert ("optimal diagonal" in rec["bound_method"]) == (rec["lower_bound"] > rec["bound_mixtures"])


# ---------------------------------------------------------------- bounds that certify: Lagrangian and B&B
FAMILY = [(kind, corr, seed) for kind, corr in KINDS for seed in range(9)]  # 36 instances × 3 patterns
FAMILY_PATTERNS = [Unstructured(0.5), Unstructured(0.5, "row"), NM(2, 4)]


def test_lagrangian_and_branch_and_bound_stay_below_the_exact_optimum():
    """On every instance of a 108-instance family the bound is ≤ the enumerated optimum; on correlated,
    error-corrected Grams it is strictly above the old diagonal bound; the certificate names its bound."""
    en = get_backend("enumerate")
    lifted = correlated = 0
    methods = set()
    for kind, corr, seed in FAMILY:
        p = LayerProblem.random(3, 8, kind=kind, corrected=corr, seed=seed)
        for pat in FAMILY_PATTERNS:
            opt = en.solve(l0_program(p, pat)).objective
            old = l0_lower_bound(p, pat, sdp_rounds=0, lagrangian=False)
            new = l0_lower_bound(p, pat, sdp_rounds=0, bnb_time_s=5.0, bnb_row_s=2.0)
            assert new.bound <= opt * (1 + 1e-9) + 1e-12, (kind, seed, pat.name, new.bound, opt)
            assert new.bound >= old.bound * (1 - 1e-12)
            methods.add(new.method)
            if kind == "correlated":
                correlated += 1
                lifted += new.bound > old.bound * (1 + 1e-6)
    assert lifted == correlated, (lifted, correlated)
    from optprune.solvers.verification.certificates import METHOD_BNB, METHOD_LAGRANGIAN
    assert {METHOD_BNB, METHOD_LAGRANGIAN} <= methods


def test_branch_and_bound_closes_on_the_row_optimum_and_is_anytime():
    """A search that closes returns each row's exact optimum (enumeration, row by row); one cut off after a few
    nodes still returns a valid bound between the root's and the optimum."""
    from optprune.solvers.backends.common import dead_columns, unconstrained_rows
    from optprune.solvers.verification.row_bounds import branch_and_bound_row, live_inverse, row_data
    en = get_backend("enumerate")
    closed = 0
    for kind, corr in KINDS:
        for seed in range(3):
            p = LayerProblem.random(2, 12, kind=kind, corrected=corr, seed=seed)
            for pat in (Unstructured(0.5, "row"), NM(2, 4)):
                Wst, _ = unconstrained_rows(p)
                live = ~torch.from_numpy(dead_columns(p)) & (p.Hh.diagonal() > 0)
                Hinv, slack = live_inverse(p.Hh, live)
                assert Hinv is not None
                d = torch.zeros(12, dtype=torch.float64)  # the weakest valid diagonal: all work is the search's
                for i in range(2):
                    row = p.slice(rows=[i])
                    opt = en.solve(l0_program(row, pat)).objective - float(p.objective(Wst, per_row=True)[i])
                    full = branch_and_bound_row(row_data(Hinv, live, Wst[i], d, pat, 12), time_budget=30, slack=slack)
                    assert full.proven and full.bound == pytest.approx(opt, rel=1e-7, abs=1e-10), (kind, seed, i)
                    assert full.incumbent == pytest.approx(opt, rel=1e-7, abs=1e-10)
                    cut = branch_and_bound_row(row_data(Hinv, live, Wst[i], d, pat, 12), node_limit=3, slack=slack)
                    assert 0.0 <= cut.bound <= opt * (1 + 1e-9) + 1e-12 and cut.nodes <= 3
                    closed += 1
    assert closed == 48


def test_lagrangian_with_diagonal_rows_only_is_valid_and_lifts_the_matrix_bound(monkeypatch):
    """Without the enumerated rows the Lagrangian still takes the best diagonal per row and count: valid, and
    at least the per-matrix diagonal bound (equal to it when one diagonal is used for every row)."""
    import optprune.solvers.verification.row_bounds as rb
    monkeypatch.setattr(rb, "ENUMERATE_MAX", 0)
    en = get_backend("enumerate")
    lifted = 0
    for seed in range(6):
        p = LayerProblem.random(4, 8, kind="correlated", corrected=True, seed=seed)
        opt = en.solve(l0_program(p, Unstructured(0.5))).objective
        b = l0_lower_bound(p, Unstructured(0.5), sdp_rounds=0)
        old = b.info["mixtures_bound"]
        assert old * (1 - 1e-12) <= b.info["lagrangian_bound"] <= opt * (1 + 1e-9)
        lifted += b.info["lagrangian_bound"] > old * (1 + 1e-9)
    assert lifted >= 3, lifted
    # searching the loosest rows at their dual counts (branch-and-bound) lifts it further, still valid
    searched = 0
    for kind, corr in KINDS:
        for seed in range(3):
            p = LayerProblem.random(4, 8, kind=kind, corrected=corr, seed=seed)
            pat = Unstructured(0.5)
            opt = en.solve(l0_program(p, pat)).objective
            up = p.objective(get_method("sparsegpt")(p, pat, refit=True).W, per_row=True)
            lag = l0_lower_bound(p, pat, sdp_rounds=0)
            b = l0_lower_bound(p, pat, sdp_rounds=0, bnb_time_s=3.0, upper_rows=up)
            assert lag.bound * (1 - 1e-12) <= b.bound <= opt * (1 + 1e-9), (kind, seed, b.bound, opt)
            searched += b.info["bnb"]["rows"] > 0 and b.bound > lag.bound * (1 + 1e-6)
    assert searched >= 10, searched
    from optprune.solvers.verification.row_bounds import count_lagrangian, row_count_bounds
    W2 = torch.rand(5, 6, dtype=torch.float64)
    d = torch.rand(6, dtype=torch.float64)
    S = (W2 * d).flatten().sort().values
    val, _ = count_lagrangian(row_count_bounds(W2, [d]), 15)  # one diagonal: the global top-15 bound
    assert val == pytest.approx(0.5 * float(S[:15].sum()), rel=1e-9)


def test_certificate_records_the_search_and_its_time():
    p = LayerProblem.random(4, 16, kind="correlated", corrected=True, seed=2)
    res = get_method("sparsegpt")(p, NM(2, 4))
    rec = certify_layer(p, NM(2, 4), res, bnb_time_s=3.0)
    bnb = rec["bound_bnb"]
    assert bnb["rows"] >= 1 and bnb["time_s"] >= 0 and bnb["nodes"] >= bnb["rows"]
    assert rec["lower_bound"] >= max(rec["bound_mixtures"], rec["bound_sdp"]) * (1 - 1e-12)
    assert rec["lower_bound"] <= rec["objective"] * (1 + 1e-9)
    assert (rec["bound_method"] == "diagonal-shift bound + branch-and-bound on the loosest rows") == (
        bnb["bound"] > max(rec["bound_mixtures"], rec["bound_sdp"]) * (1 + 1e-12))
    off = certify_layer(p, NM(2, 4), res, bnb_time_s=0.0)
    assert "bound_bnb" not in off and off["lower_bound"] <= rec["lower_bound"] * (1 + 1e-12)
    rec_u = certify_layer(p, Unstructured(0.5), get_method("sparsegpt")(p, Unstructured(0.5)))
    assert rec_u["bound_lagrangian"] <= rec_u["lower_bound"] <= rec_u["objective"]
    assert rec_u["bound_method"].startswith("Lagrangian over the count") and rec_u["bound_bnb"]["rows"] >= 1
