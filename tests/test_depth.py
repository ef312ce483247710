"""Depth pruning: the knapsack program, its dynamic programme against enumeration and Gurobi, block removal
surgery that stock transformers loads, the removal-cost measurement and the depth prune run."""
import itertools

import pytest
import torch

from optprune.formulations.depth import DepthError, depth_program, is_chain
from optprune.solvers.whole_model.depth import solve_depth
from optprune.solvers.backends.bqp import BQPEnumerateBackend, BQPGurobiBackend


def _brute(c, Q, w, b):
    """Independent optimum: every selection by itertools, the objective written out term by term."""
    n = len(c)
    best, arg = float("inf"), None
    for z in itertools.product((0, 1), repeat=n):
        if sum(z) == n or sum(wi * zi for wi, zi in zip(w, z)) < b - 1e-9 * max(1, b):
            continue
        f = sum(c[i] * z[i] for i in range(n)) + sum(Q[i][j] * z[i] * z[j] for i in range(n) for j in range(i + 1, n))
        if f < best:
            best, arg = f, z
    return best, arg


@pytest.mark.parametrize("seed", range(12))
def test_dp_matches_brute_force_on_chains(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(3, 11, (1,), generator=g))
    c = (torch.randn(n, generator=g, dtype=torch.float64)).tolist()
    q = (torch.randn(n - 1, generator=g, dtype=torch.float64)).tolist()
    w = (torch.rand(n, generator=g, dtype=torch.float64) + 0.1).tolist() if seed % 2 else [1.0] * n
    b = 0.5 * sum(w) if seed % 2 else float(n // 2)
    prog = depth_program(c, w, b, neighbours=q)
    Q = [[0.0] * n for _ in range(n)]
    for i in range(n - 1):
        Q[i][i + 1] = q[i]
    best, arg = _brute(c, Q, w, b)
    sol = solve_depth(prog)
    assert sol.exact
    assert sol.objective == pytest.approx(best, abs=1e-12)
    assert prog.check({"z": sol.z.double()})["feasible"]
    assert prog.evaluate({"z": sol.z.double()}) == pytest.approx(best, abs=1e-12)


def test_general_interactions_are_a_feasible_heuristic():
    g = torch.Generator().manual_seed(3)
    n = 9
    c, P = torch.rand(n, generator=g, dtype=torch.float64), torch.randn(n, n, generator=g, dtype=torch.float64)
    prog = depth_program(c, torch.ones(n), 4, pairs=P)
    assert not is_chain(prog.meta["Q"])
    sol = solve_depth(prog)
    best, _ = _brute(c.tolist(), torch.triu(P, 1).tolist(), [1.0] * n, 4)
    assert not sol.exact and prog.check({"z": sol.z.double()})["feasible"]
    assert sol.objective >= best - 1e-12


def test_references_agree_with_brute_force():
    g = torch.Generator().manual_seed(5)
    n = 8
    c, P = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, n, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    prog = depth_program(c, w, 0.4 * float(w.sum()), pairs=P)
    best, _ = _brute(c.tolist(), torch.triu(P, 1).tolist(), w.tolist(), 0.4 * float(w.sum()))
    r = BQPEnumerateBackend().solve(prog)
    assert r.proven_optimal and r.objective == pytest.approx(best, abs=1e-12)
    if BQPGurobiBackend.available():
        r = BQPGurobiBackend().solve(prog)
        assert r.proven_optimal and r.objective == pytest.approx(best, abs=1e-9)


def test_bad_programs_fail_loudly():
    with pytest.raises(DepthError, match="exceeds"):
        depth_program([1, 2, 3], [1, 1, 1], 3)           # would remove every unit
    with pytest.raises(DepthError, match="savings"):
        depth_program([1, 2, 3], [1, -1, 1], 1)
    with pytest.raises(DepthError, match="NaN"):
        depth_program([1, float("nan"), 3], [1, 1, 1], 1)
    with pytest.raises(DepthError, match="entries"):
        depth_program([1, 2, 3], [1, 1, 1], 1, neighbours=[0.1])


def test_verify_covers_the_depth_programs():
    from optprune.solvers.verification import verify
    rows = verify(instances=6, programs=["depth"])
    assert {r["program"] for r in rows} == {"depth knapsack BQP (chain)", "depth knapsack BQP (all pairs)"}
    assert all(r["check"] == "ok" for r in rows)
    assert {r["solver"] for r in rows} >= {"depth-dp", "bqp-enumerate"}


# ------------------------------------------------------------------------------------------------ surgery
def _tiny_llama(layers=6, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return LlamaForCausalLM(cfg).eval()


def test_removed_blocks_equal_skipped_blocks_and_load_in_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    from optprune.llm_adapters.architectures import get_arch
    from optprune.llm_adapters.depth import _note_output_kind, skipped
    from optprune.llm_adapters.surgery import remove_blocks, save_shrunk
    model = _tiny_llama()
    arch = get_arch(model)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    _note_output_kind(model, arch, ids)
    with torch.no_grad():
        dense = model(ids).logits
        with skipped(model, arch, [1, 4]):
            want = model(ids).logits
    assert not torch.allclose(dense, want)
    info = remove_blocks(model, arch, [4, 1])
    assert info["kept"] == [0, 2, 3, 5] and model.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        got = model(ids).logits
        assert torch.allclose(got, want, atol=1e-5)
        # the KV cache follows the renumbered blocks: cached decoding equals the full forward
        out = model(ids[:, :12], use_cache=True)
        step = model(ids[:, 12:13], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        assert torch.allclose(step, model(ids[:, :13]).logits[:, -1], atol=1e-5)
    rec = save_shrunk(model, str(tmp_path), arch)
    assert rec["stock_loadable"]
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert back.config.num_hidden_layers == 4
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, want, atol=1e-5)


def test_remove_blocks_refuses_bad_indices():
    from optprune.llm_adapters.surgery import SurgeryError, remove_blocks
    model = _tiny_llama(layers=3)
    with pytest.raises(SurgeryError, match="out of range"):
        remove_blocks(model, None, [3])
    with pytest.raises(SurgeryError, match="leaves none"):
        remove_blocks(model, None, [0, 1, 2])
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3


def test_removal_costs_are_measured_losses_and_the_program_picks_the_cheapest():
    from optprune.llm_adapters.architectures import get_arch
    from optprune.llm_adapters.depth import (block_influence, calibration_nll, depth_budget, removal_costs,
                                             select_blocks, skipped)
    model = _tiny_llama(layers=5, seed=1)
    arch = get_arch(model)
    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(2))
    costs = removal_costs(model, arch, ids, cache=False)
    # independent recomputation of one single and one pair cost, by the NLL of the model with the blocks skipped
    with skipped(model, arch, [2]):
        assert costs["single"][2] == pytest.approx(calibration_nll(model, ids) - costs["dense"], abs=1e-9)
    with skipped(model, arch, [0, 1]):
        pair = calibration_nll(model, ids) - costs["dense"]
    assert costs["neighbours"][0] == pytest.approx(pair - costs["single"][0] - costs["single"][1], abs=1e-9)
    budget = depth_budget(model, arch, sparsity=0.4)
    assert budget["need"] == 2
    sel = select_blocks("depth", model, arch, ids, budget)
    best = min(((i, j) for i in range(5) for j in range(i + 1, 5)),
               key=lambda p: costs["single"][p[0]] + costs["single"][p[1]]
               + (costs["neighbours"][p[0]] if p[1] == p[0] + 1 else 0.0))
    assert tuple(sel["program_removed"]) == best
    bi = block_influence(model, arch, ids)
    sg = select_blocks("shortgpt", model, arch, ids, budget)
    assert sg["removed"] == sorted(sorted(range(5), key=lambda i: bi[i])[:2])
    # the kept answer is the candidate (program or ShortGPT) of lower measured calibration loss
    loss = {}
    for cand in (list(best), sg["removed"]):
        with skipped(model, arch, cand):
            loss[tuple(cand)] = calibration_nll(model, ids) - costs["dense"]
    assert tuple(sel["removed"]) == min(loss, key=loss.get)
    assert sel["measured_increase"] == pytest.approx(min(loss.values()), abs=1e-9)
    with pytest.raises(ValueError, match="cannot be reached"):
        select_blocks("depth", model, arch, ids, depth_budget(model, arch, sparsity=1.0))


# ------------------------------------------------------------------------------------------------ the prune run
@pytest.mark.parametrize("args, msg", [
    (["--method", "spap"], "takes --method depth or shortgpt"),
    (["--method", "depth", "--speedup", "1.5", "--flops", "0.5"], "one budget"),
    (["--method", "depth", "--speedup", "1.5", "--sparsity", "0.2"], "drop --sparsity"),
    (["--method", "depth", "--speedup", "0.9"], "> 1"),
    (["--method", "depth", "--flops", "1.2"], "(0, 1)"),
    (["--method", "depth", "--sparsity", "0.2", "--allocation", "alpha"], "--allocation does not apply"),
    (["--method", "depth", "--sparsity", "0.2", "-O", "bogus=1"], "unknown option"),
    (["--method", "shortgpt", "--sparsity", "0.2", "-O", "windows=0"], "windows must be"),
    (["--method", "depth", "--sparsity", "0.2", "-O", "tokens=1"], "tokens must be"),
])
def test_depth_bad_input_is_one_line_exit_2(args, msg, tmp_path, capsys, stories_dir):
    from optprune.cli import main
    out = tmp_path / "o"
    rc = main(["prune", "--model", str(stories_dir), "--structure", "depth", *args, "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0] and not out.exists(), err


@pytest.mark.parametrize("method", ["depth", "shortgpt"])
def test_depth_run_saves_a_shorter_model_stock_transformers_loads(method, tmp_path, stories_dir, data_dir):
    import json
    from transformers import AutoModelForCausalLM
    from optprune.cli import main
    out = tmp_path / method
    rc = main(["-q", "prune", "--model", str(stories_dir), "--structure", "depth", "--method", method,
               "--sparsity", "0.4", "-O", "windows=4", "--nsamples", "8", "--seqlen", "64", "--no-kl",
               "--eval-windows", "2", "--data-dir", str(data_dir), "--output", str(out)])
    assert rc == 0
    rec = json.loads((out / "run.json").read_text())
    L = rec["model"]["num_layers"]
    d = rec["depth"]
    assert len(d["removed"]) == round(0.4 * L) and d["surgery"]["layers"] == L - len(d["removed"])
    assert rec["speed"]["speedup"] > 0 and rec["speed"]["batch"] == 8
    m = AutoModelForCausalLM.from_pretrained(str(out))
    assert m.config.num_hidden_layers == L - len(d["removed"]) == len(m.model.layers)
    if method == "depth":  # the model's prediction and the measured loss of the chosen set are both recorded
        assert d["exact"] and "measured_increase" in d and "predicted_increase" in d
    else:
        assert len(d["block_influence"]) == L


def test_removal_costs_cache_is_keyed_by_weights_and_text(tmp_path, monkeypatch):
    from optprune.llm_adapters.architectures import get_arch
    from optprune.llm_adapters.depth import removal_costs
    monkeypatch.setenv("OPTPRUNE_CACHE_DIR", str(tmp_path))
    model = _tiny_llama(layers=3, seed=4)
    arch = get_arch(model)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    a = removal_costs(model, arch, ids)
    b = removal_costs(model, arch, ids)
    assert not a["cached"] and b["cached"] and a["single"] == b["single"]
    assert not removal_costs(model, arch, ids[:, :12])["cached"]
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(2.0)
    c = removal_costs(model, arch, ids)
    assert not c["cached"] and c["single"] != a["single"]


def test_api_prune_and_save_a_depth_model(tmp_path, stories_dir, data_dir):
    import optprune
    from transformers import AutoModelForCausalLM
    m, rec = optprune.prune(str(stories_dir), method="shortgpt", structure="depth", sparsity=0.4, nsamples=4,
                            seqlen=32, data_dir=str(data_dir))
    L = rec["model"]["num_layers"]
    assert len(m.model.layers) == L - len(rec["depth"]["removed"]) < L
    info = optprune.save(m, tmp_path / "o")
    assert info["stock_loadable"]
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "o")).config.num_hidden_layers == len(m.model.layers)
