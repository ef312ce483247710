"""Declarative models: variables, objective terms and constraints — data that backends translate.

A :class:`Program` is not solver code. Reference backends (cvxpy, Gurobi, SCIP, enumeration, flow) and the
production torch solvers read the same object; :meth:`Program.evaluate` and :meth:`Program.check` score any
candidate solution, so every backend's answer is judged by one definition.

Builders for the models of docs/methods.md:

* :func:`l0_program`     — choose support and weights: ``min f(W)  s.t.  W = 0 where z = 0, z ∈ pattern`` (MIQP)
* :func:`refit_program`  — least-squares refit on a fixed support (convex QP)
* :func:`mask_only_program` — choose the support, keep the weights: ``min f(W0 ⊙ z)  s.t.  z ∈ pattern`` (MIQP)
* :func:`l1_program`     — FISTAPruner's ``min f(W) + λ‖W‖₁`` (convex)
* :func:`mask_program`   — ``max Σ S_ij z_ij  s.t.  z ∈ pattern`` (LP/MILP; EGGS' expander N:M masks)
* :func:`grid_program`   — the L0 program with every weight on a quantization grid: integer codes ``q``,
  ``W = s ⊙ (q − z_0)`` with the layer's fixed scales (MIQP; docs/methods.md §12)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .grid import Quantized, Quantizer, grid_rows
from .patterns import ColumnGroups, LinearRow, Pattern
from .problem import LayerProblem

__all__ = [
    "Variable", "LayerObjective", "L1Penalty", "LinearScore", "Indicator", "Program",
    "l0_program", "refit_program", "l1_program", "mask_program", "mask_only_program", "l1_kkt_residual",
    "grid_program",
]


@dataclass
class Variable:
    name: str
    shape: tuple
    domain: str = "real"  # 'real', 'binary' or 'integer' (with bounds)
    fixed_zero: Optional[torch.Tensor] = None  # bool tensor of `shape`: entries fixed at 0
    bounds: Optional[tuple] = None  # (lower, upper) of an integer variable

    @property
    def size(self) -> int:
        s = 1
        for d in self.shape:
            s *= int(d)
        return s

    @property
    def free_size(self) -> int:
        return self.size - (0 if self.fixed_zero is None else int(self.fixed_zero.sum()))


@dataclass
class LayerObjective:
    """``f(W)`` of the program's :class:`LayerProblem` (a convex quadratic in W)."""
    var: str = "W"

    def value(self, program, values):
        return program.problem.objective(values[self.var])


@dataclass
class L1Penalty:
    """``λ Σ |W_ij|``."""
    lam: float
    var: str = "W"

    def value(self, program, values):
        return self.lam * float(values[self.var].to(torch.float64).abs().sum())


@dataclass
class LinearScore:
    """``− Σ S_ij z_ij`` (programs minimise; a score is maximised)."""
    scores: torch.Tensor
    var: str = "z"

    def value(self, program, values):
        return -float((self.scores.to(torch.float64) * values[self.var].to(torch.float64)).sum())


@dataclass
class Indicator:
    """``W_ij = 0`` whenever ``b[index(i, j)] = 0`` for the binary variable ``b``.

    ``index`` maps each flattened entry of W to an entry of b: the identity (elementwise mask ``z``) or the
    column → group map (structured ``g``). Backends use indicator constraints or a big-M bound.
    """
    weight: str
    binary: str
    index: torch.Tensor  # long, size m*n

    def satisfied(self, values, tol=1e-7) -> bool:
        W = values[self.weight].reshape(-1).to(torch.float64)
        b = values[self.binary].reshape(-1).to(torch.float64)[self.index]
        return bool((W[b < 0.5].abs() <= tol * max(1.0, float(W.abs().max()))).all())


@dataclass
class Program:
    name: str
    kind: str  # 'QP' | 'L1' | 'MIQP' | 'LP' | 'MILP'
    variables: dict
    objective: list
    constraints: list = field(default_factory=list)
    problem: Optional[LayerProblem] = None
    pattern: Optional[Pattern] = None
    meta: dict = field(default_factory=dict)

    # sizes, used by backends' capability checks (e.g. Gurobi's size-limited licence)
    @property
    def n_variables(self) -> int:
        return sum(v.free_size for v in self.variables.values())

    @property
    def n_integer(self) -> int:
        return sum(v.free_size for v in self.variables.values() if v.domain in ("binary", "integer"))

    @property
    def n_constraints(self) -> int:
        return len(self.constraints)

    @property
    def is_integer(self) -> bool:
        return self.kind in ("MIQP", "MILP")

    @property
    def is_quadratic(self) -> bool:
        return any(isinstance(t, LayerObjective) for t in self.objective)

    def linear_rows(self) -> list[LinearRow]:
        return [c for c in self.constraints if isinstance(c, LinearRow)]

    def indicators(self) -> list[Indicator]:
        return [c for c in self.constraints if isinstance(c, Indicator)]

    def evaluate(self, values: dict) -> float:
        return float(sum(t.value(self, values) for t in self.objective))

    def check(self, values: dict, tol: float = 1e-6) -> dict:
        """Feasibility report of a candidate: ``{'feasible': bool, 'violations': [...]}``."""
        bad = []
        for name, v in self.variables.items():
            if name not in values:
                if v.domain == "binary" and name != "z":
                    continue
                if name == "z" and "W" in values:
                    continue
                if name == "q" and "W" in values and self.meta.get("quantizer") is not None:
                    continue  # the codes of W (filled in below)
                bad.append(f"missing variable {name}")
                continue
            x = torch.as_tensor(values[name])
            if tuple(x.shape) != tuple(v.shape):
                bad.append(f"{name}: shape {tuple(x.shape)} != {tuple(v.shape)}")
                continue
            if v.fixed_zero is not None and (x.to(torch.float64)[v.fixed_zero].abs() > tol).any():
                bad.append(f"{name}: nonzero where fixed to zero")
            if v.domain == "binary" and ((x.to(torch.float64) - x.to(torch.float64).round()).abs() > tol).any():
                bad.append(f"{name}: not binary")
            if v.domain == "integer":
                xd = x.to(torch.float64)
                if ((xd - xd.round()).abs() > tol).any():
                    bad.append(f"{name}: not integer")
                if v.bounds is not None and ((xd < v.bounds[0] - tol) | (xd > v.bounds[1] + tol)).any():
                    bad.append(f"{name}: outside [{v.bounds[0]}, {v.bounds[1]}]")
        vals = dict(values)
        qz = self.meta.get("quantizer")
        if qz is not None and "q" not in vals and "W" in vals:  # the codes of W's nearest grid values
            W = torch.as_tensor(vals["W"]).to(torch.float64)
            vals["q"] = qz.to(torch.float64).codes(W)
        if "z" in self.variables and "z" not in vals and "W" in vals:  # support of W as the mask
            vals["z"] = (vals["W"] != 0).to(torch.float64)
        if ("g" in self.variables and "g" not in vals and "W" in vals and isinstance(self.pattern, ColumnGroups)
                and tuple(torch.as_tensor(vals["W"]).shape) == tuple(self.variables["W"].shape)):
            # the groups W uses, padded with unused ones up to the kept count (so Σg = k can hold)
            g = self.pattern.kept_groups_of(torch.as_tensor(vals["W"]) != 0)
            k = self.pattern.keep_groups(self.variables["W"].shape[1])
            free = torch.nonzero(~g).reshape(-1)[: max(0, k - int(g.sum()))]
            g[free] = True
            vals["g"] = g.to(torch.float64)
        for c in self.constraints:
            if isinstance(c, LinearRow):
                if not all(t[0] in vals for t in c.terms):
                    continue
                if not c.satisfied(vals, tol=tol * max(1.0, abs(c.rhs))):
                    bad.append(f"row {c.sense} {c.rhs} violated")
            elif isinstance(c, Indicator):
                if c.binary in vals and not c.satisfied(vals, tol=tol):
                    bad.append(f"{c.weight} nonzero where {c.binary} = 0")
            elif hasattr(c, "satisfied") and getattr(c, "var", None) in vals:  # e.g. QᵀQ = I (subspace.py)
                if not c.satisfied(vals, tol=tol):
                    bad.append(f"{type(c).__name__} constraint on {c.var} violated")
        return {"feasible": not bad, "violations": bad[:10], "n_violations": len(bad)}

    def kkt_residual(self, values: dict, **kw) -> float:
        """Optimality residual of a candidate (convex models only; 0 at the optimum)."""
        if self.kind == "L1":
            return l1_kkt_residual(self.problem, self.meta["lam"], values["W"], **kw)
        raise NotImplementedError(f"no KKT residual for {self.kind} models")

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "variables": self.n_variables, "integer": self.n_integer,
                "constraints": self.n_constraints, "shape": None if self.problem is None else list(self.problem.shape)}


def _W(problem: LayerProblem, fixed_zero=None) -> Variable:
    return Variable("W", tuple(problem.shape), "real", fixed_zero)


def l0_program(problem: LayerProblem, pattern: Pattern) -> Program:
    """The mask-and-weights MIQP. Structured patterns couple W to one binary per group; a quantized pattern
    gives the :func:`grid_program`."""
    if isinstance(pattern, Quantized):
        return grid_program(problem, pattern)
    pattern.validate(problem.shape)
    m, n = problem.shape
    if isinstance(pattern, ColumnGroups):
        gi = pattern.group_index(n)
        index = gi.unsqueeze(0).expand(m, n).reshape(-1)
        g = pattern.n_groups(n)
        variables = {"W": _W(problem), "g": Variable("g", (g,), "binary")}
        rows = [LinearRow([("g", torch.arange(g), torch.ones(g, dtype=torch.float64))], "==",
                          pattern.keep_groups(n))]
        cons = [Indicator("W", "g", index)] + rows
        return Program("group-selection MIQP", "MIQP", variables, [LayerObjective()], cons, problem, pattern)
    variables = {"W": _W(problem), "z": Variable("z", (m, n), "binary")}
    for name, size in pattern.aux_variables(problem.shape).items():
        variables[name] = Variable(name, (size,), "binary")
    cons = [Indicator("W", "z", torch.arange(m * n))] + pattern.constraints(problem.shape)
    return Program("L0 mask-and-weights MIQP", "MIQP", variables, [LayerObjective()], cons, problem, pattern)


def mask_only_program(problem: LayerProblem, pattern: Pattern) -> Program:
    """The mask-only model: the L0 program with every kept weight fixed at its original value,
    ``min f(W0 ⊙ z)  s.t.  z ∈ pattern`` — the L0 MIQP plus the linear rows ``W_ij − W0_ij z_ij = 0``.
    ``meta['fixed_weights']`` marks it (a least-squares refit of W leaves this program's feasible set)."""
    prog = l0_program(problem, pattern)
    if isinstance(pattern, ColumnGroups):
        raise ValueError("the mask-only program takes element masks (N:M, expander N:M, unstructured), "
                         f"not {pattern.name}")
    m, n = problem.shape
    W0 = problem.W0.detach().to(torch.float64).cpu().reshape(-1)
    one = torch.ones(1, dtype=torch.float64)
    for k in range(m * n):
        idx = torch.tensor([k])
        prog.constraints.append(LinearRow([("W", idx, one), ("z", idx, -W0[k:k + 1])], "==", 0.0))
    prog.name = "mask-only MIQP (kept weights fixed at W0)"
    prog.meta["fixed_weights"] = True
    return prog


def refit_program(problem: LayerProblem, mask: torch.Tensor) -> Program:
    """``min f(W) s.t. W_ij = 0 where mask_ij = 0`` — a convex QP, separable by rows when X̂ = X or not."""
    mask = mask.to(torch.bool).cpu()
    if tuple(mask.shape) != tuple(problem.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(problem.shape)}")
    return Program("least-squares refit QP", "QP", {"W": _W(problem, ~mask)}, [LayerObjective()], [], problem,
                   meta={"mask": mask})


def l1_program(problem: LayerProblem, lam: float) -> Program:
    """FISTAPruner's convex model ``min ½‖W X̂ − W0 X‖² + λ‖W‖₁``."""
    if lam < 0:
        raise ValueError(f"λ must be ≥ 0, got {lam}")
    return Program("l1 (FISTAPruner) convex model", "L1", {"W": _W(problem)}, [LayerObjective(), L1Penalty(lam)],
                   [], problem, meta={"lam": float(lam)})


def l1_kkt_residual(problem: LayerProblem, lam: float, W: torch.Tensor, *, zero_tol: float = 0.0) -> float:
    """Optimality residual of ``W`` for ``min f(W) + λ‖W‖₁`` (0 exactly at the optimum), in float64.

    With ``g = ∇f(W) = W Ĥ − W0 C`` the subgradient conditions are ``g_ij + λ sign(W_ij) = 0`` where
    ``W_ij ≠ 0`` and ``|g_ij| ≤ λ`` where ``W_ij = 0``; the residual is the largest violation,
    ``max(|g_ij + λ sign W_ij|, max(|g_ij| − λ, 0))``, divided by ``λ`` (by ``‖∇f(0)‖_∞`` when ``λ = 0``).
    Entries with ``|W_ij| ≤ zero_tol`` count as zero (interior-point solutions have no exact zeros).
    """
    dt, dev = torch.float64, problem.W0.device  # W may come back from a GPU solver: evaluate where the problem is
    W = W.to(device=dev, dtype=dt)
    W0C = problem.W0.to(dt) @ problem.Cm.to(dt)
    g = W @ problem.Hh.to(dt) - W0C
    zero = W.abs() <= zero_tol
    r = torch.where(zero, (g.abs() - lam).clamp_min(0.0), (g + lam * torch.sign(W)).abs())
    scale = lam if lam > 0 else float(W0C.abs().max().clamp_min(1e-300))
    return float(r.max()) / scale


def mask_program(scores: torch.Tensor, pattern: Pattern) -> Program:
    """``max Σ S z  s.t.  z ∈ pattern`` (an LP whose matrix is TU for N:M and expander N:M tiles)."""
    pattern.validate(tuple(scores.shape))
    m, n = scores.shape
    variables = {"z": Variable("z", (m, n), "binary")}
    for name, size in pattern.aux_variables((m, n)).items():
        variables[name] = Variable(name, (size,), "binary")
    return Program("mask selection (max score)", "MILP", variables, [LinearScore(scores.detach().cpu())],
                   pattern.constraints((m, n)), None, pattern)


def grid_program(problem: LayerProblem, pattern: Quantized, quantizer: Optional[Quantizer] = None) -> Program:
    """The L0 program over grid ∩ pattern: ``min f(W)`` over binaries ``z`` (the base pattern's rows), integer
    codes ``q ∈ [q_min, q_max]`` and weights tied to them, ``W_ij = s_ij (q_ij − z0_ij)`` and ``W_ij = 0``
    where ``z_ij = 0``. The scales are the layer's fixed ones (default: from the dense ``W0``,
    :meth:`Quantized.quantizer`); ``meta['quantizer']`` holds them for the production solvers and backends."""
    if not isinstance(pattern, Quantized):
        raise ValueError(f"the grid program takes a quantized pattern (--quant), got {pattern.name}")
    pattern.validate(problem.shape)
    qz = quantizer or pattern.quantizer(problem.W0.to(torch.float64))
    m, n = problem.shape
    spec = pattern.grid
    variables = {"W": _W(problem), "z": Variable("z", (m, n), "binary"),
                 "q": Variable("q", (m, n), "integer", bounds=(spec.qmin, spec.qmax))}
    for name, size in pattern.aux_variables(problem.shape).items():
        variables[name] = Variable(name, (size,), "binary")
    cons = [Indicator("W", "z", torch.arange(m * n))] + pattern.constraints(problem.shape) + \
        grid_rows(qz, problem.shape)
    return Program(f"grid MIQP ({spec.name})", "MIQP", variables, [LayerObjective()], cons, problem, pattern,
                   meta={"quantizer": qz, "grid": spec.name})
