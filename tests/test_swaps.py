"""Swap search: exact swap values, certified 1-swap local optimality checked by enumerating every swap with an
independent least-squares solve, never below the exact optimum, and its options and refusals."""
import statistics

import pytest
import torch

from optprune.formulations import LayerProblem, NM, PatternError, Unstructured
from optprune.formulations.patterns import ExpanderNM
from optprune.formulations.programs import l0_program
from optprune.solvers import LayerResult, get_backend, get_method
from optprune.solvers.methods.swaps import SwapState, polish, swap_values

PATTERNS = {"row": lambda: Unstructured(0.5, "row"), "unstructured": lambda: Unstructured(0.5),
            "2:4": lambda: NM(2, 4), "expander": lambda: ExpanderNM(2, 4, 1)}
KINDS = [("random", False), ("correlated", True), ("outliers", False), ("dead", True)]


def _row_error(p: LayerProblem, i: int, keep: torch.Tensor) -> float:
    """Row i's error after the least-squares refit on ``keep`` (a direct solve, independent of the search)."""
    H = p.Hh.to(torch.float64)
    b = p.target(torch.float64)[i]
    W0 = p.W0.to(torch.float64)[i]
    c = 0.5 * float(W0 @ p.H.to(torch.float64) @ W0)
    S = torch.nonzero(keep).reshape(-1)
    if S.numel() == 0:
        return c
    A = H[S][:, S] + 1e-9 * float(H.diagonal().mean()) * torch.eye(S.numel(), dtype=torch.float64)
    w = torch.linalg.solve(A, b[S])
    return c - 0.5 * float(b[S] @ w)


def _start(p, pat):
    return get_method("eggs" if isinstance(pat, ExpanderNM) else "magnitude")(p, pat)


def _improving_swaps(p, pat, mask, tol):
    """Every feasible 1-swap (and, per matrix, every move between rows), enumerated: those that lower the
    refitted error by more than ``tol``."""
    m, n = mask.shape
    rows = [_row_error(p, i, mask[i]) for i in range(m)]
    found = []
    per_matrix = isinstance(pat, Unstructured) and pat.scope == "matrix"
    for i in range(m):
        for a in torch.nonzero(mask[i]).reshape(-1).tolist():
            for j in (range(m) if per_matrix else (i,)):
                for q in torch.nonzero(~mask[j]).reshape(-1).tolist():
                    new = mask.clone()
                    new[i, a], new[j, q] = False, True
                    if not pat.is_feasible(new):
                        continue
                    d = _row_error(p, i, new[i]) - rows[i]
                    if j != i:
                        d += _row_error(p, j, new[j]) - rows[j]
                    if d < -tol:
                        found.append((i, a, j, q, d))
    return found


@pytest.mark.parametrize("kind,corr", KINDS)
def test_swap_values_are_the_exact_changes(kind, corr):
    p = LayerProblem.random(3, 10, kind=kind, corrected=corr, seed=5)
    mask = Unstructured(0.5, "row").project(torch.rand(3, 10, generator=torch.Generator().manual_seed(1)))
    H = p.Hh.to(torch.float64)
    A = H + 1e-9 * float(H.diagonal().mean()) * torch.eye(10, dtype=torch.float64)
    st = SwapState(A, p.target(torch.float64), mask)
    D = swap_values(st.G, st.U, st.w, st.g, st.s)
    for i in range(3):
        base = _row_error(p, i, mask[i])
        for slot, a in enumerate(st.idx[i].tolist()):
            for q in torch.nonzero(~mask[i]).reshape(-1).tolist():
                new = mask[i].clone()
                new[a], new[q] = False, True
                ref = _row_error(p, i, new) - base
                assert float(D[i, slot, q]) == pytest.approx(ref, rel=1e-6, abs=1e-9 * (abs(base) + 1)), (i, a, q)


def test_rank_one_updates_match_a_fresh_factorisation():
    p = LayerProblem.random(4, 12, kind="correlated", corrected=True, seed=2)
    H = p.Hh.to(torch.float64)
    A = H + 1e-9 * float(H.diagonal().mean()) * torch.eye(12, dtype=torch.float64)
    B = p.target(torch.float64)
    mask = Unstructured(0.5, "row").project(p.W0.abs())
    st = SwapState(A, B, mask)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):  # random swaps in every row at once
        slots = torch.randint(0, 6, (4,), generator=g)
        cols = torch.stack([torch.nonzero(~st.mask[i]).reshape(-1)[torch.randint(0, 6, (1,), generator=g)][0]
                            for i in range(4)])
        st.apply(torch.arange(4), slots, cols)
    fresh = SwapState(A, B, st.mask)
    order = st.idx.argsort(1)  # the fresh state lists kept columns in column order
    for name in ("w", "U"):
        got = getattr(st, name).gather(1, order if name == "w" else order.unsqueeze(2).expand(-1, -1, 12))
        assert torch.allclose(got, getattr(fresh, name), rtol=1e-6, atol=1e-8 * float(getattr(fresh, name).abs().max()))
    assert torch.allclose(st.g, fresh.g, atol=1e-7 * float(B.abs().max()))
    assert torch.allclose(st.s, fresh.s, atol=1e-7 * float(A.diagonal().max()))


@pytest.mark.parametrize("pname", list(PATTERNS))
@pytest.mark.parametrize("kind,corr", KINDS)
def test_certified_local_optimum_by_enumerating_every_swap(pname, kind, corr):
    pat = PATTERNS[pname]()
    for seed in range(2):
        p = LayerProblem.random(8, 12 if pname != "expander" else 8, kind=kind, corrected=corr, seed=seed)
        start = _start(p, pat)
        res = polish(p, pat, start)
        assert pat.is_feasible(res.mask) and res.info["certified_1swap"]
        assert int(res.mask.sum()) == pat.kept_count(p.shape)
        f0 = p.constant()
        rows = sum(_row_error(p, i, res.mask[i]) for i in range(p.m))
        assert res.info["error"] == pytest.approx(p.objective(res.W), rel=1e-12)
        assert res.info["error"] == pytest.approx(rows, rel=1e-6, abs=1e-9 * f0)
        bad = _improving_swaps(p, pat, res.mask, tol=1e-7 * f0)
        assert not bad, bad[:3]
        # never worse than the refitted start mask
        start_refit = sum(_row_error(p, i, start.mask[i]) for i in range(p.m))
        assert res.info["error"] <= start_refit * (1 + 1e-9) + 1e-9 * f0


@pytest.mark.parametrize("pname", ["row", "unstructured", "2:4"])
def test_never_below_the_exact_optimum_and_closes_most_of_the_gap(pname):
    enum = get_backend("enumerate")
    gaps, gaps_start = [], []
    for seed in range(12):
        kind, corr = KINDS[seed % 4]
        p = LayerProblem.random(2, 8, kind=kind, corrected=corr, seed=seed)
        pat = PATTERNS[pname]()
        ref = enum.solve(l0_program(p, pat))
        assert ref.proven_optimal
        res = get_method("swaps")(p, pat, start="magnitude")
        scale = max(abs(ref.objective), 1e-12)
        gaps.append((res.info["error"] - ref.objective) / scale)
        assert gaps[-1] >= -1e-7, (p.name, res.info["error"], ref.objective)
        st = get_method("magnitude")(p, pat, refit=True)
        gaps_start.append((st.info["error"] - ref.objective) / scale)
    print(f"\nswaps from magnitude vs enumeration, {pname}: median gap {statistics.median(gaps):.2e} "
          f"(magnitude+refit {statistics.median(gaps_start):.2e}), max {max(gaps):.2e}")
    assert sum(gaps) <= sum(gaps_start)
    assert sum(g <= 1e-6 for g in gaps) >= len(gaps) // 2  # a 1-swap local optimum is often the optimum here


def test_budget_stops_without_certificate_and_fill_up():
    p = LayerProblem.random(6, 16, kind="correlated", corrected=True, seed=3)
    pat = Unstructured(0.5, "row")
    start = get_method("magnitude")(p, pat)
    full = polish(p, pat, start)
    assert full.info["swaps"] > 2 and full.info["certified_1swap"]
    cut = polish(p, pat, start, max_swaps=2)
    assert cut.info["swaps"] <= 2 and not cut.info["certified_1swap"]
    assert full.info["error"] <= cut.info["error"] <= p.objective(get_method("refit")(p, pat, mask=start.mask).W) * (1 + 1e-9)
    # a start that keeps fewer weights than allowed is filled up first
    few = start.mask.clone()
    few[:, :] = False
    few[:, :3] = True
    r = polish(p, pat, LayerResult(p.W0 * few, few, {}))
    assert r.info["filled"] == 6 * 8 - 18 and int(r.mask.sum()) == 6 * 8 and r.info["certified_1swap"]


def test_registered_options_and_refusals():
    spec = get_method("swaps")
    assert spec.needs == "gram" and {"unstructured", "row", "nm", "expander"} <= set(spec.patterns)
    p = LayerProblem.random(4, 8, seed=0)
    assert spec.program(p, NM(2, 4)).kind == "MIQP"
    res = spec(p, NM(2, 4), start="wanda", start_options={"refit": True}, dtype="float32")
    assert res.info["method"] == "wanda+swaps" and NM(2, 4).is_feasible(res.mask)
    with pytest.raises(Exception, match="unknown method"):
        spec(p, NM(2, 4), start="nosuch")
    with pytest.raises(ValueError, match="another method"):
        spec(p, NM(2, 4), start="swaps")
    with pytest.raises(PatternError, match="not a feasible"):
        polish(p, NM(2, 4), LayerResult(p.W0, torch.ones(4, 8, dtype=torch.bool), {}))
    with pytest.raises(ValueError, match="dtype"):
        polish(p, NM(2, 4), get_method("magnitude")(p, NM(2, 4)), dtype="float16")


@pytest.mark.parametrize("pname", list(PATTERNS))
def test_admm_polishes_its_final_support(pname):
    pat = PATTERNS[pname]()
    opts = {"warm_start": "dense"} if pname == "expander" else {}
    for seed in range(3):
        p = LayerProblem.random(8, 16, kind="correlated", corrected=True, seed=seed)
        plain = get_method("admm")(p, pat, **opts)
        pol = get_method("admm")(p, pat, swaps=True, **opts)
        assert pat.is_feasible(pol.mask) and pol.info["certified_1swap"]
        assert pol.info["error"] == pytest.approx(p.objective(pol.W), rel=1e-9)
        assert pol.info["error"] <= plain.info["error"] * (1 + 1e-9)
        assert pol.info["chosen"].endswith("+swaps") == (pol.info["error"] < plain.info["error"])
