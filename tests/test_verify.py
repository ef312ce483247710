"""The cross-check harness: ``optprune verify --quick`` once, then the assertions on its rows.

The run takes ~10–25 s on a shared 2-core machine (it is the project's core acceptance check).
"""
import contextlib
import io
import json
import math

import pytest
import torch

from optprune.cli import main
from optprune.formulations import LayerProblem, NM, Unstructured
from optprune.formulations.programs import l0_program, l1_program
from optprune.solvers import get_backend
from optprune.solvers.verify import (CONVEX_RTOL, EXACT_RTOL, Instance, _Runner, format_table, register_l1_solver,
                                     L1_SOLVERS, _run_l1)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "verify.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["verify", "--quick", "--output", str(out)])
    data = json.loads(out.read_text())
    return rc, buf.getvalue(), data


def groups(rows):
    g = {}
    for r in rows:
        g.setdefault((r["instance"], r["model"]), []).append(r)
    return g


def test_cli_prints_the_table_and_passes(quick):
    rc, text, data = quick
    assert rc == 0, text[-2000:]
    header = next(line for line in text.splitlines() if line.startswith("instance "))
    for col in ("instance", "model", "backend", "objective", "rel.gap", "feas", "proven", "time_s", "check"):
        assert col in header
    assert not [r for r in data["rows"] if str(r["check"]).startswith("FAIL")]
    assert data["quick"] and data["wall_s"] > 0
    models = {r["model"].split(" ")[0] + " " + r["model"].split(" ")[1] for r in data["rows"]}
    assert {"refit QP", "l1 model", "L0 MIQP", "mask LP"} <= models


def test_instances_cover_the_kinds_and_a_real_layer(quick):
    _, text, data = quick
    inputs = {r["inputs"] for r in data["rows"]}
    for kind in ("random", "correlated", "outliers", "dead"):
        assert any(kind in i for i in inputs)
    assert any("error-corrected" in i for i in inputs)
    if "stories260K slices skipped" in text:
        pytest.skip("stories260K or safetensors not available: " + text.split("stories260K slices skipped")[1][:80])
    assert any(r["instance"].startswith("stories") for r in data["rows"])
    assert any(i.startswith("real") or "random token" in i for i in inputs if "block-0" in i)


def test_convex_models_agree_to_1e6(quick):
    _, _, data = quick
    n = 0
    for (inst, model), rows in groups(data["rows"]).items():
        if not (model.startswith("refit") or model.startswith("l1")):
            continue
        vals = [r["objective"] for r in rows if r["status"] not in ("skipped", "error")
                and (r["proven_optimal"] or r["role"] == "torch")]
        assert len(vals) >= 2, (inst, model)  # at least a reference and the torch side / a second solver
        ref = min(vals)
        for v in vals:
            assert abs(v - ref) <= CONVEX_RTOL * max(abs(ref), 1e-12), (inst, model, vals)
        n += 1
        if model.startswith("refit"):
            assert any(r["backend"] == "torch refit" for r in rows)
            assert any(r["backend"].startswith("cvxpy") and r["proven_optimal"] for r in rows)
    assert n >= 8


def test_exact_miqp_optima_equal_enumeration_and_heuristics_never_beat_them(quick):
    _, _, data = quick
    proven_solvers = set()
    for (inst, model), rows in groups(data["rows"]).items():
        if not model.startswith("L0"):
            continue
        ref = [r for r in rows if r["backend"] == "enumerate"]
        assert ref and ref[0]["proven_optimal"], (inst, model)
        opt = ref[0]["objective"]
        for r in rows:
            if r["status"] in ("skipped",) or not math.isfinite(r["objective"]):
                continue
            if r["backend"] in ("gurobi", "scip") and r["proven_optimal"]:
                assert abs(r["objective"] - opt) <= EXACT_RTOL * abs(opt), (inst, model, r)
                proven_solvers.add(r["backend"])
            assert r["feasible"], (inst, model, r["backend"])
            assert r["objective"] >= opt * (1 - 1e-9), (inst, model, r["backend"])  # never beats the optimum
            if r.get("refit_before") is not None:  # the refit never increases the error of its mask
                assert r["objective"] <= r["refit_before"] * (1 + 1e-12) + 1e-12
        names = {r["backend"] for r in rows}
        if "2:4" in model or "unstructured" in model:
            assert {"magnitude", "wanda", "sparsegpt"} <= names
    if get_backend("gurobi").available():
        assert "gurobi" in proven_solvers
    if get_backend("scip").available():
        assert "scip" in proven_solvers


def test_mask_programs_agree(quick):
    _, _, data = quick
    seen = 0
    for (inst, model), rows in groups(data["rows"]).items():
        if not model.startswith("mask"):
            continue
        opt = next(r["objective"] for r in rows if r["backend"] == "enumerate")
        for r in rows:
            if r["proven_optimal"] or r["backend"] == "torch projection" and r["status"] != "skipped":
                assert abs(r["objective"] - opt) <= 1e-9 * abs(opt), (inst, model, r)
        seen += 1
    assert seen >= 4


def test_skipped_rows_carry_a_reason(quick):
    _, _, data = quick
    for r in data["rows"]:
        if r["check"] == "skipped":
            assert r["note"], r
    from optprune.solvers.ref_gurobi import gurobi_size_limited
    gb = get_backend("gurobi")
    if gb.available() and gurobi_size_limited():
        lic = [r for r in data["rows"] if r["backend"] == "gurobi" and r["check"] == "skipped"]
        assert all("size-limited" in r["note"] and "cvxpy" in r["note"] for r in lic)
        # the quick set's only instance above the pip licence's limits is the real stories260K layer (64×64 refit)
        if any(str(r.get("instance", "")).startswith("stories") for r in data["rows"]):
            assert lic


def test_gurobi_absent_rows_are_skipped_with_reason():
    p = LayerProblem.random(3, 4, seed=0)
    inst = Instance("tiny", p, "synthetic")
    R = _Runner(gurobi=False, time_limit=5, quick=True)
    row = R.solve(inst, "L0", "gurobi", l0_program(p, Unstructured(0.5)))
    assert row["status"] == "skipped" and "disabled" in row["note"]


def test_l1_extension_point_picks_up_registered_torch_solvers():
    p = LayerProblem.random(3, 8, seed=1)
    calls = []

    def from_cvxpy(problem, lam):  # a stand-in torch solver: the reference solution itself
        calls.append(lam)
        return get_backend("cvxpy").solve(l1_program(problem, lam)).W

    def wrong(problem, lam):
        return problem.W0  # not the ℓ1 minimiser: must be flagged
    if not get_backend("cvxpy").available():
        pytest.skip("cvxpy not installed")
    register_l1_solver("test-stand-in")(from_cvxpy)
    register_l1_solver("test-wrong")(wrong)
    try:
        R = _Runner(gurobi=False, time_limit=5, quick=True)
        _run_l1(R, Instance("tiny", p, "synthetic"))
    finally:
        L1_SOLVERS.pop("test-stand-in")
        L1_SOLVERS.pop("test-wrong")
    rows = {r["backend"]: r for r in R.rows}
    assert calls and rows["test-stand-in (torch)"]["check"] == "ok"
    assert rows["test-wrong (torch)"]["check"].startswith("FAIL")
    if "fista (torch)" in rows:  # the FISTA method's pure solver is found through the method registry
        assert rows["fista (torch)"]["check"] == "ok"
    assert "test-wrong" in format_table(R.rows)
