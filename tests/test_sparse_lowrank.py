"""Sparse + low-rank (``W ≈ S + L``): the program, its exact block steps and the production method.

The program is not convex, so verification checks each block against an independent reference: the rank-r step
against Ky Fan's eigen-value sum (and the SDP of the eigen-program), the sparse step against a convex QP solve
(cvxpy) of the refit on the final support, over 100+ small instances.
"""
import pytest
import torch

from optprune.formulations import LayerProblem, NM, Unstructured
from optprune.formulations.lowrank import (RankAtMost, best_lowrank, gram_half, shifted_problem,
                                           sparse_lowrank_program)
from optprune.formulations.programs import refit_program
from optprune.formulations.subspace import Subspace, eigen_program, fan_optimum
from optprune.solvers import get_backend, get_method, list_methods
from optprune.solvers.backends.common import unconstrained_rows
from optprune.solvers.methods.sparse_lowrank import equal_param_pattern

KINDS = [("random", False), ("correlated", True), ("outliers", False), ("dead", True)]
FAMILY = [(k, c, s) for k, c in KINDS for s in range(25)]  # 100 instances


def _value(p, Wst, fst, half, S, L):
    return fst + 0.5 * float(((S + L - Wst) @ half[0]).pow(2).sum())


def test_rank_step_is_the_ky_fan_optimum_on_100_instances():
    """For a fixed S the rank-r step attains ``f* + ½(tr M − Ky Fan sum)`` with ``M = Z Zᵀ``, and no random
    rank-r matrix does better."""
    g = torch.Generator().manual_seed(0)
    for kind, corr, seed in FAMILY:
        p = LayerProblem.random(4, 8, kind=kind, corrected=corr, seed=seed)
        Wst, fst = unconstrained_rows(p)
        half = gram_half(p.Hh)
        S = p.W0.to(torch.float64) * (torch.rand(4, 8, generator=g) > 0.5)
        for r in (1, 2):
            L = best_lowrank(Wst - S, half, r)
            assert RankAtMost("L", r).satisfied({"L": L})
            Z = (Wst - S) @ half[0]
            M = Z @ Z.T
            ref = fst + 0.5 * (float(M.trace()) - fan_optimum(M, r))
            v = _value(p, Wst, fst, half, S, L)
            assert v == pytest.approx(ref, rel=1e-8, abs=1e-9), (kind, seed, r)
            assert v == pytest.approx(p.objective(S + L), rel=1e-7, abs=1e-8)
            for _ in range(3):
                R = torch.randn(4, r, generator=g, dtype=torch.float64) @ torch.randn(r, 8, generator=g, dtype=torch.float64)
                U, sv, Vt = torch.linalg.svd(L + 0.1 * R)
                L2 = (U[:, :r] * sv[:r]) @ Vt[:r]  # another rank-r matrix near L
                assert p.objective(S + L) <= p.objective(S + L2) * (1 + 1e-9) + 1e-9


def test_rank_step_against_the_eigen_program_sdp():
    sdp = None
    for name in ("sdp", "cvxpy"):
        b = get_backend(name)
        if b.available() and b.supports(eigen_program(LayerProblem.random(3, 4, seed=0), Subspace(keep=1)))[0]:
            sdp = b
            break
    if sdp is None:
        pytest.skip("no SDP backend available")
    for kind, corr, seed in FAMILY[::10]:
        p = LayerProblem.random(4, 8, kind=kind, corrected=corr, seed=seed)
        Wst, fst = unconstrained_rows(p)
        half = gram_half(p.Hh)
        S = p.W0.to(torch.float64) * Unstructured(0.5).project(p.W0.abs())
        Z = (Wst - S) @ half[0]
        # the eigen-program of a problem whose output covariance is Z Zᵀ (W0 = Z, H = I)
        q = LayerProblem(W0=Z, H=torch.eye(8, dtype=torch.float64), name="Z")
        r = sdp.solve(eigen_program(q, Subspace(keep=2)))
        L = best_lowrank(Wst - S, half, 2)
        v = _value(p, Wst, fst, half, S, L)
        assert v == pytest.approx(fst + 0.5 * (float((Z * Z).sum()) + r.objective), rel=1e-6, abs=1e-7)  # −tr(QᵀMQ)


def test_method_is_block_optimal_against_a_qp_solver_on_100_instances():
    """On the method's final support, S is the refit a convex QP solver (cvxpy) finds for the shifted problem
    given L, and L is the exact rank step given S: the measured block gaps are small and the value matches."""
    cv = get_backend("cvxpy")
    if not cv.available():
        pytest.skip("cvxpy not installed")
    sl = get_method("sparse-lowrank")
    worst = 0.0
    for kind, corr, seed in FAMILY:
        p = LayerProblem.random(4, 8, kind=kind, corrected=corr, seed=seed)
        pat = (Unstructured(0.5), Unstructured(0.5, "row"), NM(2, 4))[seed % 3]
        res = sl(p, pat, rank=1, iters=3, polish=50)
        v = res.info["values"]
        prog = sparse_lowrank_program(p, pat, 1)
        chk = prog.check({"S": v["S"], "L": v["L"], "z": v["z"]})
        assert chk["feasible"], chk["violations"]
        f = prog.evaluate(v)
        assert f == pytest.approx(res.info["error"], rel=1e-6, abs=1e-9)
        assert f == pytest.approx(p.objective(res.W), rel=1e-6, abs=1e-9)
        Wst, fst = unconstrained_rows(p)
        sub = shifted_problem(p, Wst - v["L"])
        ref = cv.solve(refit_program(sub, res.mask))
        f_ref = fst + ref.objective  # best S on this support given L (the shifted problem drops f*)
        assert f >= f_ref - 1e-7 * abs(f_ref) - 1e-9
        worst = max(worst, (f - f_ref) / max(f, 1e-12))
        assert res.info["block_gaps"]["L_given_S"] <= 1e-9
    assert worst <= 1e-2, worst


def test_equal_parameter_count_and_refusals():
    p = LayerProblem.random(16, 32, kind="outliers", seed=1, dtype=torch.float32)
    sl = get_method("sparse-lowrank")
    for pat in (Unstructured(0.5), Unstructured(0.5, "row")):
        res = sl(p, pat, rank=2, equal_params=True, iters=2, polish=5)
        assert res.info["params"] <= pat.kept_count(p.shape)
        assert res.info["params"] == int(res.mask.sum()) + 2 * (16 + 32)
        assert pat.is_feasible(res.mask)
        assert RankAtMost("L", 2).satisfied({"L": res.info["values"]["L"]})
    with pytest.raises(Exception, match="equal_params"):
        sl(p, NM(2, 4), rank=2, equal_params=True)
    with pytest.raises(Exception, match="rank"):
        sl(p, Unstructured(0.5), rank=99)
    with pytest.raises(Exception, match="more than"):
        equal_param_pattern(Unstructured(0.5), (16, 32), 6)
    assert "sparse-lowrank" in list_methods()


def test_rank_zero_is_the_refitted_inner_method_and_rank_helps():
    p = LayerProblem.random(16, 32, kind="correlated", corrected=True, seed=2)
    sl = get_method("sparse-lowrank")
    base = get_method("sparsegpt")(p, NM(2, 4), refit=True)
    r0 = sl(p, NM(2, 4), rank=0)
    assert r0.info["error"] == pytest.approx(base.info["error"], rel=1e-6)
    r2 = sl(p, NM(2, 4), rank=2, iters=3)
    assert r2.info["error"] < r0.info["error"]
    h = r2.info["history"]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(h, h[1:]))  # the S step never raises f
    assert r2.info["folded_lowrank"] and NM(2, 4).is_feasible(r2.mask) and not NM(2, 4).is_feasible(r2.W != 0)


def test_rank_constraint_check():
    c = RankAtMost("L", 1)
    u = torch.randn(4, 1, dtype=torch.float64)
    assert c.satisfied({"L": u @ u.T}) and not c.satisfied({"L": torch.eye(4, dtype=torch.float64)})


def test_prune_writes_the_folded_matrix(tmp_path, stories_dir, data_dir):
    """End to end on the small model: the saved layers are S + L (dense), the record keeps rank and parameters."""
    import json
    from optprune.cli import main
    rc = main(["prune", "--model", "stories260k", "--model-dir", str(stories_dir.parent), "--data-dir",
               str(data_dir), "--method", "sparse-lowrank", "-O", "rank=2", "-O", "iters=1", "-O", "polish=2",
               "--no-eval", "--no-kl", "--output", str(tmp_path / "o")])
    assert rc == 0
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["layers"]
    for r in rec["layers"]:
        m, n = r["shape"]
        assert r["lowrank_rank"] == 2 and r["params"] == r["sparse_params"] + 2 * (m + n)
        assert r["sparsity"] < 0.05  # written folded: S + L is dense
