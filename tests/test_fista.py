"""FISTAPruner (solvers/methods/fista.py): the ℓ1 model against cvxpy, KKT, O(1/k²), exactness, never worse than the
warm start, and the end-to-end run on stories260K."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from optprune.formulations import (ColumnGroups, LayerProblem, PatternError, l1_kkt_residual, l1_program,
                                   parse_pattern)
from optprune.solvers import get_method
from optprune.solvers.methods.fista import (FistaEngine, default_lambda, fista_l1, ill_conditioned_problem,
                                   lipschitz_constant)

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ["OPTPRUNE_MODEL_DIR"])  # set by tests/conftest.py
STORIES = MODEL_DIR / "stories260K"




# --------------------------------------------------------------------------------------------- instances
def real_problem(rows=16, cols=32, *, corrected=False, seed=0, tokens=384, layer="q_proj"):
    """A slice of a real stories260K weight with its real layer-0 inputs: RMSNorm(embedding of random tokens).

    ``corrected``: X̂ from a magnitude-pruned (50%) embedding table, target the dense W0 X.
    """
    st = pytest.importorskip("safetensors.torch")
    f = STORIES / "model.safetensors"
    if not f.is_file():
        pytest.skip(f"stories260K not found in {MODEL_DIR}")
    d = st.load_file(str(f))
    emb = d["model.embed_tokens.weight"].double()
    lnw = d["model.layers.0.input_layernorm.weight"].double()
    ids = torch.randint(0, emb.shape[0], (tokens,), generator=torch.Generator().manual_seed(seed))

    def inputs(E):
        x = E[ids]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * lnw

    X = inputs(emb)
    Xh = inputs(emb * (emb.abs() > emb.abs().median())) if corrected else None
    W = d[f"model.layers.0.self_attn.{layer}.weight"].double()[:rows, :cols]
    return LayerProblem.from_activations(W, X[:, :cols], None if Xh is None else Xh[:, :cols],
                                         dtype=torch.float64, name=f"stories260K.{layer}[{rows}x{cols}]")


def instance(kind: str) -> LayerProblem:
    if kind == "real":
        return real_problem()
    if kind == "real-corrected":
        return real_problem(corrected=True)
    base, _, corr = kind.partition("-")
    return LayerProblem.random(12, 24, kind=base, corrected=corr == "corrected", seed=3)


def cvxpy_l1(problem: LayerProblem, lam: float):
    """The ℓ1 model's optimum by the cvxpy reference backend (or by cvxpy directly if the backend is absent)."""
    pytest.importorskip("cvxpy")
    from optprune.solvers import UnknownMethodError, get_backend
    prog = l1_program(problem, lam)
    try:
        backend = get_backend("cvxpy")
    except UnknownMethodError:
        backend = None
    if backend is not None and backend.available():
        res = backend.solve(prog)
        assert res.status == "optimal", res.row()
        return res.W, prog.evaluate({"W": res.W})
    import cvxpy as cp  # direct form: Ĥ = R Rᵀ (eigen square root), f = ½‖W R − T‖² + const
    import numpy as np
    Hh = problem.Hh.double().numpy()
    B = (problem.W0.double() @ problem.Cm.double()).numpy()
    ev, V = np.linalg.eigh(Hh)
    k = ev > ev.max() * 1e-13
    R = V[:, k] * np.sqrt(ev[k])
    T = B @ V[:, k] / np.sqrt(ev[k])
    W = cp.Variable(problem.shape)
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(W @ R - T) + lam * cp.sum(cp.abs(W)))).solve(solver="CLARABEL")
    Wt = torch.tensor(W.value)
    return Wt, prog.evaluate({"W": Wt})


KINDS = ["random", "correlated", "correlated-corrected", "outliers", "dead", "real", "real-corrected"]


# --------------------------------------------------------------------------------------------- 1. convex model
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lam_frac", [0.05, 0.5])
def test_l1_optimum_matches_cvxpy_and_kkt(kind, lam_frac):
    p = instance(kind)
    lam = lam_frac * default_lambda(p, parse_pattern("unstructured", 0.5))
    sol = fista_l1(p, lam, tol=1e-14, iters=50000)
    W_ref, F_ref = cvxpy_l1(p, lam)
    F = l1_program(p, lam).evaluate({"W": sol.W})
    assert abs(F - sol.objective) <= 1e-9 * abs(F)               # the solver's own F is the program's F
    assert abs(F - F_ref) <= 1e-6 * abs(F_ref), (F, F_ref)       # same optimum as the reference
    assert sol.kkt <= 1e-6, sol.kkt                               # and it is a KKT point
    assert l1_program(p, lam).kkt_residual({"W": sol.W}) == pytest.approx(sol.kkt)
    if kind == "dead":
        assert (sol.W[:, p.dead_inputs()] == 0).all()


def test_kkt_residual_detects_non_optimal_points():
    p = instance("correlated")
    lam = 0.3 * default_lambda(p, parse_pattern("unstructured", 0.5))
    sol = fista_l1(p, lam, tol=1e-14)
    assert sol.kkt < 1e-8
    assert l1_kkt_residual(p, lam, p.W0) > 1e-2                 # the dense start is not optimal
    W = sol.W.clone()
    i, j = torch.nonzero(W == 0)[0].tolist()
    W[i, j] = 1e-3 * W.abs().max()                               # revive one zero: a small violation
    assert l1_kkt_residual(p, lam, W) > 1e-4
    assert l1_kkt_residual(p, 0.0, p.W0 * 0.5) > 0                # λ = 0 uses the gradient scale


@pytest.mark.parametrize("kind", ["outliers", "correlated", "ill"])
def test_lanczos_lipschitz_brackets_the_exact_value(kind):
    p = ill_conditioned_problem(2, 400, cond=1e6) if kind == "ill" else LayerProblem.random(4, 300, kind=kind, seed=1)
    exact = lipschitz_constant(p.H, method="exact")
    for H in (p.H, p.H.float()):
        lz = lipschitz_constant(H, method="lanczos")
        assert exact <= lz <= exact * 1.0011


def test_float32_iterations_track_float64():
    p = real_problem(32, 64)
    lam = 0.2 * default_lambda(p, parse_pattern("unstructured", 0.5))
    W64 = FistaEngine(p, dtype=torch.float64).run(p.W0, lam, 60).clone()
    W32 = FistaEngine(p, dtype=torch.float32).run(p.W0, lam, 60).clone()
    assert (W32.double() - W64).norm() <= 1e-4 * W64.norm()


# --------------------------------------------------------------------------------------------- 2. O(1/k²)
def test_convergence_rate_and_restart():
    p = ill_conditioned_problem(8, 32, cond=1e5, seed=0)
    ev = torch.linalg.eigvalsh(p.H)
    assert ev[-1] / ev[0] > 1e4                                   # strongly ill-conditioned
    lam = 0.02 * default_lambda(p, parse_pattern("unstructured", 0.5))
    star = fista_l1(p, lam, tol=1e-15, iters=100000)
    assert star.kkt < 1e-9
    K = 2000
    plain = fista_l1(p, lam, iters=K, tol=0.0, restart=False, history=True)
    rest = fista_l1(p, lam, iters=K, tol=0.0, restart=True, history=True)
    assert len(plain.history) == K + 1 and plain.restarts == 0
    Fs = min(star.objective, min(plain.history), min(rest.history))
    gap = torch.tensor(plain.history, dtype=torch.float64) - Fs
    k = torch.arange(len(gap), dtype=torch.float64)
    # Beck–Teboulle (2009, Thm 4.4): F(x_k) − F* ≤ 2 L ‖x_0 − x*‖² / (k+1)²  for every k ≥ 1 ...
    bound = 2 * plain.L * float((p.W0 - star.W).pow(2).sum())
    scaled = gap[1:] * (k[1:] + 1) ** 2
    assert float(scaled.max()) <= bound * (1 + 1e-6), (float(scaled.max()), bound)
    # ... and on this instance the measured gap really lives on that 1/k² scale (within a factor 10 of the bound)
    assert float(scaled.max()) >= 0.1 * bound
    # plain FISTA has not reached a 1e-8 relative gap after K iterations; adaptive restart has
    rel_plain = gap / abs(Fs)
    rel_rest = (torch.tensor(rest.history, dtype=torch.float64) - Fs) / abs(Fs)
    assert float(rel_plain[-1]) > 1e-8
    hit = torch.nonzero(rel_rest <= 1e-8)
    assert hit.numel() > 0 and int(hit[0]) < K
    assert rest.restarts > 0


# --------------------------------------------------------------------------------------------- 3. the pruner
PATTERNS = [("unstructured", 0.5), ("unstructured", 0.7), ("row", 0.5), ("2:4", None), ("4:8", None)]


@pytest.mark.parametrize("pat_s", PATTERNS, ids=lambda x: f"{x[0]}-{x[1]}")
@pytest.mark.parametrize("kind", ["random", "correlated-corrected", "real", "real-corrected"])
@pytest.mark.parametrize("warm", ["sparsegpt", "wanda"])
def test_exact_sparsity_and_never_worse_than_warm_start(pat_s, kind, warm):
    p = instance(kind).to(torch.float32)
    pat = parse_pattern(pat_s[0], pat_s[1])
    res = get_method("fista")(p, pat, warm_start=warm)
    ref = get_method(warm)(p, pat)
    ref_err = ref.info["error"]
    if not pat.is_feasible(ref.mask):  # Wanda's per-row rule under a per-matrix target: projected first
        assert res.info["warm_projected"]
        ref_err = res.info["warm_error"]
    assert pat.is_feasible(res.mask)
    assert int(res.mask.sum()) == pat.kept_count(p.shape)        # exactly the target, not below it
    assert (res.W[~res.mask] == 0).all()
    assert res.info["error"] == pytest.approx(p.objective(res.W), rel=1e-6)
    assert res.info["error"] <= ref_err                            # never worse than the warm start
    assert res.info["warm_error"] == pytest.approx(ref_err)
    assert len([r for r in res.info["rounds"] if r["round"] > 0]) == 3
    assert res.info["iterations"] == 3 * 20
    if res.info["returned_warm_start"]:
        assert torch.equal(res.mask, ref.mask if not res.info["warm_projected"] else res.mask)


@pytest.mark.parametrize("pat_s", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)])
def test_debiased_rounds_beat_sparsegpt_on_a_real_layer(pat_s):
    """With the (non-paper) per-round debiasing, FISTA's mask + weights beat SparseGPT's on a real layer."""
    p = real_problem(64, 64, tokens=1024).to(torch.float32)
    pat = parse_pattern(*pat_s)
    sg = get_method("sparsegpt")(p, pat)
    res = get_method("fista")(p, pat, debias_iters=20)
    assert res.info["error"] < sg.info["error"]
    assert pat.is_feasible(res.mask) and int(res.mask.sum()) == pat.kept_count(p.shape)


def test_refit_is_measured_separately():
    p = real_problem(32, 64, corrected=True).to(torch.float32)
    pat = parse_pattern("unstructured", 0.5)
    res = get_method("fista")(p, pat, refit=True)
    i = res.info
    assert {"error_before_refit", "error_after_refit", "refit_time_s"} <= set(i)
    assert i["error"] == pytest.approx(min(i["error_before_refit"], i["error_after_refit"]))
    assert i["error_after_refit"] <= i["error_before_refit"] * (1 + 1e-6)
    assert i["error"] <= i["warm_error"]


def test_zeros_are_not_frozen():
    p = real_problem(16, 32)
    pat = parse_pattern("unstructured", 0.5)
    sg = get_method("sparsegpt")(p, pat)
    W = FistaEngine(p).run(sg.W, 0.01 * default_lambda(p, pat), 5)
    assert (W[~sg.mask] != 0).any()                               # pruned weights come back


def test_branchless_accelerator_path_matches_the_cpu_path():
    """The CUDA code path (no host sync: restart decided on device tensors) run on the CPU gives the same iterates."""
    p = real_problem(16, 32)
    lam = 0.1 * default_lambda(p, parse_pattern("unstructured", 0.5))
    a, b = FistaEngine(p), FistaEngine(p)
    b.branchless = True
    Wa = a.run(p.W0, lam, 200).clone()
    Wb = b.run(p.W0, lam, 200).clone()
    assert a.restarts == b.restarts > 0
    assert torch.allclose(Wa, Wb, rtol=0, atol=1e-12 * float(Wa.abs().max()))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    p = real_problem(64, 64, corrected=True).to(torch.float32)
    pat = parse_pattern("2:4")
    cpu = get_method("fista")(p, pat, debias_iters=10)
    gpu = get_method("fista")(p, pat, debias_iters=10, device="cuda")
    assert gpu.W.device == p.W0.device and pat.is_feasible(gpu.mask)
    assert gpu.info["error"] == pytest.approx(cpu.info["error"], rel=1e-3)
    sol_c = fista_l1(p.to(torch.float64), 1.0)
    sol_g = fista_l1(p.to(torch.float64), 1.0, device="cuda")
    assert sol_g.objective == pytest.approx(sol_c.objective, rel=1e-9)


def test_registry_program_and_bad_input():
    spec = get_method("fista")
    assert spec.needs == "gram" and {"unstructured", "row", "nm"} <= set(spec.patterns)
    p = instance("random")
    prog = spec.program(p, parse_pattern("2:4"), lam=0.5)
    assert prog.kind == "L1" and prog.meta["lam"] == 0.5
    W0 = p.W0.clone()
    with pytest.raises(PatternError):
        spec(p, ColumnGroups(4, sparsity=0.5))
    with pytest.raises(ValueError):
        spec(p, parse_pattern("unstructured", 0.5), xi=1.5)
    with pytest.raises(ValueError):
        fista_l1(p, -1.0)
    assert torch.equal(p.W0, W0)


# --------------------------------------------------------------------------------------------- 4. end to end
def _stories_model():
    transformers = pytest.importorskip("transformers")
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found in {MODEL_DIR}")
    return transformers.AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)])
def test_prune_model_end_to_end(pattern, sparsity):
    pl = pytest.importorskip("optprune.llm_adapters.pipeline")
    model = _stories_model()
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    cfg = pl.PruneConfig(method="fista", sparsity=sparsity, pattern=pattern, device="cpu",
                         method_options={"warm_start": "sparsegpt"})
    rec = pl.prune_model(model, ids, cfg, progress=False)
    layers = rec["layers"]
    assert len(layers) == 5 * 7
    for r in layers:
        assert r["feasible"], r["name"]
        assert r["sparsity_target"] - 1e-9 <= r["sparsity"] <= r["sparsity_target"] + 5e-3, r["name"]
        assert r["error"] <= r["warm_error"] * (1 + 1e-6) + 1e-9, r["name"]
    assert sum(r["error"] for r in layers) <= sum(r["warm_error"] for r in layers)
    # the pruned model still runs
    out = model(ids[:1]).logits
    assert torch.isfinite(out).all()


CLI_CASES = [
    pytest.param(["--sparsity", "0.7", "-O", "warm_start=wanda", "-O", "refit=true", "-O", "iters=10"], 0.7,
                 id="0.7-wanda-refit"),
    pytest.param(["--sparsity", "0.5"], 0.5, id="0.5", marks=pytest.mark.slow),
    pytest.param(["--pattern", "2:4"], 0.5, id="2:4", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("args,target", CLI_CASES)
def test_cli_end_to_end(tmp_path, args, target):
    """``optprune prune --model stories260k --method fista ...`` through the CLI entry point (``-O`` options
    arrive as keyword arguments of the method). The default run keeps one case; ``-m slow`` runs all three."""
    pytest.importorskip("optprune.llm_adapters.run")
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found in {MODEL_DIR}")
    from optprune.cli import main
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", "stories260k", "--method", "fista", "--device", "cpu", "--nsamples", "8",
               "--seqlen", "64", "--no-eval", "--output", str(out)] + args)
    assert rc == 0
    import json
    rec = json.loads((out / "run.json").read_text())
    opts = rec["config"]["method_options"]
    layers = rec["layers"]
    assert len(layers) == 35
    for r in layers:
        assert r["feasible"] and r["sparsity_target"] - 1e-9 <= r["sparsity"] <= r["sparsity_target"] + 5e-3
        assert r["error"] <= r["warm_error"] * (1 + 1e-6)
        assert r["warm_start"] == opts.get("warm_start", "sparsegpt")
        assert r["iterations"] == 3 * opts.get("iters", 20)
        if opts.get("refit"):
            assert r["error_after_refit"] <= r["error_before_refit"] * (1 + 1e-6)
    assert sum(r["error"] for r in layers) <= sum(r["warm_error"] for r in layers)
    assert abs(rec["summary"]["sparsity"] - target) < 5e-3
