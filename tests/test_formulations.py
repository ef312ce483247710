"""The formulation core: layer problem (objective, gradient, bound), patterns and declarative programs."""
import pytest
import torch

from optprune.formulations import (NM, ColumnGroups, ExpanderNM, GramAccumulator, LayerProblem, LinearRow,
                                   NumericalError, PatternError, Unstructured, l0_program, l1_program,
                                   mask_program, parse_pattern, refit_program)

KINDS = ["random", "correlated", "outliers", "dead"]


def activations(m=5, n=8, N=40, seed=0, corrected=False, kind="random"):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(N, n, generator=g, dtype=torch.float64)
    if kind == "dead":
        X[:, 1] = 0
    Xh = X + 0.2 * torch.randn(N, n, generator=g, dtype=torch.float64) if corrected else None
    if Xh is not None and kind == "dead":
        Xh[:, 1] = 0
    return W0, X, Xh


def explicit_f(W, W0, X, Xh):
    """½‖W X̂ − W0 X‖²_F with token-major activations (N × n)."""
    Xh = X if Xh is None else Xh
    R = Xh @ W.T - X @ W0.T
    return 0.5 * float((R * R).sum())


# ------------------------------------------------------------------------------------------- layer problem
@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("kind", ["random", "dead"])
def test_objective_matches_explicit_activations(corrected, kind):
    W0, X, Xh = activations(corrected=corrected, kind=kind)
    p = LayerProblem.from_activations(W0, X, Xh)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        W = torch.randn(W0.shape, generator=g, dtype=torch.float64)
        assert p.objective(W) == pytest.approx(explicit_f(W, W0, X, Xh), rel=1e-12)
        per_row = p.objective(W, per_row=True)
        assert float(per_row.sum()) == pytest.approx(p.objective(W), rel=1e-12)
    assert p.objective(torch.zeros_like(W0)) == pytest.approx(p.constant(), rel=1e-12)
    if not corrected:
        assert p.objective(W0) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_report_is_the_three_objectives_with_shared_products(corrected, dtype):
    W0, X, Xh = activations(corrected=corrected)
    p = LayerProblem.from_activations(W0, X, Xh).to(dtype)
    W = torch.randn(W0.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    before, err, f0 = p.report(W)
    assert err == p.objective(W)  # the same per-row terms, summed in the same order: the same number
    assert err == pytest.approx(explicit_f(W.double(), W0, X, Xh), rel=1e-12 if dtype == torch.float64 else 1e-4)
    assert f0 == pytest.approx(p.constant(), rel=1e-12 if dtype == torch.float64 else 1e-5)
    if corrected:
        assert before == p.objective(p.W0)
        assert before == pytest.approx(explicit_f(W0, W0, X, Xh), rel=1e-10 if dtype == torch.float64 else 1e-3)
    else:
        assert before == 0.0


@pytest.mark.parametrize("corrected", [False, True])
def test_gradient_matches_explicit_and_finite_differences(corrected):
    W0, X, Xh = activations(corrected=corrected)
    p = LayerProblem.from_activations(W0, X, Xh)
    W = torch.randn(W0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    G = p.gradient(W)
    Xh_ = X if Xh is None else Xh
    G_explicit = (Xh_ @ W.T - X @ W0.T).T @ Xh_   # (W X̂ − W0 X) X̂ᵀ
    assert torch.allclose(G, G_explicit, rtol=1e-10, atol=1e-9)
    h = 1e-5
    for (i, j) in [(0, 0), (2, 5), (4, 7)]:
        E = torch.zeros_like(W)
        E[i, j] = h
        fd = (p.objective(W + E) - p.objective(W - E)) / (2 * h)
        assert fd == pytest.approx(float(G[i, j]), rel=1e-6, abs=1e-6)


def test_gram_accumulator_streams_the_same_grams():
    W0, X, Xh = activations(corrected=True)
    acc = GramAccumulator(X.shape[1], corrected=True, dtype=torch.float64)
    for s in range(0, X.shape[0], 7):
        acc.add(X[s:s + 7], Xh[s:s + 7])
    p = acc.problem(W0)
    q = LayerProblem.from_activations(W0, X, Xh)
    for a, b in ((p.H, q.H), (p.Hhat, q.Hhat), (p.C, q.C)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert torch.allclose(p.col_norms() ** 2, (Xh * Xh).sum(0), rtol=1e-12)
    assert acc.nsamples == X.shape[0]


@pytest.mark.parametrize("n,block", [(37, 8), (64, 16), (20, 64)])
def test_symmetric_rank_k_update_is_the_full_product(n, block):
    """The blocked upper-triangle update, mirrored, is XᵀX (float tolerance; same sums in the same order), and
    it touches no entry strictly below the diagonal before the mirror."""
    from optprune.formulations.problem import mirror_upper_, sym_rank_k_update_
    g = torch.Generator().manual_seed(n)
    S = torch.zeros(n, n, dtype=torch.float64)
    full = torch.zeros(n, n, dtype=torch.float64)
    for rows in (11, 5, 30):
        x = torch.randn(rows, n, generator=g, dtype=torch.float64)
        assert sym_rank_k_update_(S, x, block=block, min_n=0)
        full.addmm_(x.T, x)
    assert torch.allclose(torch.triu(S), torch.triu(full), rtol=1e-12, atol=1e-12)
    if n > block:
        assert torch.count_nonzero(torch.tril(S, -block)) == 0  # below the diagonal blocks: not computed
    assert torch.allclose(mirror_upper_(S, block=block), full, rtol=1e-12, atol=1e-12)
    assert torch.equal(S, S.T)


def test_gram_accumulator_wide_inputs_take_the_symmetric_update():
    """Above SYRK_MIN_N columns H and Ĥ are accumulated on the upper triangle and read whole."""
    from optprune.formulations import problem as P
    n = P.SYRK_MIN_N + 3
    g = torch.Generator().manual_seed(0)
    X, Xh = torch.randn(40, n, generator=g), torch.randn(40, n, generator=g)
    acc = GramAccumulator(n, corrected=True)
    acc.add(X[:25], Xh[:25])
    acc.add(X[25:], Xh[25:])
    assert acc._stale == {"_H", "_Hhat"}
    for a, b in ((acc.H, X.T @ X), (acc.Hhat, Xh.T @ Xh), (acc.C, X.T @ Xh)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)
    assert not acc._stale and torch.equal(acc.H, acc.H.T)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("corrected", [False, True])
def test_unconstrained_optimum_is_a_lower_bound(kind, corrected):
    p = LayerProblem.random(6, 12, kind=kind, corrected=corrected, seed=3)
    Wst, fst = p.unconstrained_optimum()
    assert fst == pytest.approx(p.objective(Wst), rel=1e-9, abs=1e-9)
    if not corrected:
        assert fst == 0.0
    else:
        live = ~p.dead_inputs()
        assert p.gradient(Wst)[:, live].abs().max() <= 1e-6 * p.target().abs().max()  # stationary
    g = torch.Generator().manual_seed(4)
    for _ in range(10):
        W = Wst + 0.1 * torch.randn(Wst.shape, generator=g, dtype=torch.float64)
        assert p.objective(W) >= fst - 1e-9 * max(1.0, abs(fst))
    for pat in (Unstructured(0.5), NM(2, 4)):  # every pruned weight matrix is at least as bad
        assert p.objective(pat.project_weights(p.W0)) >= fst - 1e-9 * max(1.0, abs(fst))
    assert p.lower_bound() == pytest.approx(fst, rel=1e-9, abs=1e-12)


def test_problem_validates_inputs():
    W0, X, _ = activations()
    H = X.T @ X
    with pytest.raises(ValueError, match="shape"):
        LayerProblem(W0=W0, H=H[:-1, :-1])
    with pytest.raises(ValueError, match="both"):
        LayerProblem(W0=W0, H=H, Hhat=H)
    bad = H.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="lay"):
        LayerProblem(W0=W0, H=bad, name="lay")
    with pytest.raises(ValueError, match="unknown instance kind"):
        LayerProblem.random(2, 4, kind="nope")


def test_slice_is_the_sub_problem():
    p = LayerProblem.random(6, 8, corrected=True, seed=5)
    cols = torch.tensor([0, 2, 3, 7])
    s = p.slice(slice(1, 4), cols)
    W = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert s.shape == (3, 4)
    full = torch.zeros(6, 8, dtype=torch.float64)
    full[1:4][:, cols] = W
    # the sub-problem ignores the dropped inputs: compare with the full problem restricted to those inputs
    assert torch.allclose(s.gradient(W), (W @ p.Hhat[cols][:, cols] - p.W0[1:4][:, cols] @ p.C[cols][:, cols]))


# ------------------------------------------------------------------------------------------- patterns
def all_masks(m, n):
    idx = torch.arange(1 << (m * n))
    return ((idx.unsqueeze(1) >> torch.arange(m * n)) & 1).bool().reshape(-1, m, n)


TINY_PATTERNS = [Unstructured(0.5), Unstructured(0.25), Unstructured(0.5, "row"), Unstructured(0.7, "row"),
                 NM(2, 4), NM(1, 2), NM(3, 4), ColumnGroups(1, keep=2), ColumnGroups(2, sparsity=0.5),
                 ColumnGroups([[0, 3], [1], [2]], keep=2)]


@pytest.mark.parametrize("pat", TINY_PATTERNS, ids=lambda p: repr(p))
def test_projection_is_feasible_exact_and_optimal(pat):
    """project() keeps exactly the pattern's count and maximises the kept score (checked by enumeration)."""
    m, n = 3, 4
    g = torch.Generator().manual_seed(7)
    feas = torch.stack([mk for mk in all_masks(m, n) if pat.is_feasible(mk)])
    for _ in range(4):
        S = torch.rand(m, n, generator=g, dtype=torch.float64)
        mask = pat.project(S)
        assert mask.dtype == torch.bool and mask.shape == (m, n)
        assert pat.is_feasible(mask)
        assert int(mask.sum()) == pat.kept_count((m, n))  # exact count (no slack)
        best = float((S * feas).sum((1, 2)).max())
        assert float((S * mask).sum()) == pytest.approx(best, rel=1e-12)
    if isinstance(pat, Unstructured) and pat.scope == "row":
        assert (mask.sum(1) == n - int(pat.sparsity * n)).all()
    if isinstance(pat, NM):
        assert (mask.reshape(m, -1, pat.M).sum(2) == pat.N).all()
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    Wp = pat.project_weights(W)
    assert pat.is_feasible(Wp != 0)
    assert torch.equal(Wp != 0, pat.project(W.abs()))


def _constraint_values(pat, mask):
    vals = {"z": mask.to(torch.float64)}
    if isinstance(pat, ColumnGroups):  # choose the best g for the mask: used groups, padded to k
        g = pat.kept_groups_of(mask)
        k = pat.keep_groups(mask.shape[1])
        g[torch.nonzero(~g).reshape(-1)[: max(0, k - int(g.sum()))]] = True
        vals["g"] = g.to(torch.float64)
    return vals


@pytest.mark.parametrize("pat", TINY_PATTERNS + [ExpanderNM(2, 4, 1), ExpanderNM(2, 4, 2)],
                         ids=lambda p: repr(p))
def test_constraint_rows_agree_with_is_feasible(pat):
    m, n = (4, 8) if isinstance(pat, ExpanderNM) else (3, 4)
    g = torch.Generator().manual_seed(8)
    rows = pat.constraints((m, n))
    assert all(isinstance(r, LinearRow) for r in rows)
    seen = {True: 0, False: 0}
    cands = [torch.rand(m, n, generator=g) < q for q in (0.3, 0.5, 0.7) for _ in range(40)]
    if isinstance(pat, ExpanderNM):  # random masks with N per row group, so feasible ones occur too
        for _ in range(200):
            sc = torch.rand(m, n // pat.M, pat.M, generator=g)
            mk = torch.zeros_like(sc, dtype=torch.bool).scatter_(2, sc.topk(pat.N, 2).indices, True)
            cands.append(mk.reshape(m, n))
    else:
        cands += [pat.project(torch.rand(m, n, generator=g)) for _ in range(20)]
    for mk in cands:
        f = pat.is_feasible(mk)
        vals = _constraint_values(pat, mk)
        assert f == all(r.satisfied(vals) for r in rows), (pat, mk)
        seen[f] += 1
    assert seen[True] and seen[False]  # both outcomes were exercised


def test_is_feasible_rejects_violators():
    assert not Unstructured(0.5).is_feasible(torch.ones(2, 4, dtype=torch.bool))
    mk = torch.zeros(2, 4, dtype=torch.bool)
    mk[0, :3] = True
    assert Unstructured(0.5).is_feasible(mk) and not Unstructured(0.5, "row").is_feasible(mk)
    assert not NM(2, 4).is_feasible(mk)
    mk2 = torch.zeros(1, 8, dtype=torch.bool)
    mk2[0, [0, 2, 4, 6]] = True
    assert not ColumnGroups(2, keep=2).is_feasible(mk2) and ColumnGroups(2, keep=4).is_feasible(mk2)
    e = ExpanderNM(2, 4, 1)
    mk3 = torch.zeros(4, 4, dtype=torch.bool)
    mk3[:, :2] = True  # every row keeps 2, but columns 2 and 3 keep none
    assert NM(2, 4).is_feasible(mk3) and not e.is_feasible(mk3)


@pytest.mark.parametrize("make, match", [
    (lambda: Unstructured(-0.1), "sparsity"),
    (lambda: Unstructured(1.0), "sparsity"),
    (lambda: Unstructured(float("nan")), "sparsity"),
    (lambda: Unstructured("half"), "sparsity"),
    (lambda: Unstructured(0.5, scope="col"), "scope"),
    (lambda: NM(3, 2), "N ≤ M"),
    (lambda: NM(0, 4), "N ≥ 1"),
    (lambda: NM(2, 4).project(torch.rand(2, 6)), "divisible by M=4"),
    (lambda: ColumnGroups(3, keep=1).project(torch.rand(2, 8)), "does not divide"),
    (lambda: ColumnGroups(2, keep=1, n=7), "does not divide"),
    (lambda: ColumnGroups(2, keep=9).project(torch.rand(2, 8)), "keep"),
    (lambda: ColumnGroups(2), "exactly one"),
    (lambda: ColumnGroups([[0, 1], [1, 2]], keep=1).project(torch.rand(1, 3)), "partition"),
    (lambda: ExpanderNM(2, 4, 3), "B"),
    (lambda: ExpanderNM(2, 4, 1).validate((6, 8)), "rows"),
    (lambda: parse_pattern("3:2"), "N ≤ M"),
    (lambda: parse_pattern("diagonal"), "unknown pattern"),
    (lambda: parse_pattern("groups"), "needs a sparsity"),
    (lambda: parse_pattern("unstructured", -0.5), "sparsity"),
])
def test_bad_pattern_inputs_give_one_line_pattern_errors(make, match):
    with pytest.raises(PatternError, match=match) as ei:
        make()
    assert "\n" not in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_parse_pattern():
    assert isinstance(parse_pattern("2:4"), NM) and parse_pattern("2:4").N == 2
    assert parse_pattern("row", 0.3).scope == "row"
    assert isinstance(parse_pattern("2:4", min_degree=1), ExpanderNM)
    assert parse_pattern("groups", 0.5, group_size=4).keep_groups(16) == 2


# ------------------------------------------------------------------------------------------- programs
def test_programs_are_data_and_score_candidates():
    p = LayerProblem.random(3, 8, corrected=True, seed=9)
    pat = NM(2, 4)
    prog = l0_program(p, pat)
    assert prog.kind == "MIQP" and prog.n_variables == 48 and prog.n_integer == 24
    W = pat.project_weights(p.W0)
    assert prog.evaluate({"W": W}) == pytest.approx(p.objective(W), rel=1e-12)
    assert prog.check({"W": W})["feasible"]
    assert not prog.check({"W": p.W0})["feasible"]
    z = (W != 0).to(torch.float64)
    assert not prog.check({"W": p.W0, "z": z})["feasible"]  # W nonzero where z = 0
    # groups: the check derives the group variable from W's support
    gp = l0_program(p, ColumnGroups(2, keep=2))
    Wg = p.W0.clone()
    Wg[:, 2:6] = 0
    assert gp.check({"W": Wg})["feasible"]
    assert not gp.check({"W": p.W0})["feasible"]
    # refit: a QP whose fixed zeros are the pruned entries
    mask = W != 0
    rp = refit_program(p, mask)
    assert rp.kind == "QP" and rp.n_variables == int(mask.sum())
    assert not rp.check({"W": p.W0})["feasible"] and rp.check({"W": W})["feasible"]
    with pytest.raises(ValueError, match="mask shape"):
        refit_program(p, mask[:, :4])
    lp = l1_program(p, 2.0)
    assert lp.kind == "L1"
    assert lp.evaluate({"W": W}) == pytest.approx(p.objective(W) + 2.0 * float(W.abs().sum()), rel=1e-12)
    with pytest.raises(ValueError):
        l1_program(p, -1.0)
    S = torch.rand(4, 8, dtype=torch.float64)
    mp = mask_program(S, pat)
    mk = pat.project(S)
    assert mp.evaluate({"z": mk.double()}) == pytest.approx(-float((S * mk).sum()))
    assert mp.check({"z": mk.double()})["feasible"] and not mp.check({"z": torch.ones(4, 8)})["feasible"]
    assert not mp.check({"z": torch.full((4, 8), 0.5)})["feasible"]  # not binary
