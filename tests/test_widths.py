"""Per-block widths under a latency budget (llm_adapters/widths.py): the time model's inversion against a closed
form, the allocation's time-weighted mean, the removed-energy proxy against a direct computation, bad input,
and ``--structure mlp,heads --speedup`` end to end on a tiny model whose checkpoint loads again."""
import json

import pytest
import torch

from optprune.llm_adapters import latency, widths


def _tm(L, rest=0.4, mlp=(1.0, 0.6), heads=(1.0, 0.2), block=1.0):
    """Blocks of 1.0 s of which the MLP is 0.6 s and the attention 0.2 s, both linear in the kept width (the curves
    measured at another load of the machine: twice and half as slow; only their shares of a block count)."""
    return {"latency_model": {"block_s": [block] * L, "rest_s": rest},
            "curves": {"mlp": {"points": [(1.0, 2 * mlp[1]), (0.5, mlp[1]), (0.1, mlp[1] / 5)], "block_s": 2.0},
                       "heads": {"points": [(1.0, heads[1] / 2), (0.5, heads[1] / 4)], "block_s": 0.5}}}


def _units(L, groups=(1000, 8)):
    from optprune.formulations.patterns import ColumnGroups
    out = []
    for i in range(L):
        for kind, g in zip(("mlp", "heads"), groups):
            out.append({"block": i, "kind": kind, "name": f"b.{i}.{kind}", "groups": g, "pattern": ColumnGroups(1, sparsity=0.0)})
    return out


def test_uniform_widths_invert_the_linear_time_model():
    L = 4
    tm, units = _tm(L), _units(L, groups=(10**6, 10**6))  # fine groups: rounding negligible
    r = widths._solve_budget("uniform", tm, units, 1.5, None, None)
    # T(S) = 4.4 − 4·0.8·S  ⇒  S = (4.4 − 4.4/1.5) / 3.2
    assert r["mean_sparsity"] == pytest.approx((4.4 - 4.4 / 1.5) / 3.2, abs=1e-6)
    assert r["modelled_speedup"] == pytest.approx(1.5, abs=1e-5)
    with pytest.raises(ValueError, match="cannot be reached"):
        widths._solve_budget("uniform", tm, units, 4.0, None, None)  # T ≥ 4.4 − 3.2 → at most 3.67×


def test_rounded_widths_meet_the_budget_and_are_the_smallest_that_do():
    L = 3
    tm, units = _tm(L), _units(L, groups=(40, 8))
    r = widths._solve_budget("uniform", tm, units, 1.3, None, None)
    dense, t = widths.modelled_time(tm, units, r["kept"])
    assert dense / t >= 1.3 and r["modelled_speedup"] == pytest.approx(dense / t)
    # one more group kept anywhere (where the rule allows it) breaks the budget: S is the smallest
    s = r["mean_sparsity"] - 1e-9
    k = widths._kept(units, [s] * len(units))
    d2, t2 = widths.modelled_time(tm, units, k)
    assert k != r["kept"] and d2 / t2 < 1.3


def test_alpha_widths_keep_the_time_weighted_mean_and_follow_the_metric():
    L = 4
    tm, units = _tm(L), _units(L, groups=(10**6, 10**6))
    metric = [2.0 + 0.5 * i for i in range(2 * L)]
    r = widths._solve_budget("alpha", tm, units, 1.4, metric, 0.2)
    sizes = [0.6 if u["kind"] == "mlp" else 0.2 for u in units]
    s = r["sparsities"]
    assert sum(a * b for a, b in zip(sizes, s)) / sum(sizes) == pytest.approx(r["mean_sparsity"], abs=1e-9)
    mlp = [x for u, x in zip(units, s) if u["kind"] == "mlp"]
    assert mlp == sorted(mlp) and mlp[0] < mlp[-1]  # larger α ⇒ more sparsity (AlphaPruning's map)
    assert r["modelled_speedup"] >= 1.4 - 1e-6


def test_removed_energy_matches_a_direct_computation():
    from transformers import LlamaConfig, LlamaForCausalLM
    from optprune.llm_adapters.allocation import activation_sq_norms
    from optprune.llm_adapters.architectures import get_arch
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    arch = get_arch(model)
    units = widths.width_units(model, arch, ["mlp", "heads"])
    ids = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(1))
    sq = activation_sq_norms(model, arch, ids)
    kept = [u["groups"] - 1 - (u["block"] % 2) for u in units]
    got = widths.removed_energy(model, arch, units, kept, sq)
    rem = tot = 0.0
    for u, k in zip(units, kept):
        lin = model.model.layers[u["block"]].mlp.down_proj if u["kind"] == "mlp" else \
            model.model.layers[u["block"]].self_attn.o_proj
        x2 = sq[u["name"]]
        d = 1 if u["kind"] == "mlp" else 8
        scores = sorted(float(sum(x2[j] * (lin.weight[:, j].detach() ** 2).sum() for j in range(g * d, (g + 1) * d)))
                        for g in range(u["groups"]))
        rem += sum(scores[: u["groups"] - k])
        tot += sum(scores)
    assert got == pytest.approx(rem / tot, rel=1e-5)


@pytest.mark.parametrize("args, msg", [
    (["--method", "wanda", "--speedup", "1.5"], "applies to structured methods"),
    (["--method", "spap", "--structure", "hidden", "--speedup", "1.5"], "not --structure hidden"),
    (["--method", "spap", "--speedup", "1.5", "--sparsity", "0.3"], "drop --sparsity"),
    (["--method", "spap", "--speedup", "1"], "> 1"),
    (["--method", "spap", "--speedup", "1.5", "--allocation", "owl"], "--allocation uniform or alpha"),
    (["--method", "spap", "--flops", "0.5"], "--flops applies to --structure depth"),
])
def test_width_speed_budget_bad_input(args, msg, tmp_path, capsys, stories_dir):
    from optprune.cli import main
    rc = main(["prune", "--model", str(stories_dir), *args, "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0] and not (tmp_path / "o").exists(), err


def _fixed_time_model(monkeypatch):
    # a deterministic time model (the real one is measured; here it must not depend on the machine's load)
    monkeypatch.setattr(latency, "latency_model", lambda model, **kw: {
        "block_s": [1.0] * model.config.num_hidden_layers, "rest_s": 0.5, "total_s": 0.0})
    monkeypatch.setattr(latency, "width_time_curve", lambda model, arch, kind, **kw: {
        "kind": kind, "points": [(1.0, 0.5 if kind == "mlp" else 0.3), (0.1, 0.05 if kind == "mlp" else 0.03)],
        "block_s": 1.0})


def test_mlp_speed_budget_run_records_the_chosen_sparsity_and_measured_speed(tmp_path, stories_dir, data_dir,
                                                                            monkeypatch):
    from optprune.cli import main
    _fixed_time_model(monkeypatch)
    out = tmp_path / "w"
    rc = main(["-q", "prune", "--model", str(stories_dir), "--method", "group_obs", "--speedup", "1.2",
               "--nsamples", "8", "--seqlen", "64", "--no-kl", "--eval-windows", "2", "--data-dir", str(data_dir),
               "--output", str(out)])
    assert rc == 0
    rec = json.loads((out / "run.json").read_text())
    L = rec["model"]["num_layers"]
    b = rec["speed_budget"]
    S = b["sparsity"]
    n = json.loads((out / "optprune_widths.json").read_text())["layers"]
    width = rec["model"].get("intermediate_size") or max(w["mlp"] for w in n)
    # T(S) = L + 0.5 − 0.5·L·S (rounded to whole neurons): the smallest S reaching 1.2×, within one neuron
    assert S == pytest.approx((1 - 1 / 1.2) * (L + 0.5) / (0.5 * L), abs=1.5 / width)
    assert b["modelled_speedup"] >= 1.2 and rec["config"]["speedup"] == 1.2
    assert rec["speed"]["speedup"] > 0 and rec["speed"]["batch"] == 8
    assert [w["mlp"] for w in n] == [w["mlp"] for w in b["widths"]]


def test_joint_widths_run_end_to_end_and_the_checkpoint_loads(tmp_path, data_dir, monkeypatch, stories_dir):
    from optprune.cli import main
    from optprune.llm_adapters.surgery import layer_widths, load_shrunk
    _fixed_time_model(monkeypatch)
    out = tmp_path / "j"
    rc = main(["-q", "prune", "--model", str(stories_dir), "--method", "spap", "--structure", "mlp,heads",
               "--speedup", "1.4", "--allocation", "alpha", "--nsamples", "8", "--seqlen", "32", "--no-kl",
               "--eval-windows", "2", "--data-dir", str(data_dir), "--output", str(out)])
    assert rc == 0
    rec = json.loads((out / "run.json").read_text())
    b = rec["speed_budget"]
    assert {c["allocation"] for c in b["candidates"]} == {"uniform", "alpha"}
    assert all("removed_energy" in c for c in b["candidates"])
    assert b["chosen"] == min(b["candidates"], key=lambda c: c["removed_energy"])["allocation"]
    assert b["modelled_speedup"] >= 1.4 and rec["speed"]["speedup"] > 0
    model = load_shrunk(str(out))
    got = layer_widths(model)
    assert [w["mlp"] for w in got] == [w["mlp"] for w in b["widths"]]
    assert [w["heads"] for w in got] == [w["heads"] for w in b["widths"]]
    # the model's own modelled time of what was saved meets the budget
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("kind", ["mlp", "heads", "heads:kv"])
def test_width_time_curve_times_the_shrunk_submodule_and_leaves_the_model(kind, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    from optprune.llm_adapters.architectures import get_arch
    monkeypatch.setenv("OPTPRUNE_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arch = get_arch(model)
    c = latency.width_time_curve(model, arch, kind, batch=2, seqlen=16, fractions=(1.0, 0.5, 0.1), repeats=2)
    groups = {"mlp": 48, "heads": 4, "heads:kv": 2}[kind]
    assert c["width"] == groups and not c["cached"] and c["block_s"] > c["points"][0][1] > 0
    assert [f for f, _ in c["points"]] == [1.0, round(0.5 * groups) / groups, max(1, round(0.1 * groups)) / groups]  # whole groups
    assert all(t > 0 for _, t in c["points"])
    assert latency.width_time_curve(model, arch, kind, batch=2, seqlen=16, fractions=(1.0, 0.5, 0.1))["cached"]
    assert model.config.num_hidden_layers == 3 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_noisy_curve_is_read_non_decreasing_in_the_width():
    # measured under interference: the 0.1 point slower than the 0.25 one, the 0.5 one slower than 0.75
    c = {"points": [(1.0, 1.0), (0.75, 0.6), (0.5, 0.7), (0.25, 0.2), (0.1, 0.4)], "block_s": 2.0}
    assert widths._points(c) == [(0.1, 0.2), (0.25, 0.2), (0.5, 0.6), (0.75, 0.6), (1.0, 1.0)]
