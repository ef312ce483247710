"""Depth pruning: the knapsack program, its dynamic programme against enumeration and Gurobi, block removal
surgery that stock transformers loads, the removal-cost measurement and the depth prune run."""
import itertools

import pytest
import torch

from optprune.formulations.depth import DepthError, depth_program, is_chain
from optprune.solvers.depth import solve_depth
from optprune.solvers.ref_bqp import BQPEnumerateBackend, BQPGurobiBackend


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
    from optprune.solvers.verify import verify
    rows = verify(instances=6, programs=["depth"])
    assert {r["program"] for r in rows} == {"depth knapsack BQP (chain)", "depth knapsack BQP (all pairs)"}
    assert all(r["check"] == "ok" for r in rows)
    assert {r["solver"] for r in rows} >= {"depth-dp", "bqp-enumerate"}
