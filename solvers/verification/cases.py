"""The cases of one instance index: every program the registry declares, each with its production solvers.

* an L0 mask-and-weights program per pattern kind some method accepts (every method accepting the kind is a
  heuristic of it; grid kinds with the methods' fixed-scale options);
* each method's declared program (its default options and its ``verify_options``), with the method as its
  exact solver (convex and mask programs) or a heuristic (MIQPs); the ℓ1 program with the method's declared
  ``l1_solver``;
* the mask programs of the patterns' torch projections, the allocation QPs (water-filling) and the depth
  knapsacks (dynamic programme).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ...formulations.grid import Quantized
from ...formulations.patterns import NM, ColumnGroups, ExpanderNM, Pattern, Unstructured, pattern_class, pattern_kinds
from ...formulations.problem import LayerProblem
from ...formulations.programs import Program, l0_program, l1_program, mask_program
from ..registry import method_specs
from .instances import FAMILIES, InstanceFactory

__all__ = ["Case", "Producer", "build_cases", "verify_pattern", "l1_lambda", "CANONICAL_PATTERNS", "GRID_PATTERNS"]

#: the pattern of each kind the L0 programs are built with (sizes below are chosen so enumeration takes them)
CANONICAL_PATTERNS = {
    "unstructured": lambda: Unstructured(0.5),
    "row": lambda: Unstructured(0.5, "row"),
    "nm": lambda: NM(2, 4),
    "expander": lambda: ExpanderNM(2, 4, 1),
    "groups": lambda: ColumnGroups(2, sparsity=0.5),
    "grid": lambda: Quantized(Unstructured(0.0), "w2"),
}
#: the grid programs verified (kind ``grid``): dense 2-bit per channel, 50% unstructured with asymmetric 2-bit
#: groups of 4, 2:4 with 2-bit per channel — 4^8 values per row of a 2×8 instance, as enumeration takes them
GRID_PATTERNS = (lambda: Quantized(Unstructured(0.0), "w2"), lambda: Quantized(Unstructured(0.5), "w2g4a"),
                 lambda: Quantized(NM(2, 4), "w2"))
#: instance shape per program kind: L0 MIQPs tiny (SCIP takes 0.4–2 s on 2×8, minutes on some 4×8), expander
#: L0 one 4×4 tile (its rows are coupled), convex and mask programs 4×8
L0_SHAPE = (2, 8)
#: grid programs: 2×8 in the full run (4^8 code vectors per row), 2×4 in the quick set (SCIP needs 3–20 s on some
#: 2×8 grid instances, under 1 s on 2×4), which verifies only the first of GRID_PATTERNS
GRID_SHAPE, GRID_QUICK_SHAPE = (2, 8), (2, 4)
EXPANDER_SHAPE = (4, 4)
CONVEX_SHAPE = (4, 8)


def verify_pattern(kind: str) -> Optional[Pattern]:
    """The pattern an L0 program of ``kind`` is verified with: the canonical one above for the built-in kinds; for a
    plug-in kind, what its class parses from the kind's own name at sparsity 0.5 (``None`` when it parses
    nothing: such a kind is listed as unverifiable, not silently left out)."""
    if kind in CANONICAL_PATTERNS:
        return CANONICAL_PATTERNS[kind]()
    return pattern_class(kind).parse(kind, 0.5)


@dataclass
class Producer:
    """A production solver of a program: ``run()`` returns the program's variable values."""
    name: str
    run: Callable[[], dict]
    exact: bool  # claims to solve the program (held to the tolerance) or a heuristic (held to ≥ optimum)


@dataclass
class Case:
    key: str            # program label, e.g. "L0 2:4", "l1 (fista)", "mask 2:4 B1 (eggs)", "allocation"
    kind: str           # 'convex' | 'exact' (integer)
    instance: str
    family: str
    inputs: str
    program: Program
    producers: list = field(default_factory=list)


def l1_lambda(p: LayerProblem) -> float:
    return 0.05 * float(p.target(torch.float64).abs().max())


def _values_from_result(prog: Program, pattern: Optional[Pattern], W, mask) -> dict:
    vals = {}
    if "W" in prog.variables:
        vals["W"] = W.to(torch.float64) * mask
    if "z" in prog.variables:
        vals["z"] = mask.to(torch.float64)
    if "g" in prog.variables and hasattr(pattern, "kept_groups_of"):
        # the groups the mask uses, padded with unused ones up to the kept count
        g = pattern.kept_groups_of(mask)
        k = pattern.keep_groups(mask.shape[1])
        g[torch.nonzero(~g).reshape(-1)[: max(0, k - int(g.sum()))]] = True
        vals["g"] = g.to(torch.float64)
    return vals


def _method_producer(name, spec, p, pat, prog, exact, **opts) -> Producer:
    def run():
        res = spec(p, pat, **opts)
        vals = _values_from_result(prog, getattr(prog, "pattern", None) or pat, res.W, res.mask.to(torch.bool))
        # variables that are not the weights (the eigen-program's basis Q) come in the result's info
        vals.update({k: v for k, v in ((res.info or {}).get("values") or {}).items() if k in prog.variables})
        vals["_mask"] = res.mask.to(torch.bool)
        return vals
    return Producer(name, run, exact)


def _l1_producer(name, fn, p, lam) -> Producer:
    def run():
        W = fn(p, lam)
        return {"W": torch.as_tensor(getattr(W, "W", W)).to(torch.float64)}
    return Producer(name, run, True)


def build_cases(k: int, factory: InstanceFactory, quick: bool = False) -> list[Case]:
    """Every program of instance index ``k``, each with its production solvers (``quick``: smaller grid
    instances)."""
    specs = method_specs()
    cases = _l0_cases(k, factory, specs, quick)
    p, fam, how = factory.problem(k, *CONVEX_SHAPE)
    inst = f"#{k} {fam} {CONVEX_SHAPE[0]}x{CONVEX_SHAPE[1]}"
    cases += _declared_cases(specs, p, inst, fam, how)
    cases += _projection_cases(p, inst, fam, how)
    cases.append(_allocation_case(k, factory))
    # depth knapsacks (dynamic programme): chain interactions (exact) and all pairs (heuristic)
    cases += [_depth_case(k, factory, chain=True), _depth_case(k, factory, chain=False)]
    return cases


def _l0_cases(k: int, factory: InstanceFactory, specs: list, quick: bool) -> list[Case]:
    """The L0 program per pattern kind (built-in or plug-in); every method accepting the kind is a heuristic of
    it. Grid programs fix the scales: a method that optimises them (declaring no program) is verified with the
    options under which it keeps them (its ``fixed_scale_options``), or not at all."""
    cases = []
    kinds = sorted({kd for spec in specs for kd in spec.patterns} & set(pattern_kinds()))
    grids = GRID_PATTERNS[:1] if quick else GRID_PATTERNS  # the quick set: the dense grid program only
    for kd, pat in [(kd, q()) for kd in kinds for q in (grids if kd == "grid" else (lambda kd=kd:
                                                                                  verify_pattern(kd),))]:
        shape = EXPANDER_SHAPE if kd == "expander" else \
            (GRID_QUICK_SHAPE if quick else GRID_SHAPE) if kd == "grid" else L0_SHAPE
        p, fam, how = factory.problem(k, *shape)
        if pat is None:
            continue
        try:
            prog = l0_program(p, pat)  # a grid pattern gives the grid program
        except ValueError:
            continue
        c = Case(f"L0 {pat.name}", "exact", f"#{k} {fam} {shape[0]}x{shape[1]}", fam, how, prog)
        for spec in specs:
            if kd not in spec.patterns or spec.name == "refit":
                continue
            opts = {}
            if kd == "grid" and spec.program is None:
                opts = spec.fixed_scale_options
                if opts is None:
                    continue
            c.producers.append(_method_producer(spec.name, spec, p, pat, prog, False, **opts))
        cases.append(c)
    return cases


def _declared_programs(spec, p: LayerProblem, mask):
    """``(pattern, options, program, solver options)`` for each program ``spec`` declares on ``p`` — its default
    options and each of its ``verify_options``, on every pattern kind it accepts that fits ``p``."""
    for kd, vopts in [(kd, vo) for kd in sorted(spec.patterns & set(pattern_kinds()))
                      for vo in ({},) + tuple(spec.verify_options)]:
        pat = verify_pattern(kd)
        if pat is None:
            continue
        try:
            pat.validate(p.shape)
        except ValueError:
            continue
        opts = dict(vopts)
        try:
            prog = spec.program(p, pat, **vopts)
        except (TypeError, ValueError, AttributeError):
            try:  # builders of programs on a given support (the refit QP) take the mask
                prog, opts = spec.program(p, pat, mask=mask, **vopts), {"mask": mask, **vopts}
            except Exception:
                continue
        yield pat, vopts, prog, opts


def _declared_cases(specs: list, p: LayerProblem, inst: str, fam: str, how: str) -> list[Case]:
    """The programs methods declare (other than the L0 program): a method is exact for the convex and mask
    programs it declares, a heuristic of a MIQP or of a program marked ``meta['heuristic']``; the ℓ1 program is solved by the method's ``l1_solver``."""
    from ..methods.baselines import wanda
    mask = wanda(p, Unstructured(0.5)).mask.to(torch.bool)
    cases, seen = [], set()
    for spec in specs:
        if spec.program is None:
            continue
        for pat, vopts, prog, opts in _declared_programs(spec, p, mask):
            if prog is None or (prog.kind == "MIQP" and not prog.meta.get("fixed_weights")):
                continue  # the L0 program: covered by _l0_cases
            key = (spec.name, prog.name, prog.kind, getattr(prog.pattern, "name", None))
            if key in seen:
                continue
            seen.add(key)
            if prog.kind == "L1":
                lam = l1_lambda(p)
                c = Case(f"l1 ({spec.name})", "convex", inst, fam, how, l1_program(p, lam))  # the cross-check's λ
                if spec.l1_solver is not None:
                    c.producers.append(_l1_producer(spec.name, spec.l1_solver, p, lam))
            else:
                label = prog.pattern.name if prog.pattern is not None else prog.name
                shown = "".join(f" {k}={v}" for k, v in vopts.items())
                c = Case(f"{prog.kind} {label} ({spec.name}{shown})",
                         "convex" if prog.kind in ("QP", "L1", "LP") else "exact", inst, fam, how, prog)
                exact = prog.kind != "MIQP" and not prog.meta.get("heuristic")  # else no solver of ours is exact
                c.producers.append(_method_producer(spec.name, spec, p, pat, prog, exact, **opts))
            cases.append(c)
    return cases


def _projection_cases(p: LayerProblem, inst: str, fam: str, how: str) -> list[Case]:
    """The mask programs of the patterns' torch projections (Wanda scores): the projection is exact."""
    from ..methods.baselines import wanda_scores
    S = wanda_scores(p).to(torch.float64)
    cases = []
    for pat in (NM(2, 4), ExpanderNM(2, 4, 1)):
        try:
            prog = mask_program(S, pat)
        except ValueError:
            continue
        c = Case(f"mask {pat.name} (projection)", "exact", inst, fam, how, prog)
        c.producers.append(Producer("projection", lambda pat=pat: {"z": pat.project(S).to(torch.float64)}, True))
        cases.append(c)
    return cases


def _allocation_case(k: int, factory: InstanceFactory) -> Case:
    from ...formulations.allocation import alpha_program, owl_program, uniform_program
    from ..whole_model.allocation import solve_allocation
    g = factory.generator(k, 1, 1)
    L = int(torch.randint(6, 41, (1,), generator=g))
    sizes = torch.randint(1, 20, (L,), generator=g).double() * 1e5
    S = float(torch.empty(1).uniform_(0.3, 0.7, generator=g))
    metric = torch.rand(L, generator=g, dtype=torch.float64) * 6 + 2
    rule = ("alpha", "owl", "uniform")[k % 3]
    if rule == "alpha":
        prog = alpha_program(metric, sizes, S, eps=0.2)
    elif rule == "owl":
        prog = owl_program(metric, sizes, S)
    else:
        prog = uniform_program(sizes, S)
    c = Case("allocation QP", "convex", f"#{k} {rule} L={L}", FAMILIES[k % len(FAMILIES)],
             f"{rule} allocation of {L} units to mean sparsity {S:.3f}", prog)
    c.producers.append(Producer("water-filling", lambda: solve_allocation(prog).values, True))
    return c


def _depth_case(k: int, factory: InstanceFactory, *, chain: bool) -> Case:
    """A depth knapsack of 6–14 units: removal costs like measured ones (positive, a few large, some near
    zero), neighbour (or all-pair) interactions of either sign, savings equal (blocks of one model) or varied
    (per-unit latencies), a budget between one unit's saving and most of the total."""
    from ...formulations.depth import depth_program
    from ..whole_model.depth import solve_depth
    g = factory.generator(k, 3 if chain else 5, 7)
    n = int(torch.randint(6, 15, (1,), generator=g))
    c = torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 2.0
    equal = k % 2 == 0
    w = torch.ones(n, dtype=torch.float64) if equal else torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    b = float(torch.empty(1).uniform_(0.1, 0.7, generator=g)) * float(w.sum())
    if equal:
        b = float(max(1, round(b)))
    if chain:
        q = torch.randn(n - 1, generator=g, dtype=torch.float64) * 0.3
        prog = depth_program(c, w, b, neighbours=q)
    else:
        prog = depth_program(c, w, b, pairs=torch.randn(n, n, generator=g, dtype=torch.float64) * 0.3)
    label = "chain" if chain else "all pairs"
    c_ = Case(f"depth knapsack BQP ({label})", "exact", f"#{k} n={n} {'equal' if equal else 'varied'} savings",
              FAMILIES[k % len(FAMILIES)], f"{n} units, {label} interactions, budget {b:.3g} of {float(w.sum()):.3g}",
              prog)
    c_.producers.append(Producer("depth-dp", lambda: {"z": solve_depth(prog).z.to(torch.float64)}, chain))
    return c_
