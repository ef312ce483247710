"""The cross-check harness (docs/methods.md §6): every program, every production solver, every reference backend.

``verify()`` / ``optprune verify`` draws many small instances and, on each, solves every **program** with every
**reference backend** that can take it and with every **production solver** of it, then judges them all by the
program's own ``evaluate``/``check``:

* **Programs come from the registry.** Each pattern kind some registered method accepts gives an L0
  mask-and-weights MIQP (``l0_program``; every method accepting the kind is a production heuristic of it);
  each method's declared ``program`` builder gives its own program (FISTA's ℓ1 model, EGGS' expander mask
  program, the refit QP, ...), for its default options and for every option set it lists in
  ``verify_options`` (EGGS ``mask=error``: the mask-only MIQP, kept weights fixed at W0, of which the method
  is a heuristic, held to "never below the optimum"); the pattern's torch projection is the production solver of the plain N:M and
  expander mask programs; the allocation QPs (alpha/OWL/uniform) are solved by water-filling. A method
  registered tomorrow is verified without touching this file.
* **Backends are selected by capability, never by name.** Every registered, available backend whose
  ``supports(program)`` accepts the program (kinds, exact integer / convex / network-flow abilities, pattern
  kinds, size limits — :class:`~.base.Capabilities`) solves it; a full run adds each backend's declared
  ``variants`` (e.g. other convex solvers behind cvxpy). A new backend module is verified as soon as it is
  registered.
* **Statuses are honest.** A reference result keeps its status: ``optimal`` (proven), ``time_limit`` /
  ``node_limit`` (with the solver's bound and gap), ``infeasible``, ``fractional`` (an LP relaxation that was not
  integral: a bound only), ``error``. Only proven optima are references; a limit-stopped result is never
  "ok" — it is checked for validity (its value never below the optimum, its bound never above) and counted
  apart.

Checks per (instance, program), against the best proven optimum ``opt``:

* proven references: ``|obj − opt| ≤ 1e-6·|opt|`` (or the reference's own tolerance, if looser);
* **a proof holds to the tolerances its backend ran with**: each backend reports in its result the relative
  gap ``gap_tol`` it stops at (Gurobi's ``MIPGap``, SCIP's ``limits/gap``, 0 for enumeration), an absolute
  tolerance ``abs_tol`` and its feasibility tolerance ``feas_tol``; a proven optimum ``f_r`` claims that no
  feasible point lies below ``f_r − (gap_tol + feas_tol + ρ)·|f_r| − abs_tol``, where ``ρ`` is the float64
  round-off of evaluating the program (1e-9 relative, or 1e-15·κ(Ĥ) on ill-conditioned layers). A feasible
  point below that line contradicts the proof and fails; one above it is no evidence against it;
* production solvers that claim to solve their program (convex solvers, exact mask solvers, allocation):
  the same tolerance; heuristics (every method on the L0 program, each also followed by the exact
  least-squares refit on its mask, ``<method>+refit``): feasible and never below any proven optimum's claim,
  and the refit never above the method's own weights;
* limit-stopped or relaxed results: value ≥ opt and bound ≤ opt (validity), status reported, never "ok".

Instance families (cycled): random well-conditioned Gaussian inputs (half with error-corrected X̂),
ill-conditioned (correlated inputs, outlier features, a log-spaced spectrum with κ = 1e4), low-rank inputs
(rank n/4 plus 1e-3 noise, some dead inputs), and slices (random rows × columns) of real layers —
stories260K's q/k/v projections with their block-0 inputs when ``$OPTPRUNE_MODEL_DIR`` (or ``model_dir``) holds
``stories260K``, otherwise a synthetic LLM-like layer (heavy-tailed weights, outlier features) and a note says
so. The full run draws 100 instances per program, and further ones (up to 150) for a program whose reference
solves were stopped by a limit, until every (program, production solver, reference) pair has 100 proven ones;
``quick=True`` draws 4 (one per family) and stays under a minute.

Output: a table per pair (instances, limit-stopped, failures, max |gap|, max relative gap, mean times), the
rows and pairs as JSON (``output``), and next to it ``<stem>_gaps.png``: the relative-gap distributions of
the heuristics per program.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..formulations.grid import Quantized
from ..formulations.patterns import NM, ColumnGroups, ExpanderNM, Pattern, Unstructured, pattern_kinds
from ..formulations.problem import LayerProblem
from ..formulations.programs import Program, l0_program, l1_program, mask_program
from .base import LicenseLimitError, SolverUnavailable
from .registry import _METHODS, get_backend, list_backends, list_methods

__all__ = ["verify", "register_l1_solver", "L1_SOLVERS", "VerificationError", "build_cases", "Case",
           "CONVEX_RTOL", "EXACT_RTOL", "FAMILIES", "select_backends", "format_pairs", "pair_stats"]

CONVEX_RTOL = 1e-6   # convex models: relative objective agreement
EXACT_RTOL = 1e-6    # exact combinatorial models: same optimum (relative)
NEVER_BEAT = 1e-9    # float64 round-off of evaluating a program (relative), the least of the slack ρ below
FAMILIES = ("random", "ill-conditioned", "low-rank", "real-slice")
FULL_INSTANCES = 100
QUICK_INSTANCES = len(FAMILIES)

#: torch solvers of the ℓ1 model: name -> fn(problem, lam) -> W (the ℓ1 minimiser, not rounded)
L1_SOLVERS: dict[str, Callable] = {}

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
    from ..formulations.patterns import pattern_class
    return pattern_class(kind).parse(kind, 0.5)


def register_l1_solver(name: str):
    """Register a torch solver of FISTAPruner's convex ℓ1 model for the cross-check (decorator)."""
    def deco(fn):
        L1_SOLVERS[name] = fn
        return fn
    return deco


class VerificationError(RuntimeError):
    """Some cross-check failed (``optprune verify`` exits non-zero)."""


# ------------------------------------------------------------------------------------------------ instances
def _model_dir(model_dir=None) -> Optional[Path]:
    d = model_dir or os.environ.get("OPTPRUNE_MODEL_DIR")
    return Path(d) if d else None


def _data_dir(data_dir=None) -> Optional[Path]:
    d = data_dir or os.environ.get("OPTPRUNE_DATA_DIR")
    return Path(d) if d else None


def _stories_layers(model_dir: Optional[Path], data_dir: Optional[Path], seed: int, ntok: int = 512):
    """Block-0 q/k/v of stories260K with their exact inputs RMSNorm(embed(tokens))·input_layernorm, as
    ``(list of (name, W), X, how)``. Tokens: the TinyStories sample through the model's tokenizer when both are
    there, otherwise seeded random ids. Never imports transformers."""
    if model_dir is None:
        raise FileNotFoundError("no model directory ($OPTPRUNE_MODEL_DIR unset)")
    from safetensors.torch import load_file
    d = model_dir / "stories260K"
    st = load_file(str(d / "model.safetensors"))
    emb = st["model.embed_tokens.weight"].to(torch.float64)
    ids, how = None, None
    tok_file = d / "tokenizer.json"
    text_file = None if data_dir is None else data_dir / "tinystories" / "tinystories_sample.txt"
    if tok_file.exists() and text_file is not None and text_file.exists():
        try:
            from tokenizers import Tokenizer
            ids = Tokenizer.from_file(str(tok_file)).encode(text_file.read_text()).ids[:ntok]
            how = f"stories260K block-0 inputs of {len(ids)} TinyStories tokens"
        except ImportError:
            ids = None
    if ids is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, emb.shape[0], (ntok,), generator=g).tolist()
        how = f"stories260K block-0 inputs of {ntok} random token ids"
    x = emb[torch.tensor(ids)]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * st["model.layers.0.input_layernorm.weight"].double()
    layers = [(f"stories260K.layers.0.self_attn.{k}_proj", st[f"model.layers.0.self_attn.{k}_proj.weight"].double())
              for k in ("q", "k", "v")]
    return layers, x, how


class InstanceFactory:
    """Draws the k-th instance of a given shape: family ``FAMILIES[k % 4]``, seeded by (seed, k, shape)."""

    def __init__(self, seed: int = 0, model_dir=None, data_dir=None):
        self.seed = seed
        self.notes: list[str] = []
        self._real = None
        try:
            self._real = _stories_layers(_model_dir(model_dir), _data_dir(data_dir), seed)
        except (ImportError, FileNotFoundError, OSError, KeyError) as e:
            self.notes.append(f"real-slice family: stories260K not available ({type(e).__name__}: {e}); "
                              "using a synthetic LLM-like layer (heavy-tailed weights, outlier input features)")

    def _gen(self, k: int, m: int, n: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + k * 7919 + m * 131 + n)

    def problem(self, k: int, m: int, n: int) -> tuple[LayerProblem, str, str]:
        """``(problem, family, description)``."""
        fam = FAMILIES[k % len(FAMILIES)]
        g = self._gen(k, m, n)
        s = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        f64 = torch.float64
        if fam == "random":
            corr = (k // len(FAMILIES)) % 2 == 1
            p = LayerProblem.random(m, n, kind="random", corrected=corr, seed=s)
            return p, fam, "Gaussian inputs" + (", error-corrected X̂" if corr else "")
        if fam == "ill-conditioned":
            sub = (k // len(FAMILIES)) % 3
            if sub == 0:
                return LayerProblem.random(m, n, kind="correlated", corrected=True, seed=s), fam, \
                    "correlated inputs (rank n/4 + 5% noise), error-corrected X̂"
            if sub == 1:
                return LayerProblem.random(m, n, kind="outliers", seed=s), fam, "outlier input features (20×)"
            from .fista import ill_conditioned_problem
            return ill_conditioned_problem(m, n, 1e4, seed=s, scale=10.0), fam, "Gram spectrum log-spaced, κ = 1e4"
        if fam == "low-rank":
            r = max(1, n // 4)
            N = max(4 * n, 64)
            X = torch.randn(N, r, generator=g, dtype=f64) @ torch.randn(r, n, generator=g, dtype=f64)
            X += 1e-3 * torch.randn(N, n, generator=g, dtype=f64)
            if k % 2:
                X[:, int(torch.randint(0, n, (1,), generator=g))] = 0.0
            W0 = torch.randn(m, n, generator=g, dtype=f64)
            return (LayerProblem.from_activations(W0, X, dtype=f64, name=f"low-rank-{m}x{n}"), fam,
                    f"rank-{r} inputs + 1e-3 noise" + (", one dead input" if k % 2 else ""))
        # real slices
        if self._real is not None:
            layers, X, how = self._real
            name, W = layers[(k // len(FAMILIES)) % len(layers)]
            rows = torch.randperm(W.shape[0], generator=g)[:m]
            cols = torch.randperm(W.shape[1], generator=g)[:n]
            p = LayerProblem.from_activations(W[rows][:, cols], X[:, cols], dtype=f64, name=f"{name}[slice]")
            return p, fam, f"{name} rows {rows.tolist()} × cols {cols.tolist()}; {how}"
        W0 = 0.05 * torch.randn(m, n, generator=g, dtype=f64) * torch.exp(torch.randn(m, n, generator=g, dtype=f64))
        N = max(4 * n, 64)
        X = torch.randn(N, n, generator=g, dtype=f64)
        X[:, torch.randperm(n, generator=g)[: max(1, n // 8)]] *= 30.0
        return (LayerProblem.from_activations(W0, X, dtype=f64, name=f"llm-like-{m}x{n}"), fam,
                "synthetic LLM-like layer (log-normal-scaled weights, outlier features)")


# ------------------------------------------------------------------------------------------------ cases
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


def _l1_lambda(p: LayerProblem) -> float:
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


def _l1_solvers_of(spec) -> Optional[Callable]:
    fn = getattr(spec.fn, "l1_solver", None) or getattr(sys.modules.get(spec.fn.__module__), f"{spec.name}_l1", None)
    return fn if callable(fn) else None


def _l1_producer(name, fn, p, lam) -> Producer:
    def run():
        W = fn(p, lam)
        return {"W": torch.as_tensor(getattr(W, "W", W)).to(torch.float64)}
    return Producer(name, run, True)


def build_cases(k: int, factory: InstanceFactory, quick: bool = False) -> list[Case]:
    """Every program of instance index ``k``, each with its production solvers (``quick``: smaller grid
    instances)."""
    from .baselines import wanda
    cases: list[Case] = []
    names = list_methods()
    kinds = sorted({kd for n_ in names for kd in _METHODS[n_].patterns} & set(pattern_kinds()))
    # ---- L0 MIQP per pattern kind (built-in or plug-in); every method accepting the kind is a heuristic of it
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
        for n_ in names:
            spec = _METHODS[n_]
            if kd not in spec.patterns or n_ == "refit":
                continue
            opts = {}
            if kd == "grid" and spec.program is None:
                # grid programs fix the scales: a method that optimises them (declaring no program) is verified
                # with the options under which it keeps them (``fn.fixed_scale_options``), or not at all
                opts = getattr(spec.fn, "fixed_scale_options", None)
                if opts is None:
                    continue
            c.producers.append(_method_producer(n_, spec, p, pat, prog, False, **opts))
        cases.append(c)
    # ---- the programs methods declare (other than the L0 MIQP above)
    p, fam, how = factory.problem(k, *CONVEX_SHAPE)
    inst = f"#{k} {fam} {CONVEX_SHAPE[0]}x{CONVEX_SHAPE[1]}"
    mask = wanda(p, Unstructured(0.5)).mask.to(torch.bool)
    seen = set()
    for n_ in names:
        spec = _METHODS[n_]
        if spec.program is None:
            continue
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
            if prog is None or (prog.kind == "MIQP" and not prog.meta.get("fixed_weights")):
                continue  # the L0 program: covered above
            key = (n_, prog.name, prog.kind, getattr(prog.pattern, "name", None))
            if key in seen:
                continue
            seen.add(key)
            if prog.kind == "L1":
                lam = _l1_lambda(p)
                prog = l1_program(p, lam)  # the λ of the cross-check (FISTA's own λ is a search)
                fn = _l1_solvers_of(spec)
                c = Case(f"l1 ({n_})", "convex", inst, fam, how, prog)
                if fn is not None:
                    c.producers.append(_l1_producer(n_, fn, p, lam))
                for ln, lf in L1_SOLVERS.items():
                    c.producers.append(_l1_producer(ln, lf, p, lam))
            else:
                label = prog.pattern.name if prog.pattern is not None else prog.name
                shown = "".join(f" {k}={v}" for k, v in vopts.items())
                c = Case(f"{prog.kind} {label} ({n_}{shown})",
                         "convex" if prog.kind in ("QP", "L1", "LP") else "exact", inst, fam, how, prog)
                # a method is exact for the convex and mask programs it declares, a heuristic of a MIQP
                c.producers.append(_method_producer(n_, spec, p, pat, prog, prog.kind != "MIQP", **opts))
            cases.append(c)
    if L1_SOLVERS and not any(c.program.kind == "L1" for c in cases):  # ℓ1 solvers registered without a method
        lam = _l1_lambda(p)
        c = Case("l1", "convex", inst, fam, how, l1_program(p, lam))
        c.producers += [_l1_producer(ln, lf, p, lam) for ln, lf in L1_SOLVERS.items()]
        cases.append(c)
    # ---- mask programs of the patterns' torch projections (Wanda scores)
    from .baselines import wanda_scores
    S = wanda_scores(p).to(torch.float64)
    for pat in (NM(2, 4), ExpanderNM(2, 4, 1)):
        try:
            prog = mask_program(S, pat)
        except ValueError:
            continue
        c = Case(f"mask {pat.name} (projection)", "exact", inst, fam, how, prog)
        c.producers.append(Producer("projection", lambda pat=pat: {"z": pat.project(S).to(torch.float64)}, True))
        cases.append(c)
    # ---- allocation QPs (water-filling)
    cases.append(_allocation_case(k, factory))
    # ---- depth knapsacks (dynamic programme): chain interactions (exact) and all pairs (heuristic)
    cases += [_depth_case(k, factory, chain=True), _depth_case(k, factory, chain=False)]
    return cases


def _allocation_case(k: int, factory: InstanceFactory) -> Case:
    from ..formulations.allocation import alpha_program, owl_program, uniform_program
    from .allocation import solve_allocation
    g = factory._gen(k, 1, 1)
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
    from ..formulations.depth import depth_program
    from .depth import solve_depth
    g = factory._gen(k, 3 if chain else 5, 7)
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


# ------------------------------------------------------------------------------------------------ backends
def select_backends(program: Program, *, quick: bool = False, include=None, exclude=()) -> tuple[list, list]:
    """The reference solves a program gets, by capability: ``([(label, backend, options)], [(name, reason)])``
    over every registered backend (``include``/``exclude``: optional name filters from the caller)."""
    chosen, refused = [], []
    for name in list_backends():
        if name in exclude or (include is not None and name not in include):
            continue
        b = get_backend(name)
        if not b.available():
            refused.append((name, "package not installed"))
            continue
        ok, why = b.supports(program)
        if not ok:
            refused.append((name, why))
            continue
        chosen.append((name, b, {}))
        if not quick:
            for label, opts, kinds in getattr(b.capabilities, "variants", ()) or ():
                if program.kind in kinds:
                    chosen.append((f"{name}-{label}", b, dict(opts)))
    return chosen, refused


class _Runner:
    def __init__(self, time_limit, quick, threads=None, include=None, exclude=()):
        self.rows: list[dict] = []
        self.time_limit = time_limit
        self.quick = quick
        self.threads = threads
        self.include, self.exclude = include, exclude
        self.refused: dict = {}

    def row(self, case: Case, solver: str, role: str, **kw) -> dict:
        r = {"program": case.key, "kind": case.program.kind, "instance": case.instance, "family": case.family,
             "inputs": case.inputs, "solver": solver, "role": role, "status": "", "proven_optimal": False,
             "objective": float("nan"), "bound": None, "solver_gap": None, "feasible": None, "time_s": None,
             "gap": float("nan"), "abs_gap": float("nan"), "check": "", "note": ""}
        r.update(kw)
        self.rows.append(r)
        return r

    def run_case(self, case: Case) -> list[dict]:
        start = len(self.rows)
        prog = case.program
        refs, refused = select_backends(prog, quick=self.quick, include=self.include, exclude=self.exclude)
        for name, why in refused:
            self.refused.setdefault((case.key, name), why)
        for label, b, opts in refs:
            o = dict(opts)
            if self.time_limit is not None:
                o.setdefault("time_limit", self.time_limit)
            if self.threads:
                o.setdefault("threads", self.threads)
            t0 = time.perf_counter()
            try:
                r = b.solve(prog, **o)
            except (LicenseLimitError, SolverUnavailable) as e:
                self.refused.setdefault((case.key, label), str(e))
                continue
            except Exception as e:  # a backend crash is a failed row, not a crashed harness
                self.row(case, label, "reference", status="error", time_s=time.perf_counter() - t0,
                         note=f"{type(e).__name__}: {str(e)[:120]}", check="FAIL: backend error")
                continue
            status = r.status
            if r.proven_optimal:
                status = "optimal"
            elif status == "optimal":  # 'optimal' from a solver that does not claim proof (e.g. inaccurate)
                status = "unproven"
            feas = program_feasible(prog, r.values) if r.values else None
            note = "; ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in r.info.items() if k in ("bigm_max_ratio", "max_fractionality"))
            rows_ = prog.problem.m if prog.problem is not None else 1
            self.row(case, label if label != "cvxpy" else r.solver, "reference", status=status,
                     atol=float(getattr(b.capabilities, "objective_atol", 0.0) or 0.0) * rows_ + float(r.abs_tol),
                     gap_tol=float(r.gap_tol), feas_tol=float(r.feas_tol),
                     proven_optimal=bool(r.proven_optimal), objective=r.objective if r.values else float("nan"),
                     bound=r.bound, solver_gap=r.gap, feasible=feas, time_s=r.time, note=note)
        for pr in case.producers:
            t0 = time.perf_counter()
            try:
                vals = pr.run()
            except ValueError as e:  # the method refuses this shape/pattern (PatternError): not a failure
                self.row(case, pr.name, "exact" if pr.exact else "heuristic", status="skipped",
                         time_s=time.perf_counter() - t0, note=f"{type(e).__name__}: {str(e)[:100]}", check="skipped")
                continue
            except Exception as e:
                self.row(case, pr.name, "exact" if pr.exact else "heuristic", status="error",
                         time_s=time.perf_counter() - t0, note=f"{type(e).__name__}: {str(e)[:100]}",
                         check="FAIL: solver error")
                continue
            dt = time.perf_counter() - t0
            mask = vals.pop("_mask", None)
            obj = prog.evaluate(vals)
            self.row(case, pr.name, "exact" if pr.exact else "heuristic", status="solved",
                     objective=obj, feasible=program_feasible(prog, vals), time_s=dt)
            if not pr.exact and mask is not None and "W" in vals and prog.problem is not None \
                    and not prog.meta.get("fixed_weights") and prog.meta.get("quantizer") is None:
                # the exact least-squares refit on the heuristic's mask: never worse than the heuristic's weights
                from .baselines import refit_weights
                t0 = time.perf_counter()
                rv = dict(vals, W=refit_weights(prog.problem.to(torch.float64), mask) * mask)
                self.row(case, f"{pr.name}+refit", "heuristic", status="solved", objective=prog.evaluate(rv),
                         feasible=program_feasible(prog, rv), time_s=time.perf_counter() - t0, refit_before=obj)
        rows = self.rows[start:]
        judge(rows, case.kind, prog.problem.constant() if prog.problem is not None else None,
              _roundoff_slack(prog))
        return rows


def program_feasible(prog: Program, vals: dict) -> bool:
    return bool(prog.check(vals)["feasible"])


def _roundoff_slack(program: Program) -> float:
    """How far two float64 evaluations of one program may differ by round-off (ρ): ``NEVER_BEAT``, or ``1e-15·κ(Ĥ)``
    on live inputs for ill-conditioned layers (two exact refits of one support differ by ~ε·κ; measured on
    low-rank 2×8 instances: 2e-9)."""
    p = program.problem
    if p is None or program.kind not in ("MIQP", "QP"):
        return NEVER_BEAT
    d = p.Hh.to(torch.float64).diagonal()
    live = d > 0
    if not bool(live.any()):
        return NEVER_BEAT
    e = torch.linalg.eigvalsh(p.Hh.to(torch.float64)[live][:, live])
    kappa = float(e.max() / e.min()) if float(e.min()) > 0 else math.inf
    return max(NEVER_BEAT, min(1e-15 * kappa, 1e-6))


def judge(rows: list[dict], kind: str, f0: Optional[float] = None, slack: float = NEVER_BEAT) -> Optional[float]:
    """Gaps to the best proven optimum and the verdicts of one (instance, program) group; returns the optimum.
    ``slack``: the round-off ρ of evaluating the program (relative). Each proven reference row's ``gap_tol``,
    ``feas_tol`` and ``atol`` (its backend's reported tolerances) bound what its proof claims (module doc)."""
    tol = CONVEX_RTOL if kind == "convex" else EXACT_RTOL
    proofs = [r for r in rows if r["role"] == "reference" and r["proven_optimal"]
              and r["feasible"] is not False and math.isfinite(r["objective"])]
    proven = [r["objective"] for r in proofs]
    cands = list(proven)
    if kind == "convex":  # a production convex solver may be more accurate than an interior-point reference
        cands += [r["objective"] for r in rows if r["role"] == "exact" and r["feasible"]
                  and math.isfinite(r["objective"])]
    opt = min(cands) if proven else None
    # convex programs: relative to max(|opt|, 1e-3·f(0)) — an optimum far below the scale of the objective's
    # constant part (a nearly-feasible target) is only as accurate as that constant allows
    floor = 1e-3 * float(f0) if (kind == "convex" and f0) else 0.0

    def claim_tol(ref) -> float:  # relative tolerance of a proof, beside its absolute one (``atol``)
        return float(ref.get("gap_tol") or 0.0) + float(ref.get("feas_tol") or 0.0)

    def disagrees(ref) -> bool:  # a proof off the optimum by more than its tolerance (judged FAIL below)
        return abs(ref["objective"] - opt) > max(tol, claim_tol(ref)) * max(abs(opt), floor, 1e-12) + \
            (ref.get("atol") or 0.0)

    def contradicted(r) -> Optional[str]:
        """The proof a feasible value contradicts: the value lies below what a proven optimum (one that agrees
        with the others) claims."""
        own = r.get("atol") or 0.0  # a limit-stopped reference's own objective accuracy
        for ref in proofs:
            if disagrees(ref):
                continue
            if ref is r:
                continue
            s = max(abs(ref["objective"]), floor, 1e-12)
            line = ref["objective"] - (claim_tol(ref) + slack) * s - (ref.get("atol") or 0.0)
            if r["objective"] + own < line:
                return (f"beats the proven optimum of {ref['solver']} by {(ref['objective'] - r['objective']) / s:.1e}"
                        f" (its tolerance {claim_tol(ref) + slack:.0e})")
        return None

    for r in rows:
        r["roundoff"] = slack  # recorded: a reader can re-check every verdict from the rows alone
        if r["check"]:  # error / skipped already judged
            continue
        if opt is None:
            r["check"] = "no reference"
            continue
        if not math.isfinite(r["objective"]):
            r["check"] = f"{r['status']} (no solution)" if r["role"] == "reference" else "FAIL: no solution"
            if r["role"] == "reference" and r["status"] in ("optimal",):
                r["check"] = "FAIL: optimal without a solution"
            continue
        r["abs_gap"] = r["objective"] - opt
        r["gap"] = r["abs_gap"] / max(abs(opt), 1e-12)
        scale = max(abs(opt), floor, 1e-12)
        fails = []
        if r["feasible"] is False:
            fails.append("infeasible")
        if r["role"] == "reference" and not r["proven_optimal"]:
            # limit-stopped or relaxed: never "ok"; its value and bound must still be valid
            why = contradicted(r) if r["feasible"] else None
            if why:
                fails.append(f"feasible value {why}")
            if r["bound"] is not None and math.isfinite(r["bound"]) and \
                    (r["bound"] - opt) / scale > max(tol, 1e-9):
                fails.append(f"bound {r['bound']:.6g} above the optimum {opt:.6g}")
            r["check"] = ("FAIL: " + ", ".join(fails)) if fails else r["status"] or "unproven"
            continue
        if r["role"] == "reference" and disagrees(r) or r["role"] == "exact" and \
                abs(r["abs_gap"]) > tol * scale + (r.get("atol") or 0.0):
            t = max(tol, claim_tol(r)) if r["role"] == "reference" else tol
            fails.append(f"|gap| {abs(r['gap']):.1e} > {t:g}" + (f" (+ atol {r['atol']:.0e})" if r.get("atol") else ""))
        elif r["feasible"] is not False:
            why = contradicted(r)
            if why:
                fails.append(why)
        rb = r.get("refit_before")
        if rb is not None and r["objective"] > rb * (1 + 1e-9) + 1e-12 * max(abs(opt), 1.0):
            fails.append(f"the refit increased the error ({rb:.6g} → {r['objective']:.6g})")
        r["check"] = ("FAIL: " + ", ".join(fails)) if fails else "ok"
    return opt


# ------------------------------------------------------------------------------------------------ pairs
def pair_stats(rows: list[dict]) -> list[dict]:
    """Per (program, production solver, reference backend): instances where the reference proved its optimum
    and the production solver returned a solution, the limit-stopped / failed reference solves, failures of the
    production solver, max |gap| and max relative gap (production − reference), mean times."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["program"], r["instance"]), []).append(r)
    pairs: dict = {}
    for (prog, inst), rs in groups.items():
        refs = [r for r in rs if r["role"] == "reference"]
        prods = [r for r in rs if r["role"] in ("exact", "heuristic")]
        for pr in prods:
            for rf in refs:
                key = (prog, pr["solver"], rf["solver"])
                s = pairs.setdefault(key, {"program": prog, "production": pr["solver"], "reference": rf["solver"],
                                           "role": pr["role"], "instances": 0, "ok": 0, "reference_limit": 0,
                                           "reference_other": 0, "production_fail": 0, "production_skipped": 0,
                                           "max_abs_gap": 0.0,
                                           "max_rel_gap": 0.0, "production_time_s": 0.0, "reference_time_s": 0.0,
                                           "families": {}})
                if pr["check"] == "skipped":
                    s["production_skipped"] += 1
                    continue
                if not rf["proven_optimal"]:
                    if rf["status"] in ("time_limit", "node_limit"):
                        s["reference_limit"] += 1
                    else:
                        s["reference_other"] += 1
                    continue
                if not math.isfinite(pr["objective"]) or not math.isfinite(rf["objective"]):
                    s["production_fail"] += 1
                    continue
                s["instances"] += 1
                s["families"][pr["family"]] = s["families"].get(pr["family"], 0) + 1
                a = pr["objective"] - rf["objective"]
                rel = a / max(abs(rf["objective"]), 1e-12)
                s["max_abs_gap"] = max(s["max_abs_gap"], abs(a))
                s["max_rel_gap"] = max(s["max_rel_gap"], abs(rel))
                s["production_time_s"] += pr["time_s"] or 0.0
                s["reference_time_s"] += rf["time_s"] or 0.0
                if str(pr["check"]).startswith("FAIL") or str(rf["check"]).startswith("FAIL"):
                    s["production_fail"] += 1
                else:
                    s["ok"] += 1
    out = []
    for s in pairs.values():
        n = max(s["instances"], 1)
        s["production_time_s"] /= n
        s["reference_time_s"] /= n
        out.append(s)
    return sorted(out, key=lambda s: (s["program"], s["role"], s["production"], s["reference"]))


def format_pairs(pairs: list[dict]) -> str:
    head = ["program", "production", "reference", "inst", "ok", "limit", "fail", "skip", "max|gap|", "max rel.gap",
            "prod s", "ref s"]
    table = [head]
    for s in pairs:
        table.append([s["program"], s["production"] + ("" if s["role"] == "exact" else " (h)"), s["reference"],
                      str(s["instances"]), str(s["ok"]), str(s["reference_limit"]),
                      str(s["production_fail"]), str(s["production_skipped"]), f"{s['max_abs_gap']:.2e}", f"{s['max_rel_gap']:.2e}",
                      f"{s['production_time_s']:.4f}", f"{s['reference_time_s']:.4f}"])
    w = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(t)) for t in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """The row-level table (one line per (instance, program, solver)); ``format_pairs`` is the summary."""
    cols = ["instance", "program", "solver", "role", "status", "objective", "gap", "feasible", "time_s", "check",
            "note"]
    table = [cols]
    for r in rows:
        table.append([f"{r[c]:.6g}" if isinstance(r[c], float) and c == "objective" else
                      f"{r[c]:+.1e}" if c == "gap" and isinstance(r[c], float) and math.isfinite(r[c]) else
                      f"{r[c]:.3f}" if c == "time_s" and r[c] is not None else str(r[c]) for c in cols])
    w = [max(len(t[i]) for t in table) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(t)) for t in table)


def plot_gaps(rows: list[dict], path) -> Optional[str]:
    """Box plots of the heuristics' relative gaps to the proven optimum, one panel per program."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    data: dict = {}
    for r in rows:
        if r["role"] == "heuristic" and math.isfinite(r["gap"]):
            data.setdefault(r["program"], {}).setdefault(r["solver"], []).append(max(r["gap"], 0.0) + 1e-12)
    if not data:
        return None
    progs = sorted(data)
    fig, axes = plt.subplots(1, len(progs), figsize=(3.2 * len(progs) + 1, 4), squeeze=False)
    for ax, prog in zip(axes[0], progs):
        names = sorted(data[prog])
        ax.boxplot([data[prog][n] for n in names], showfliers=True)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(prog, fontsize=9)
    axes[0][0].set_ylabel("relative gap to the proven optimum (+1e-12)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------------------ API
def verify(quick: bool = False, gurobi: Optional[bool] = None, output: Optional[str] = None, seed: int = 0,
           data_dir=None, model_dir=None, _cli: bool = False, time_limit: Optional[float] = None,
           threads: Optional[int] = 1, instances: Optional[int] = None, backends=None, programs=None,
           progress: bool = False, **_) -> list[dict]:
    """Run the cross-check; print the pair table (CLI) and return the rows (one per (instance, program, solver)).

    ``instances``: instances per program (default 100 full, 4 quick). ``backends``: only these registered
    backends (names; default all — selected per program by capability). ``programs``: only programs whose
    label contains one of these strings. ``gurobi``: None = use it where installed and licensed; True = require
    gurobipy (error if absent); False = leave it out. ``time_limit``: per reference solve (default 10 s; quick 3 s).
    ``threads``: torch and solver threads while verifying (default 1: the instances are tiny, and on a shared
    2-core machine intra-op threading made enumeration 8× slower); ``None`` keeps the current settings.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _verify(quick, gurobi, output, seed, data_dir, model_dir, _cli, time_limit, threads, instances,
                       backends, programs, progress)
    finally:
        torch.set_num_threads(old_threads)


def _check_output_file(output) -> None:
    """``--output``: a file name whose folder exists or can be made, and is writable — before the run, not after."""
    import tempfile
    if not str(output).strip():
        raise ValueError("--output is empty; name the JSON file to write (e.g. --output verify.json)")
    out = Path(str(output)).expanduser()
    if out.is_dir():
        raise ValueError(f"--output {out} is a directory; name the JSON file to write inside it")
    anc = out.resolve().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"--output {out}: {anc} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".optprune-probe-", dir=anc))
    except OSError as e:
        raise ValueError(f"--output {out}: {anc} is not writable ({e.strerror or e})") from None


def _verify(quick, gurobi, output, seed, data_dir, model_dir, _cli, time_limit, threads, instances, backends,
            programs, progress) -> list[dict]:
    t_start = time.perf_counter()
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and math.isfinite(time_limit)
                                       and time_limit > 0):
        raise ValueError(f"--time-limit must be a positive number of seconds per reference solve, got {time_limit}")
    if output is not None:
        _check_output_file(output)
    names = list_backends()
    include = None
    if backends is not None:
        include = [b.strip() for b in (backends.split(",") if isinstance(backends, str) else backends) if b.strip()]
        bad = [b for b in include if b not in names]
        if bad:
            raise ValueError(f"unknown backend(s) {bad}; registered: {', '.join(names)}")
    exclude = ()
    if gurobi:
        if not get_backend("gurobi").available():
            raise SolverUnavailable("--gurobi given but gurobipy is not installed (pip install gurobipy)")
    elif gurobi is False:
        exclude = ("gurobi", "bqp-gurobi")
    if instances is not None and int(instances) < 1:
        raise ValueError(f"instances must be ≥ 1, got {instances}")
    n_inst = int(instances) if instances is not None else (QUICK_INSTANCES if quick else FULL_INSTANCES)
    if isinstance(programs, str):
        programs = [s for s in programs.split(",") if s]
    # SCIP needs 0.4–2 s on most 2×8 L0 instances but up to ~10 s on correlated ones: the quick set caps it at
    # 3 s (a capped solve is reported as time_limit, never as ok), the full run at 10 s
    tl = time_limit if time_limit is not None else (3.0 if quick else 10.0)
    R = _Runner(tl, quick, threads, include, exclude)
    factory = InstanceFactory(seed, model_dir, data_dir)
    list_methods()  # import every method module (they may register ℓ1 solvers)
    for kd in sorted({kd for n_ in list_methods() for kd in _METHODS[n_].patterns} & set(pattern_kinds())):
        if verify_pattern(kd) is None:
            factory.notes.append(f"pattern kind {kd!r} is not verified: its class parses no pattern from the text "
                                 f"{kd!r} (make parse({kd!r}, 0.5) return an instance)")
    for k in range(n_inst):
        for case in build_cases(k, factory, quick):
            if programs and not any(s in case.key for s in programs):
                continue
            R.run_case(case)
        if progress:
            print(f"[verify] instance {k + 1}/{n_inst}: {len(R.rows)} rows, {time.perf_counter() - t_start:.0f} s",
                  file=sys.stderr, flush=True)
    # top-up: a program whose references were stopped by a limit (or returned an unproven answer, e.g. Gurobi's
    # SUBOPTIMAL, where they prove optima elsewhere) on some instances draws further instances (up to half as many
    # again) until every such (program, production, reference) pair has n_inst proven instances
    k = n_inst
    while k < n_inst + n_inst // 2:
        short = {s["program"] for s in pair_stats(R.rows)
                 if s["instances"] < n_inst and (s["reference_limit"] > 0 or (s["reference_other"] and s["instances"]))}
        if not short:
            break
        for case in build_cases(k, factory, quick):
            if case.key in short:
                R.run_case(case)
        k += 1
        if progress:
            print(f"[verify] top-up instance {k}: {', '.join(sorted(short))}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t_start
    rows = R.rows
    pairs = pair_stats(rows)
    fails = [r for r in rows if str(r["check"]).startswith("FAIL")]
    limited = [r for r in rows if r["role"] == "reference" and r["status"] in ("time_limit", "node_limit")]
    progs = sorted({r["program"] for r in rows})
    # not counted: pairs whose production solver refused every instance (EGGS on a 2-row L0 instance: its
    # expander tiles need 4 rows) and pairs whose reference never proves (OSQP, first-order): both listed
    refused_all = [s for s in pairs if s["production_skipped"] and not (s["instances"] + s["reference_limit"]
                                                                       + s["reference_other"] + s["production_fail"])]
    unproving = [s for s in pairs if s not in refused_all and s["instances"] == 0 and s["reference_limit"] == 0]
    counted = [s for s in pairs if s not in refused_all and s not in unproving]
    min_pair = min((s["instances"] for s in counted), default=0)
    summary = (f"{len(progs)} programs, {len(pairs)} (program, production, reference) pairs, {len(rows)} rows; "
               f"{len(fails)} failed checks, {len(limited)} limit-stopped reference solves; fewest proven instances "
               f"in a pair {min_pair} ({len(refused_all)} pairs refused by their production solver, {len(unproving)} "
               f"with a reference that does not prove optimality, not counted); wall {wall:.1f} s ({'quick' if quick else 'full'}, {n_inst} instances per "
               f"program, torch threads {torch.get_num_threads()})")
    refused = [{"program": k[0], "backend": k[1], "reason": v} for k, v in sorted(R.refused.items())]
    backends_info = {}
    for n_ in names:
        b = get_backend(n_)
        backends_info[n_] = dict(b.capabilities.describe(), available=b.available())
    plot = None
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot = plot_gaps(rows, out.with_name(out.stem + "_gaps.png"))
        with open(out, "w") as f:
            json.dump({"summary": summary, "quick": quick, "wall_s": wall, "instances_per_program": n_inst,
                       "programs": progs, "pairs": pairs, "backends": backends_info, "refused": refused,
                       "notes": factory.notes, "plot": plot, "rows": rows}, f, indent=1, default=str)
    if _cli:
        for n_ in factory.notes:
            print(f"note: {n_}")
        print(format_pairs(pairs))
        for r in fails[:40]:
            print(f"FAIL  {r['program']}  {r['instance']}  {r['solver']}: {r['check']} ({r['note']})")
        print(summary)
        if plot:
            print(f"gap distributions: {plot}")
    if _cli and fails:
        raise VerificationError(f"{len(fails)} cross-check(s) failed (listed above)")
    return rows
