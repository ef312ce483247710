"""Torch baselines: feasibility, exact counts, their rules, and the least-squares refit."""
import pytest
import torch

from optprune.formulations import NM, ColumnGroups, LayerProblem, NumericalError, PatternError, Unstructured
from optprune.formulations.programs import l0_program
from optprune.solvers import LayerResult, get_method
from optprune.solvers.methods.baselines import SparseGPT, refit_result, refit_weights, ria_scores, wanda_scores

PATTERNS = [Unstructured(0.5), Unstructured(0.6, "row"), NM(2, 4)]
METHODS = ["magnitude", "wanda", "ria", "sparsegpt"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pat", PATTERNS, ids=lambda p: p.name)
@pytest.mark.parametrize("kind,corrected", [("random", False), ("correlated", True), ("dead", True)])
def test_baselines_are_feasible_with_exact_counts(method, pat, kind, corrected):
    p = LayerProblem.random(8, 16, kind=kind, corrected=corrected, seed=1)
    res = get_method(method)(p, pat)
    prog = l0_program(p, pat)
    assert prog.check({"W": res.W.double(), "z": res.mask.double()})["feasible"]
    assert ((res.W != 0) <= res.mask).all()
    assert int(res.mask.sum()) == pat.kept_count(p.shape)  # exact target (Wanda: per row, same total here)
    assert res.info["error"] == pytest.approx(p.objective(res.W), rel=1e-9)
    assert res.info["time_s"] >= 0
    assert p.objective(res.W) >= p.lower_bound() - 1e-9 * max(1.0, p.lower_bound())


def test_magnitude_and_wanda_rules():
    p = LayerProblem.random(6, 8, kind="outliers", seed=2)
    W0 = p.W0
    mag = get_method("magnitude")(p, Unstructured(0.5)).mask
    thr = W0.abs()[mag].min()
    assert (W0.abs()[~mag] <= thr).all()  # smallest |W| removed across the matrix
    wa = get_method("wanda")(p, Unstructured(0.5)).mask
    S = W0.abs() * p.col_norms().unsqueeze(0)
    assert torch.allclose(wanda_scores(p), S)
    for i in range(p.m):  # Wanda compares within each output row
        assert int(wa[i].sum()) == 4
        assert S[i][~wa[i]].max() <= S[i][wa[i]].min()
    ria = ria_scores(p)
    A = W0.abs()
    ref = (A / A.sum(0, keepdim=True) + A / A.sum(1, keepdim=True)) * p.col_norms().sqrt().unsqueeze(0)
    assert torch.allclose(ria, ref)


def test_baselines_refuse_patterns_they_do_not_handle():
    p = LayerProblem.random(4, 8, seed=0)
    for m in METHODS:
        with pytest.raises(PatternError):
            get_method(m)(p, ColumnGroups(2, keep=2))


def test_sparsegpt_on_one_column_block_is_obs():
    """With all columns in one block and unstructured-per-row masks, SparseGPT keeps the OBS invariant:
    the weights it returns are never worse than the same mask with unchanged weights."""
    p = LayerProblem.random(6, 16, kind="correlated", seed=3)
    res = SparseGPT(p, Unstructured(0.5, "row"), blocksize=16).run()
    assert p.objective(res.W) <= p.objective(p.W0 * res.mask) + 1e-9


# ------------------------------------------------------------------------------------------- refit
@pytest.mark.parametrize("kind,corrected", [("random", False), ("correlated", True), ("dead", True),
                                            ("outliers", False)])
def test_refit_is_the_least_squares_optimum_on_its_support(kind, corrected):
    p = LayerProblem.random(6, 12, kind=kind, corrected=corrected, seed=4)
    mask = get_method("wanda")(p, Unstructured(0.5)).mask
    W = refit_weights(p, mask)
    assert ((W != 0) <= mask).all()
    live = ~p.dead_inputs()
    G = p.gradient(W)
    scale = float(p.target().abs().max())
    assert G[mask & live.unsqueeze(0)].abs().max() <= 1e-8 * scale  # KKT: zero gradient on the support
    # per-row direct solve of Ĥ_SS w = b_S
    B = p.target()
    for i in range(p.m):
        S = torch.nonzero(mask[i] & live).reshape(-1)
        w = torch.linalg.solve(p.Hh[S][:, S], B[i, S])
        assert torch.allclose(W[i, S], w, rtol=1e-7, atol=1e-9 * scale)
    f = p.objective(W)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):  # any other W on the same support is worse
        D = 0.01 * torch.randn(W.shape, generator=g, dtype=torch.float64) * mask
        assert p.objective(W + D) >= f - 1e-9 * max(1.0, f)


@pytest.mark.parametrize("method", METHODS)
def test_refit_never_increases_the_error_of_its_mask(method):
    for seed, (kind, corr) in enumerate([("random", True), ("correlated", False), ("dead", True)]):
        p = LayerProblem.random(8, 16, kind=kind, corrected=corr, seed=seed)
        res = get_method(method)(p, NM(2, 4))
        rr = refit_result(p, res)
        assert rr.info["error"] <= res.info["error"] * (1 + 1e-12) + 1e-12
        assert rr.info["error"] == pytest.approx(p.objective(rr.W), rel=1e-9)
        assert torch.equal(rr.mask, res.mask)
        via_option = get_method(method)(p, NM(2, 4), refit=True)
        assert via_option.info["error"] == pytest.approx(rr.info["error"], rel=1e-9)


def test_refit_method_and_float32():
    p = LayerProblem.random(8, 16, corrected=True, seed=6)
    r = get_method("refit")(p, Unstructured(0.5))
    mag = get_method("magnitude")(p, Unstructured(0.5))
    assert torch.equal(r.mask, mag.mask) and r.info["error"] <= mag.info["error"]
    p32 = p.to(torch.float32)
    W32 = refit_weights(p32, mag.mask)
    assert W32.dtype == torch.float32
    W64 = refit_weights(p, mag.mask)
    assert p.objective(W32.double()) == pytest.approx(p.objective(W64), rel=1e-4)


def test_numerical_failures_name_the_layer():
    from optprune.formulations import cholesky_with_retry
    p = LayerProblem.random(4, 8, seed=0)
    with pytest.raises(NumericalError, match="down_proj"):
        LayerProblem(W0=p.W0 * float("nan"), H=p.H, name="down_proj")
    with pytest.raises(NumericalError, match="q_proj"):
        cholesky_with_retry(-torch.eye(4, dtype=torch.float64), name="q_proj", max_tries=2)
    L, d = cholesky_with_retry(torch.zeros(4, 4, dtype=torch.float64) + torch.diag(torch.tensor([1.0, 1, 1, 0])))
    assert torch.isfinite(L).all() and d > 0  # singular Gram: damping raised until it factors


def test_torch_threads_sets_and_restores():
    from optprune.solvers.base import torch_threads
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with torch_threads(None):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with torch_threads(1):
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)
