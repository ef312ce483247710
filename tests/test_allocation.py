"""Layer-wise allocation beyond the paper's map: robust block aggregates of α, per-block bounds from measured
error-vs-sparsity curves (checked against the reference backend), and the ``auto`` selection that is scored on
held-out calibration sequences with uniform always among the candidates."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from optprune.formulations.allocation import AllocationError, alpha_program
from optprune.solvers.whole_model.allocation import allocate, reference_allocation, solve_allocation
from optprune.solvers.whole_model.spectra import SpectraError, aggregate_metric, block_metric, matrix_spectra


# ============================================================================================ 1. aggregates
def test_aggregate_definitions():
    v, n = [1.0, 2.0, 4.0, 100.0], [40, 30, 20, 3]
    assert aggregate_metric(v, how="mean") == pytest.approx(26.75)
    assert aggregate_metric(v, how="median") == pytest.approx(3.0)
    assert aggregate_metric(v[:3], how="median") == pytest.approx(2.0)
    # tails shorter than 10 eigenvalues get weight 0; the others weight n_tail
    assert aggregate_metric(v, n, "weighted") == pytest.approx((40 * 1 + 30 * 2 + 20 * 4) / 90)
    # every tail small: weighted by n_tail
    assert aggregate_metric([1.0, 3.0], [2, 6], "weighted") == pytest.approx((2 + 18) / 8)
    with pytest.raises(SpectraError, match="choose from mean, median, weighted"):
        aggregate_metric(v, n, "trimmed")
    with pytest.raises(SpectraError, match="n_tail"):
        aggregate_metric(v, None, "weighted")


def _heavy(n, alpha, seed):
    """A square matrix with singular values σ_i² following a power law of exponent ``alpha`` (all n in the tail)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    u = torch.rand(n, generator=g, dtype=torch.float64)
    lam = (1 - u) ** (-1.0 / (alpha - 1.0))
    return U @ torch.diag(lam.sqrt()) @ V.T


def test_robust_aggregate_ignores_small_tail_outlier():
    """A block of well-fitted matrices plus one whose α rests on a handful of eigenvalues (a rank-6 matrix with a
    huge α): the mean is dragged up, the median and the tail-weighted aggregate stay with the other matrices."""
    mats = [("b0.a", 0, _heavy(80, 2.0, 1)), ("b0.b", 0, _heavy(80, 2.2, 2)), ("b0.c", 0, _heavy(80, 2.1, 3))]
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(80, 6, generator=g, dtype=torch.float64))
    outlier = Q @ torch.diag(torch.tensor([1.0, 1.02, 1.04, 1.05, 1.07, 1.08], dtype=torch.float64)) @ Q.T
    mats.append(("b0.out", 0, outlier))
    sp = matrix_spectra(mats)
    out = sp[-1]
    assert out.fit.small_tail and out.alpha > 8  # the constructed outlier: few eigenvalues, extreme α
    good = [s.alpha for s in sp[:3]]
    assert all(not s.fit.small_tail for s in sp[:3]) and max(good) < 4
    mean = block_metric(sp, aggregate="mean")[0]
    med = block_metric(sp, aggregate="median")[0]
    wtd = block_metric(sp, aggregate="weighted")[0]
    assert mean > max(good) + 1  # the outlier dominates the paper's mean
    assert min(good) <= med <= max(good) + 1e-12
    assert min(good) <= wtd <= max(good) + 1e-12
    # and through the allocation: the same block ranks by its robust value
    recs = {s.name: {"block": 0, "numel": 6400, "alpha": s.alpha, "n_tail": s.fit.n_tail} for s in sp}
    recs.update({f"b1.{i}": {"block": 1, "numel": 6400, "alpha": 3.0, "n_tail": 50} for i in range(4)})
    r_mean = allocate("alpha", recs, 0.5, params={"aggregate": "mean"})
    r_wtd = allocate("alpha", recs, 0.5, params={"aggregate": "weighted"})
    assert r_mean.per_block[0] > r_mean.per_block[1]  # block 0 looks "less trained" only because of the outlier
    assert r_wtd.per_block[0] < r_wtd.per_block[1]
    assert r_wtd.info["aggregate"] == "weighted" and r_wtd.info["metric_values"][0] == pytest.approx(wtd)
    with pytest.raises(AllocationError, match="n_tail"):
        allocate("alpha", {k: {kk: vv for kk, vv in v.items() if kk != "n_tail"} for k, v in recs.items()}, 0.5,
                 params={"aggregate": "weighted"})


# ============================================================================================ 2. bounds
def test_bounded_program_respected_and_matches_reference_backend():
    pytest.importorskip("cvxpy")
    g = torch.Generator().manual_seed(0)
    L = 12
    alpha = (2 + 3 * torch.rand(L, generator=g, dtype=torch.float64)).tolist()
    sizes = [int(x) for x in torch.randint(1000, 5000, (L,), generator=g)]
    S = 0.6
    upper = {i: S + 0.02 * (i % 4) for i in range(L)}  # several bounds tighter than the band's S(1+ε) = 0.78
    res = allocate("alpha", alpha, S, eps=0.3, params={"sizes": sizes, "upper": upper})
    s = torch.tensor(res.sparsities, dtype=torch.float64)
    p = torch.tensor(sizes, dtype=torch.float64)
    assert float((p * s).sum() / p.sum()) == pytest.approx(S, abs=1e-12)
    assert all(s[i] <= upper[i] + 1e-12 for i in range(L))
    assert res.info["active_upper"], "the test needs at least one bound to bind"
    ref = reference_allocation(res.program, "cvxpy")
    assert torch.allclose(ref.values["s"].reshape(-1).double(), s, atol=1e-6)
    # unbounded: different (the bounds are active), still the paper's clipped map
    free = allocate("alpha", alpha, S, eps=0.3, params={"sizes": sizes})
    assert max(abs(a - b) for a, b in zip(free.sparsities, res.sparsities)) > 1e-3
    # an upper bound below the target: infeasible, one-line error
    with pytest.raises(AllocationError, match="admit no allocation"):
        allocate("alpha", alpha, S, params={"sizes": sizes, "upper": {i: 0.5 for i in range(L)}})
    with pytest.raises(AllocationError, match="unknown unit"):
        allocate("alpha", alpha, S, params={"sizes": sizes, "upper": {99: 0.7}})


def test_block_upper_bounds_from_curves():
    from optprune.llm_adapters.allocation_select import block_upper_bounds
    grid = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9]
    curves = {"grid": grid, "blocks": {0: [0, .01, .03, .08, .30, .60],    # explodes after 0.6
                                       1: [0, .005, .01, .02, .04, .06],   # easy: never reaches the cap
                                       2: [0, .02, .05, .10, .20, .40]}}   # the worst block at S
    S = 0.6
    up, info = block_upper_bounds(curves, S, growth=1.5)
    cap = 1.5 * 0.10
    assert info["error_cap"] == pytest.approx(cap)
    assert up[0] == pytest.approx(0.6 + (cap - .08) / (.30 - .08) * 0.2)
    assert up[1] == pytest.approx(0.99)
    assert up[2] == pytest.approx(0.6 + (cap - .10) / (.20 - .10) * 0.2)
    assert all(u >= S for u in up.values())
    with pytest.raises(AllocationError, match="growth"):
        block_upper_bounds(curves, S, growth=0.5)


def test_wanda_error_curve_matches_direct_error():
    from optprune.llm_adapters.allocation_select import wanda_error_curve
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(6, 10, generator=g), torch.randn(50, 10, generator=g)
    G = X.T @ X
    errs, dense = wanda_error_curve(W, G, [0.0, 0.3, 0.5, 1.0 - 1e-9])
    assert dense == pytest.approx(float(((X @ W.T) ** 2).sum()), rel=1e-5)
    score = W.abs() * G.diagonal().sqrt()
    for s, e in zip([0.3, 0.5], errs[1:3]):
        k = int(s * 10)
        keep = torch.ones_like(W, dtype=torch.bool)
        for r in range(6):
            keep[r, score[r].argsort()[:k]] = False
        assert e == pytest.approx(float(((X @ (W * ~keep).T) ** 2).sum()), rel=1e-5)
    assert errs[0] == 0 and errs[1] <= errs[2] <= errs[3]


# ============================================================================================ 3. specs
def test_parse_allocation_specs():
    from optprune.llm_adapters.allocation import parse_allocation
    assert parse_allocation("alpha") == ("alpha", {})
    assert parse_allocation("alpha:median:bounded") == ("alpha", {"aggregate": "median", "bounded": True})
    assert parse_allocation("owl:bounded:M=7") == ("owl", {"bounded": True, "M": 7.0})
    assert parse_allocation("auto:finalists=2:holdout=4") == ("auto", {"finalists": 2, "holdout": 4})
    assert parse_allocation("auto:rows=3") == ("auto", {"rows": 3})
    for bad, msg in (("beta", "choose from uniform, alpha, owl, auto"), ("alpha:trimmed", "valid: mean, median"),
                     ("owl:median", "valid: bounded"), ("auto:finalists=x", "not a number"),
                     ("alpha:eps=1.5", r"\[0, 1\)"), ("uniform:bounded", "valid: none"),
                     ("auto:rows=0", "rows must be ≥ 1")):
        with pytest.raises(AllocationError, match=msg):
            parse_allocation(bad)


def test_cli_rejects_bad_allocation_spec_before_loading(tmp_path, capsys):
    from optprune.cli import main
    out = tmp_path / "o"
    rc = main(["prune", "--model", "stories260k", "--method", "wanda", "--allocation", "alpha:trimmed",
               "--output", str(out)])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trimmed" in err[0] and "mean, median, weighted" in err[0]


# ============================================================================================ 4. auto on a real tiny model
def _stories(stories_dir):
    from optprune.llm_adapters.loading import load_model
    m, _, _ = load_model(str(stories_dir))
    return m


def _loss(model, ids):
    """Mean token NLL, computed here (independently of the selection code)."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_auto_never_worse_than_uniform_on_heldout(stories_dir):
    from optprune.llm_adapters.allocation_targets import layer_sparsities
    from optprune.llm_adapters.architectures import get_arch
    from optprune.llm_adapters.pipeline import PruneConfig, prune_model
    model = _stories(stories_dir)
    arch = get_arch(model)
    ids = torch.randint(3, 512, (12, 64), generator=torch.Generator().manual_seed(1))
    cfg = PruneConfig(method="wanda", sparsity=0.7, error_correction=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets, info = layer_sparsities(model, arch, "auto:finalists=2:holdout=4", 0.7, calib_ids=ids, prune_config=cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # selection leaves the model dense
    # uniform's held-out score, computed independently: prune a copy on the first 8 sequences, loss on the last 4
    uni = copy.deepcopy(model)
    prune_model(uni, ids[:8], PruneConfig(method="wanda", sparsity=0.7, error_correction=False), progress=False)
    uniform_loss = _loss(uni, ids[8:])
    assert info["uniform_score"] == pytest.approx(uniform_loss, rel=1e-5)
    assert info["chosen_score"] <= uniform_loss + 1e-6
    # recorded fields: every candidate with its proxy; uniform and 2 others scored in full; the choice among them
    cands = info["candidates"]
    assert cands[0]["label"] == "uniform" and cands[0]["finalist"]
    assert {c["label"] for c in cands} >= {"alpha:mean:eps=0.3", "alpha:median:eps=0.3", "alpha:weighted:eps=0.3"}
    scored = [c for c in cands if c.get("heldout_loss") is not None]
    assert len(scored) == 3 and all(c["finalist"] for c in scored)
    assert info["chosen"] in {c["label"] for c in scored}
    assert info["chosen_score"] == min(c["heldout_loss"] for c in scored)
    if info["chosen_rule"] != "uniform" and info["reference_check"].get("skipped") is None:
        assert info["reference_check"]["max_abs_diff"] <= 1e-6
    assert all(isinstance(c.get("proxy"), float) for c in cands if "error" not in c and "same_as" not in c)
    assert info["calibration_split"] == {"pruning": 8, "finalists_pruned_on": 8, "heldout": 4, "seqlen": 64,
                                         "proxy_rows": 4}
    # targets: every sub-layer, weighted mean exactly S, inside the measured upper bounds
    names = [n for n, *_ in __import__("optprune.llm_adapters.allocation", fromlist=["x"]).prunable_matrices(model)]
    assert set(targets) == set(names)
    assert info["weighted_mean"] == pytest.approx(0.7, abs=1e-9)
    ub = {str(k): v for k, v in info["bounds"]["upper"].items()}
    for c in cands:
        if c["rule"] != "uniform" and "unit_sparsities" in c:
            assert all(float(s) <= float(ub[str(b)]) + 1e-9 for b, s in c["unit_sparsities"].items())
    json.dumps(info)  # JSON-ready


def test_bounded_alpha_on_model_is_checked_by_reference(stories_dir):
    pytest.importorskip("cvxpy")
    from optprune.llm_adapters.allocation_targets import layer_sparsities
    from optprune.llm_adapters.architectures import get_arch
    model = _stories(stories_dir)
    arch = get_arch(model)
    ids = torch.randint(3, 512, (6, 64), generator=torch.Generator().manual_seed(2))
    tg, info = layer_sparsities(model, arch, "alpha:weighted:bounded:growth=1.0", 0.7, calib_ids=ids)
    assert info["aggregate"] == "weighted" and set(info["alpha_per_block"]) == set(info["alpha_per_block_aggregate"])
    assert info["reference_check"]["max_abs_diff"] <= 1e-6
    up = {str(k): v for k, v in info["bounds"]["upper"].items()}
    for u, s in zip(info["units"], info["unit_sparsities"]):
        assert s <= up[str(u)] + 1e-12
    # growth 1: the bound of the worst block at the target is the target itself
    at = {str(k): v for k, v in info["bounds"]["error_at_target"].items()}
    assert up[max(at, key=at.get)] == pytest.approx(0.7, abs=1e-9)
    assert abs(sum(tg.values()) / len(tg) - 0.7) < 0.2


def test_selection_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from optprune.llm_adapters.allocation_select import plot_selection
    info = {"sparsity": 0.7, "chosen": "owl:lam=0.04", "uniform_score": 6.3,
            "candidates": [{"label": "uniform", "proxy": 6.0, "heldout_loss": 6.3},
                           {"label": "owl:lam=0.04", "proxy": 6.1, "heldout_loss": 6.0},
                           {"label": "alpha:mean:eps=0.3", "proxy": 6.5}]}
    p = plot_selection(info, tmp_path / "sel.png")
    assert (tmp_path / "sel.png").stat().st_size > 1000 and p.endswith("sel.png")
    with pytest.raises(AllocationError):
        plot_selection({"sparsity": 0.7, "candidates": []}, tmp_path / "x.png")


def test_selection_plot_script(tmp_path):
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "allocation" / "selection_plot.py"
    spec = importlib.util.spec_from_file_location("selection_plot", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = tmp_path / "run.json"
    rec.write_text(json.dumps({"allocation": {"allocation": "alpha"}}))
    assert mod.main([str(rec)]) == 2 and not (tmp_path / "allocation_selection.png").exists()
    rec.write_text(json.dumps({"allocation": {"sparsity": 0.6, "chosen": "uniform", "uniform_score": 5.0,
                                              "candidates": [{"label": "uniform", "proxy": 4.9, "heldout_loss": 5.0}]}}))
    assert mod.main([str(rec)]) == 0 and (tmp_path / "allocation_selection.png").stat().st_size > 1000


def test_auto_rows_prunes_finalists_on_a_subset(stories_dir):
    """``rows=k``: the finalists are pruned on the first k pruning sequences; uniform's recorded score is the
    held-out loss of uniform pruned on exactly those k (recomputed here), and the choice is still ≤ it."""
    from optprune.llm_adapters.allocation_targets import layer_sparsities
    from optprune.llm_adapters.pipeline import PruneConfig, prune_model
    model = _stories(stories_dir)
    ids = torch.randint(3, 512, (12, 64), generator=torch.Generator().manual_seed(2))
    cfg = PruneConfig(method="wanda", sparsity=0.7, error_correction=False)
    _, info = layer_sparsities(model, None, "auto:finalists=1:holdout=4:rows=3", 0.7, calib_ids=ids, prune_config=cfg)
    assert info["calibration_split"]["finalists_pruned_on"] == 3
    uni = copy.deepcopy(model)
    prune_model(uni, ids[:3], PruneConfig(method="wanda", sparsity=0.7, error_correction=False), progress=False)
    assert info["uniform_score"] == pytest.approx(_loss(uni, ids[8:]), rel=1e-5)
    full = copy.deepcopy(model)   # pruned on all 8: a different model, so the subset really was used
    prune_model(full, ids[:8], PruneConfig(method="wanda", sparsity=0.7, error_correction=False), progress=False)
    assert info["uniform_score"] != pytest.approx(_loss(full, ids[8:]), rel=1e-7)
    assert info["chosen_score"] <= info["uniform_score"] + 1e-9


def test_obs_error_curve_is_sparsegpts_error_and_rows_sample_is_scaled():
    """The SparseGPT curve equals SparseGPT's own reconstruction error (all rows), and a row sample scales to the
    same order."""
    from optprune.formulations import LayerProblem, Unstructured
    from optprune.llm_adapters.allocation_select import obs_error_curve
    from optprune.solvers import get_method
    g = torch.Generator().manual_seed(3)
    X = torch.randn(512, 48, generator=g) @ (torch.eye(48) + 0.3 * torch.randn(48, 48, generator=g))
    G = X.T @ X
    W = torch.randn(40, 48, generator=g)
    grid = (0.0, 0.3, 0.5, 0.7)
    errs, dense = obs_error_curve(W, G, grid, rows=40)
    assert errs[0] == 0.0 and dense == pytest.approx(float(((W @ G) * W).sum()), rel=1e-5)
    for s, e in zip(grid[1:], errs[1:]):
        r = get_method("sparsegpt")(LayerProblem(W0=W, H=G), Unstructured(s, "row"))
        dW = W - r.W.float()
        assert e == pytest.approx(float(((dW @ G) * dW).sum()), rel=1e-4)
    est, _ = obs_error_curve(W, G, grid, rows=20)
    assert all(0.5 * e < x < 2.0 * e for e, x in zip(errs[1:], est[1:]))


def test_bounded_allocation_uses_its_solvers_curve(stories_dir):
    pytest.importorskip("cvxpy")
    from optprune.llm_adapters.allocation_targets import layer_sparsities
    from optprune.llm_adapters.allocation_select import curve_rule
    from optprune.llm_adapters.pipeline import PruneConfig
    assert [curve_rule(m) for m in ("sparsegpt", "admm", "fista", "wanda", "magnitude", None)] == \
        ["obs", "obs", "obs", "wanda", "wanda", "wanda"]
    model = _stories(stories_dir)
    ids = torch.randint(3, 512, (6, 64), generator=torch.Generator().manual_seed(2))
    bounds = {}
    for m in ("wanda", "sparsegpt"):
        _, info = layer_sparsities(model, None, "alpha:bounded", 0.7, calib_ids=ids,
                                   prune_config=PruneConfig(method=m, sparsity=0.7))
        assert info["bounds"]["rule"] == curve_rule(m)
        up = {str(k): v for k, v in info["bounds"]["upper"].items()}
        assert all(s <= up[str(u)] + 1e-12 for u, s in zip(info["units"], info["unit_sparsities"]))
        bounds[m] = up
    assert bounds["wanda"] != bounds["sparsegpt"]   # the curve really differs
