"""ADMM for the L0 layer program: registration, exactness gaps against the MIQP references, real layers.

* registered as ``admm`` with the same declarative model as SparseGPT (``l0_program``), so the cross-check
  harness enumerates it beside the other L0 methods;
* on small instances (every instance kind, with and without error correction; per-matrix, per-row, 2:4) its
  objective is compared with the exact optimum of exhaustive enumeration (and Gurobi where the licence takes the
  model): never below the optimum, never above SparseGPT (its warm start), and the gap distribution is reported;
* on real stories260K layers it is below SparseGPT's objective on every layer.
"""
from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest
import torch

from optprune.formulations import NM, ExpanderNM, LayerProblem, PatternError, Unstructured, l0_program
from optprune.solvers import get_backend, get_method
from optprune.solvers.methods.admm import masked_pcg
from optprune.solvers.base import LicenseLimitError, SolverUnavailable

REPO = Path(__file__).resolve().parents[1]
KINDS = ("random", "correlated", "outliers", "dead")
PATTERNS = {"unstructured-0.5": lambda: Unstructured(0.5), "row-0.5": lambda: Unstructured(0.5, "row"),
            "2:4": lambda: NM(2, 4), "unstructured-0.75": lambda: Unstructured(0.75)}


def _instances(m=3, n=8):
    for kind in KINDS:
        for corrected in (False, True):
            for seed in (0, 1):
                yield LayerProblem.random(m, n, kind=kind, corrected=corrected, seed=seed)


def test_registered_with_the_l0_program_of_sparsegpt():
    spec, sg = get_method("admm"), get_method("sparsegpt")
    assert spec.needs == "gram" and {"unstructured", "row", "nm", "expander"} <= set(spec.patterns)
    p = LayerProblem.random(4, 8)
    for pat in (Unstructured(0.5), Unstructured(0.5, "row"), NM(2, 4)):
        a, b = spec.program(p, pat), sg.program(p, pat)
        assert a.kind == b.kind == "MIQP" and a.name == b.name
        assert a.n_variables == b.n_variables and a.n_integer == b.n_integer


@pytest.mark.parametrize("pname", list(PATTERNS))
def test_gap_to_enumeration(pname):
    """Exact optimum by enumeration; ADMM feasible, ≥ optimum, ≤ SparseGPT; gap distribution bounded."""
    enum = get_backend("enumerate")
    gaps, better = [], 0
    for p in _instances():
        pat = PATTERNS[pname]()
        prog = l0_program(p, pat)
        ref = enum.solve(prog)
        assert ref.proven_optimal
        res = get_method("admm")(p, pat)
        f = p.objective(res.W)
        chk = prog.check({"W": res.W, "z": res.mask.to(torch.float64)})
        assert chk["feasible"], chk
        assert pat.is_feasible(res.mask)
        scale = max(abs(ref.objective), 1e-12)
        gap = (f - ref.objective) / scale
        assert gap >= -1e-7, (p.name, f, ref.objective)
        f_sg = p.objective(get_method("sparsegpt")(p, pat).W)
        assert f <= f_sg * (1 + 1e-9) + 1e-12, (p.name, f, f_sg)
        better += f < f_sg * (1 - 1e-6)
        gaps.append(gap)
    q = statistics.quantiles(gaps, n=4)
    print(f"\nadmm vs enumeration, {pname}: {len(gaps)} instances, gap median {statistics.median(gaps):.2e}, "
          f"quartiles {q[0]:.2e} / {q[2]:.2e}, max {max(gaps):.2e}, exact (≤1e-6) on "
          f"{sum(g <= 1e-6 for g in gaps)}; strictly below SparseGPT on {better}")
    # a local method: exact on many instances, far off on a few ill-conditioned ones (where SparseGPT is further)
    assert statistics.median(gaps) <= 0.02
    assert sum(g <= 1e-6 for g in gaps) >= len(gaps) // 3
    assert better >= len(gaps) // 4  # the solver does work beyond returning its warm start


def test_gurobi_agrees_with_enumeration_and_bounds_admm():
    try:
        gb = get_backend("gurobi")
        if not gb.available():
            pytest.skip("gurobipy not installed")
    except SolverUnavailable as e:
        pytest.skip(str(e))
    p = LayerProblem.random(2, 8, kind="correlated", corrected=True, seed=3)
    for pat in (Unstructured(0.5), NM(2, 4)):
        prog = l0_program(p, pat)
        try:
            r = gb.solve(prog, time_limit=60)
        except LicenseLimitError as e:
            pytest.skip(str(e))
        ex = get_backend("enumerate").solve(prog)
        assert r.proven_optimal
        assert abs(r.objective - ex.objective) <= 1e-6 * max(1.0, abs(ex.objective))
        f = p.objective(get_method("admm")(p, pat).W)
        assert f >= ex.objective - 1e-7 * max(1.0, abs(ex.objective))


@pytest.mark.parametrize("warm", ["sparsegpt", "dense", "fista", "wanda"])
def test_warm_starts_and_error_corrected_inputs(warm):
    p = LayerProblem.random(16, 32, kind="outliers", corrected=True, seed=5, dtype=torch.float32)
    pat = Unstructured(0.7)
    res = get_method("admm")(p, pat, warm_start=warm)
    assert res.W.dtype == torch.float32 and pat.is_feasible(res.mask)
    assert torch.all(res.W[~res.mask] == 0)
    assert res.info["warm_start"] == warm and res.info["iterations"] >= 1
    if warm != "dense":
        assert res.info["error"] <= res.info["warm_error"] * (1 + 1e-6)
    assert res.info["error"] < p.objective(get_method("sparsegpt")(p, pat).W)


def test_expander_pattern_from_dense_start():
    p = LayerProblem.random(8, 16, seed=2)
    pat = ExpanderNM(2, 4, 1)
    res = get_method("admm")(p, pat, warm_start="dense")
    assert pat.is_feasible(res.mask)
    with pytest.raises(PatternError, match="expander"):
        get_method("admm")(p, pat)  # SparseGPT masks are not expander masks


def test_bad_options_fail_loudly():
    p = LayerProblem.random(4, 8)
    with pytest.raises(ValueError, match="no option .rhoo.; its options"):
        get_method("admm")(p, Unstructured(0.5), rhoo=1.0)
    with pytest.raises(ValueError, match="warm_start"):
        get_method("admm")(p, Unstructured(0.5), warm_start="obs")
    with pytest.raises(ValueError, match="refit"):
        get_method("admm")(p, Unstructured(0.5), refit="qr")
    with pytest.raises(ValueError):
        get_method("admm")(p, Unstructured(0.5), rho=0.0)


def test_refits_agree_and_pcg_never_increases_f():
    p = LayerProblem.random(6, 24, kind="correlated", corrected=True, seed=7)
    pat = NM(2, 4)
    r_pcg = get_method("admm")(p, pat, refit="pcg", pcg_iters=200, pcg_rtol=1e-12, warm_start="dense")
    r_chol = get_method("admm")(p, pat, refit="cholesky", warm_start="dense")
    r_none = get_method("admm")(p, pat, refit="none", warm_start="dense")
    assert torch.equal(r_pcg.mask, r_chol.mask) and torch.equal(r_pcg.mask, r_none.mask)
    assert abs(r_pcg.info["error"] - r_chol.info["error"]) <= 1e-8 * r_chol.info["error"]
    assert r_chol.info["error"] <= r_none.info["error"] * (1 + 1e-12)
    # masked PCG on its own: the exact solution of each row's support system
    A = p.Hh + 0.1 * torch.eye(24, dtype=torch.float64)
    B = torch.randn(6, 24, dtype=torch.float64)
    mask = NM(2, 4).project(torch.rand(6, 24))
    X, steps = masked_pcg(A, B, mask, torch.zeros_like(B), iters=100, rtol=1e-13)
    for i in range(6):
        S = mask[i]
        x = torch.linalg.solve(A[S][:, S], B[i, S])
        assert torch.allclose(X[i, S], x, rtol=1e-8, atol=1e-10)
        assert torch.all(X[i, ~S] == 0)


def _collect():
    spec = importlib.util.spec_from_file_location("fista_layers", REPO / "benchmarks" / "solvers" / "fista_layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.collect


def test_below_sparsegpt_on_every_stories_layer(stories_dir, monkeypatch):
    monkeypatch.setenv("OPTPRUNE_MODEL_DIR", str(stories_dir.parent))
    try:
        probs = _collect()("stories260k", [0, 2, 4], 8, 128)
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"calibration data not available: {e}")
    for pat in (Unstructured(0.7), NM(2, 4), Unstructured(0.5, "row")):
        ratios = []
        for name, p in probs.items():
            f_sg = p.objective(get_method("sparsegpt")(p, pat).W)
            res = get_method("admm")(p, pat)
            assert pat.is_feasible(res.mask)
            ratios.append(p.objective(res.W) / f_sg)
        print(f"\n{pat.name}: admm / sparsegpt per layer: min {min(ratios):.3f} max {max(ratios):.3f}")
        assert max(ratios) < 1.0, (pat.name, ratios)


def test_rank_deficient_gram_without_damping():
    """Fewer tokens than inputs (singular Ĥ) and no ridge: the eigendecomposition route still gives a finite,
    feasible result no worse than SparseGPT's."""
    p = LayerProblem.random(8, 32, N=12, kind="correlated", corrected=True, seed=4)
    pat = Unstructured(0.6)
    for warm in ("dense", "sparsegpt"):
        res = get_method("admm")(p, pat, damp=0.0, warm_start=warm)
        assert torch.isfinite(res.W).all() and pat.is_feasible(res.mask)
    assert res.info["error"] <= p.objective(get_method("sparsegpt")(p, pat).W) * (1 + 1e-9)


def test_given_warm_start_and_candidates():
    from optprune.solvers.base import LayerResult
    p = LayerProblem.random(3, 8, kind="correlated", seed=0)
    pat = Unstructured(0.5)
    ref = get_backend("enumerate").solve(l0_program(p, pat))
    opt = LayerResult(ref.W * ref.mask, ref.mask, {})
    res = get_method("admm")(p, pat, warm_start="dense", candidates=[opt])
    assert res.info["error"] == pytest.approx(ref.objective, rel=1e-9)  # never worse than a given point
    res = get_method("admm")(p, pat, warm_start=opt)
    assert res.info["warm_start"] == "given" and res.info["error"] <= ref.objective * (1 + 1e-9)
    bad = LayerResult(p.W0, torch.ones(3, 8, dtype=torch.bool), {})
    with pytest.raises(PatternError, match="feasible"):
        get_method("admm")(p, pat, warm_start=bad)
    with pytest.raises(PatternError, match="feasible"):
        get_method("admm")(p, pat, candidates=[bad])
