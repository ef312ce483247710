"""Quantization grids as a pattern, and the grid methods (gptq, rtn, sparsegpt with a grid, quant-refit)."""
import itertools

import pytest
import torch

from optprune.formulations import LayerProblem, PatternError, grid_program, parse_grid, parse_pattern
from optprune.formulations.grid import GridSpec, Quantizer
from optprune.solvers import get_method
from optprune.solvers.methods.quant_refit import refit_scales


@pytest.mark.parametrize("text,bits,group,sym", [("w4", 4, None, True), ("w4g128", 4, 128, True),
                                                 ("W3G64A", 3, 64, False), ("w8a", 8, None, False)])
def test_grid_spelling(text, bits, group, sym):
    g = parse_grid(text)
    assert (g.bits, g.group, g.symmetric) == (bits, group, sym)
    assert parse_grid(g.name) == g
    assert g.qmax - g.qmin + 1 == 2 ** bits


@pytest.mark.parametrize("bad", ["w1", "w9", "int4", "w4g1", "w4g", "4"])
def test_grid_spelling_refused(bad):
    with pytest.raises(PatternError):
        parse_grid(bad)


def test_group_must_divide_width():
    pat = parse_pattern("unstructured", 0.0, quant="w4g64")
    with pytest.raises(PatternError, match="does not divide"):
        pat.validate((8, 96))


@pytest.mark.parametrize("spec", ["w2", "w3g4", "w4g4a", "w8"])
def test_quantizer_grid_contains_zero_and_weights_range(spec):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 8, generator=g, dtype=torch.float64) + (0.5 if spec.endswith("a") else 0.0)
    qz = Quantizer.from_weights(parse_grid(spec), W)
    assert qz.on_grid(torch.zeros_like(W))
    R = qz.round(W)
    assert qz.on_grid(R)
    # the nearest grid value, checked against every code of the entry's grid
    s, z = qz.scales_full(), qz.zeros_full()
    levels = torch.arange(qz.spec.qmin, qz.spec.qmax + 1, dtype=torch.float64)
    cand = s.unsqueeze(-1) * (levels - z.unsqueeze(-1))
    best = cand.gather(-1, (cand - W.unsqueeze(-1)).abs().argmin(-1, keepdim=True)).squeeze(-1)
    assert torch.allclose((R - W).abs(), (best - W).abs(), atol=1e-12)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("row", 0.5), ("2:4", None)])
def test_projection_onto_grid_and_pattern_is_exact(pattern, sparsity):
    """Brute force over every feasible mask of a 2×4 matrix: the projection is the nearest feasible point."""
    pat = parse_pattern(pattern, sparsity, quant="w2")
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        W = torch.randn(2, 4, generator=g, dtype=torch.float64)
        qz = pat.quantizer(W)
        P, mask = pat.project_grid(W, qz)
        assert pat.weights_feasible(P, qz) and pat.is_feasible(mask)
        R = qz.round(W)
        best = min(float(((W - R * torch.tensor(bits, dtype=torch.float64).reshape(2, 4)) ** 2).sum())
                   for bits in itertools.product([0, 1], repeat=8)
                   if pat.is_feasible(torch.tensor(bits, dtype=torch.bool).reshape(2, 4)))
        assert float(((W - P) ** 2).sum()) == pytest.approx(best, abs=1e-12)


QUANT_CASES = [("unstructured", 0.0, "w4"), ("unstructured", 0.0, "w3g8a"), ("unstructured", 0.5, "w4g16"),
               ("row", 0.5, "w4"), ("2:4", None, "w4g8")]


@pytest.mark.parametrize("pattern,sparsity,quant", QUANT_CASES)
def test_grid_methods_feasible_and_gptq_beats_rtn(pattern, sparsity, quant):
    pat = parse_pattern(pattern, sparsity, quant=quant)
    pr = LayerProblem.random(16, 32, seed=2, kind="correlated")
    prog = grid_program(pr, pat)
    errs = {}
    for name in ("rtn", "gptq", "sparsegpt", "quant-refit"):
        res = get_method(name)(pr, pat)
        assert pat.is_feasible(res.mask) and res.info["qparams"].on_grid(res.W)
        assert not bool((res.W[~res.mask] != 0).any())  # pruned entries exactly zero
        errs[name] = res.info["error"]
        assert res.info["error"] == pytest.approx(pr.objective(res.W), rel=1e-9)
        if name != "quant-refit":  # the refit moves the scales: not the fixed-scale program's point
            assert prog.check({"W": res.W.double()})["feasible"], name
    assert errs["gptq"] < errs["rtn"]
    assert errs["quant-refit"] <= errs["gptq"] * (1 + 1e-9)


def test_gptq_needs_a_grid_and_sparsegpt_refit_refused():
    pr = LayerProblem.random(4, 8, seed=0)
    with pytest.raises(PatternError, match="--quant"):
        get_method("gptq")(pr, parse_pattern("unstructured", 0.5))
    with pytest.raises(PatternError, match="off the grid"):
        get_method("sparsegpt")(pr, parse_pattern("unstructured", 0.5, quant="w4"), refit=True)


def test_act_order_changes_the_order_not_the_grid():
    pr = LayerProblem.random(8, 32, seed=5, kind="outliers")
    pat = parse_pattern(None, quant="w3g8")
    a = get_method("gptq")(pr, pat, act_order=True)
    b = get_method("gptq")(pr, pat, act_order=False)
    qz = pat.quantizer(pr.W0)
    assert qz.on_grid(a.W) and qz.on_grid(b.W)
    assert a.info["act_order"] and not b.info["act_order"]
    assert not torch.equal(a.W, b.W)


@pytest.mark.parametrize("quant", ["w4", "w4g8", "w3g8a"])
def test_refit_scales_is_the_least_squares_optimum(quant):
    """The refitted scales match a dense least-squares solve of f over the scales, row by row."""
    pr = LayerProblem.random(6, 16, seed=7, kind="correlated")
    pat = parse_pattern("row", 0.25, quant=quant)
    res = get_method("gptq")(pr, pat)
    qz = res.info["qparams"].to(torch.float64)
    new = refit_scales(pr, qz, res.W)
    codes = qz.codes(res.W.double())
    P = (codes - qz.zeros_full()) * (res.W != 0)
    gs = qz.gs
    R = torch.linalg.cholesky(pr.H + 1e-12 * torch.eye(16, dtype=torch.float64)).T
    for i in range(6):
        V = torch.zeros(16 // gs, 16, dtype=torch.float64)  # row i's W = sᵀ V
        for gi in range(16 // gs):
            V[gi, gi * gs:(gi + 1) * gs] = P[i, gi * gs:(gi + 1) * gs]
        used = V.abs().sum(1) > 0
        # f_i(s) = ½‖R (Vᵀ s − w0)‖²  (no error correction: b = W0 H)
        s_ls = torch.linalg.lstsq((R @ V[used].T), R @ pr.W0[i].double().unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(new.scale[i, used], s_ls, rtol=1e-6, atol=1e-9)
    Wn = new.dequantize(codes) * (res.W != 0)
    assert pr.objective(Wn) <= pr.objective(res.W) * (1 + 1e-12)


# ------------------------------------------------------------------------------------ exact references
GRID_PROGRAMS = [("unstructured", 0.0, "w2"), ("row", 0.5, "w2"), ("unstructured", 0.5, "w2g4a"), ("2:4", None, "w2")]


@pytest.mark.parametrize("pattern,sparsity,quant", GRID_PROGRAMS)
def test_grid_references_agree_and_bound_every_method(pattern, sparsity, quant):
    """Enumeration and Gurobi (and SCIP on one instance) reach one optimum of the grid MIQP; the optimum is on the
    grid and in the pattern, and no production method beats it."""
    from optprune.solvers import get_backend
    pat = parse_pattern(pattern, sparsity, quant=quant)
    for seed in range(2):
        # SCIP on the 2×4 instance only: it needs seconds to tens of seconds on some 2×8 grid programs
        pr = LayerProblem.random(2, 8 if seed else 4, seed=seed, kind="correlated" if seed else "random")
        prog = grid_program(pr, pat)
        en = get_backend("enumerate-grid").solve(prog)
        assert en.proven_optimal and prog.check(en.values)["feasible"]
        qz = prog.meta["quantizer"]
        assert qz.on_grid(en.values["W"]) and pat.is_feasible(en.values["W"] != 0)
        refs = [en]
        names = ["gurobi"] + (["scip"] if seed == 0 else [])
        for name in names:
            b = get_backend(name)
            if not b.available() or not b.supports(prog)[0]:
                continue
            r = b.solve(prog, time_limit=60)
            assert r.proven_optimal and prog.check(r.values)["feasible"], name
            refs.append(r)
        for r in refs[1:]:
            assert r.objective == pytest.approx(en.objective, rel=1e-6, abs=1e-9), r.solver
        for m in ("rtn", "gptq", "sparsegpt"):
            assert pr.objective(get_method(m)(pr, pat).W) >= en.objective * (1 - 1e-9), m


def test_verify_covers_the_grid_programs():
    from optprune.solvers.verification import verify
    rows = verify(instances=1, programs="w2", backends="enumerate-grid", progress=False)
    progs = {r["program"] for r in rows}
    assert progs == {"L0 w2", "L0 unstructured+w2g4a", "L0 2:4+w2"}
    for prog in progs:
        solvers = {r["solver"] for r in rows if r["program"] == prog}
        assert {"enumerate-grid", "gptq", "rtn", "sparsegpt", "admm", "quant-refit"} <= solvers
    assert not [r for r in rows if str(r["check"]).startswith("FAIL")]
    assert all(r["gap"] >= -1e-9 for r in rows if r["role"] == "heuristic")


@pytest.mark.parametrize("pattern,sparsity,quant", QUANT_CASES)
def test_admm_over_grid_and_pattern(pattern, sparsity, quant):
    """ADMM's iterates are projected exactly onto grid ∩ pattern: its result is feasible, on the warm start's
    grid, and never worse than that warm start (GPTQ)."""
    pat = parse_pattern(pattern, sparsity, quant=quant)
    pr = LayerProblem.random(16, 32, seed=4, kind="outliers")
    g = get_method("gptq")(pr, pat)
    a = get_method("admm")(pr, pat)
    qz = a.info["qparams"]
    assert pat.is_feasible(a.mask) and qz.on_grid(a.W) and not bool((a.W[~a.mask] != 0).any())
    assert torch.equal(qz.scale, g.info["qparams"].scale)
    assert grid_program(pr, pat).check({"W": a.W.double()})["feasible"]
    assert a.info["error"] <= g.info["error"] * (1 + 1e-9)
    assert a.info["error"] == pytest.approx(pr.objective(a.W), rel=1e-9)


def test_admm_grid_refuses_refit_options():
    pr = LayerProblem.random(4, 8, seed=0)
    with pytest.raises(ValueError, match="do not apply with a grid"):
        get_method("admm")(pr, parse_pattern(None, quant="w4"), refit="cholesky")


# ------------------------------------------------------------------------------------------- mixed precision
def test_integer_bits_meets_the_budget_and_rounds_nearest():
    from optprune.solvers.whole_model.allocation import integer_bits
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        L, B = int(torch.randint(2, 12, (1,), generator=g)), int(torch.randint(3, 8, (1,), generator=g))
        t = torch.rand(L, generator=g, dtype=torch.float64) * 3
        t = (t - t.mean() + B).clamp(2, 8)
        t = t - t.mean() + B  # mean exactly B (equal sizes), within [2, 8] up to the clamp's shift
        if t.min() < 2 or t.max() > 8:
            continue
        b = integer_bits(t.tolist(), [1.0] * L, B)
        assert sum(b) == B * L and all(2 <= x <= 8 for x in b)
        assert all(abs(x - y) < 1 for x, y in zip(b, t.tolist()))  # floor or ceil of its target
        sizes = (torch.rand(L, generator=g, dtype=torch.float64) * 5 + 1).tolist()
        b = integer_bits(t.tolist(), sizes, B)
        assert sum(p * x for p, x in zip(sizes, b)) <= B * sum(sizes) + 1e-9


def test_bit_allocation_mean_and_auto_keeps_uniform_as_a_candidate(stories_dir):
    from transformers import AutoModelForCausalLM

    from optprune.llm_adapters.allocation_bits import layer_grids, rtn_loss
    from optprune.llm_adapters.architectures import get_arch
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    grids, info = layer_grids(model, None, "alpha", "w3g4")
    assert info["mean_bits"] == pytest.approx(3.0) and 2 <= info["min_bits"] < info["max_bits"] <= 8
    assert {parse_grid(g).group for g in grids.values()} == {4}
    assert all(parse_grid(g).bits == info["layer_bits"][n] for n, g in grids.items())
    before = {n: p.clone() for n, p in model.named_parameters()}
    grids, info = layer_grids(model, None, "auto", "w3g4", calib_ids=ids)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # scoring restores the weights
    labels = [c["label"] for c in info["candidates"]]
    assert labels[0] == "uniform" and info["chosen"] in labels
    best = min(c["rtn_loss"] for c in info["candidates"])
    assert next(c for c in info["candidates"] if c["label"] == info["chosen"])["rtn_loss"] == best
    # the score is the model's own loss with those widths (an independent recomputation)
    assert rtn_loss(model, get_arch(model), parse_grid("w3g4"), info["layer_bits"], ids[:8]) == pytest.approx(best)
    grids, info = layer_grids(model, None, "alpha", "w2g4")  # a mean of 2 bits within 2..8: uniform
    assert set(info["layer_bits"].values()) == {2}


def test_bit_allocation_refusals(tmp_path, capsys, stories_dir):
    from optprune.cli import main
    out = tmp_path / "o"
    for argv, words in ((["--allocation", "alpha:bounded"], "bit widths"),
                        (["--allocation", "alpha", "--sparsity", "0.5"], "does not also allocate sparsity")):
        rc = main(["prune", "--model", str(stories_dir), "--method", "gptq", "--quant", "w3", *argv, "--no-eval",
                   "--output", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and words in err[0] and not out.exists(), err
